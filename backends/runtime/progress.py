"""Progress: one line per step on rank 0 (a bar redrawn in place on a terminal) and --metrics JSON lines.

Each step reports its step, loss, tokens per second, step time and this rank's peak memory (CUDA's peak
allocation, else the process's peak resident size), with the learning rate and the gradient norm when known;
the JSON lines carry the same fields.
"""
import json
import os
import resource
import sys
import time

import torch
import torch.distributed as dist

from .core import DEVICE


def open_metrics(path, start):
    """The --metrics file (rank 0): new, or, resuming at step ``start``, keeping the lines of earlier steps."""
    if not path or dist.get_rank() != 0:
        return None
    kept = []
    if start and os.path.exists(path):
        with open(path) as old:
            kept = [line for line in old if line.strip() and json.loads(line)["step"] < start]
    metrics = open(path, "w")
    metrics.writelines(kept)
    return metrics


def peak_memory_bytes():
    """This rank's peak memory: CUDA's peak allocation on a GPU, else the peak resident size of the process."""
    if DEVICE.type == "cuda":
        return torch.cuda.max_memory_allocated(DEVICE)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def report_step(metrics, step, loss, started, extra, total_steps=None):
    """Rank 0: the step's line on stdout (redrawn in place on a terminal) and, with --metrics, its JSON line.
    ``extra``: more fields (``tokens``: the step's token count, turned into ``tokens_per_s``)."""
    if dist.get_rank() != 0:
        return
    seconds = time.perf_counter() - started
    extra = dict(extra)
    tokens = extra.pop("tokens", None)
    record = {"step": step, "loss": loss, "seconds": seconds, "memory_bytes": peak_memory_bytes()}
    if tokens:
        record["tokens_per_s"] = tokens / seconds
    record |= extra
    if metrics:
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
    line = progress_line(record)
    if sys.stdout.isatty() and total_steps:
        done = step + 1
        bar = "#" * (20 * done // total_steps)
        end = "\n" if done == total_steps else ""
        print(f"\r[{bar:<20}] {done}/{total_steps} {line}\x1b[K", end=end, flush=True)
    else:
        print(line, flush=True)


def progress_line(record):
    """``step 3 loss 4.123456 tokens/s 1234 step_time 0.123s memory 123.4MiB`` (with lr and grad_norm if known)."""
    line = f"step {record['step']} loss {record['loss']:.6f}"
    if "tokens_per_s" in record:
        line += f" tokens/s {record['tokens_per_s']:.0f}"
    line += f" step_time {record['seconds']:.3f}s memory {record['memory_bytes'] / 2 ** 20:.1f}MiB"
    for key in ("lr", "grad_norm"):
        if record.get(key) is not None:
            line += f" {key} {record[key]:.6g}"
    return line
