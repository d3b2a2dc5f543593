"""The simulator against published training runs (``shared/CALIBRATION.md``, end-to-end sections).

Every row is a run whose paper states its full configuration: the model (layers, hidden, heads,
vocabulary, sequence), the GPUs, the tensor/pipeline/data-parallel degrees, the batch and microbatch,
the schedule, sequence parallelism and the recomputation mode. Each is built as a Megatron-style GPT
(:mod:`megatron_gpt`) on the meta device, captured with :data:`CAPTURED_BLOCKS` blocks and simulated
for its full depth (the simulator prices one block for every identical block, see
``passes.planner.evaluate.BLOCK_COUNT_ATTR``), in bf16 with Adam, on the built-in calibrated cluster
(``dgx-a100:N`` / ``dgx-h100:N``; no constant fitted to any row). The simulated iteration time is
printed beside the published one (given, or derived from the published TFLOP/s with the paper's own
FLOP formula) with the error.

    python benchmarks/published_runs.py [--table korthikanti|narayanan|bloom|megatron-h100] [--rows LABEL ...]

``MISSES`` names the rows the simulator misses, with the reason. ``--auto`` also plans each row with
``strategy="auto"`` on its cluster and batch and prints its simulated step against the published layout's,
and where auto is more than 10% faster, where it gains (:func:`gain_sources`). After the table, every pair of rows
of one table whose simulated steps are not in their published order.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from cluster import Cluster  # noqa: E402
from compiler.simulate import simulate  # noqa: E402
from frontend.torch_capture import capture  # noqa: E402
from ir.core import Graph  # noqa: E402
from megatron_gpt import MEGATRON_LAYOUT, MegatronConfig, meta_model  # noqa: E402
from cost.estimate import PlanOptions  # noqa: E402
from cost.ops import Precision  # noqa: E402
from passes.planner.evaluate import BLOCK_COUNT_ATTR, ModelView  # noqa: E402
from passes.recompute import mark_recompute  # noqa: E402

CAPTURED_BLOCKS = 2
GOAL = 0.15
SELECTIVE = ["blocks.*.attn.core"]
"""Selective recomputation (Korthikanti et al. §5): the attention core (Q·Kᵀ, softmax, dropout, ·V)."""


MIXED_BF16 = Precision("bf16", master_weights=True)
"""Mixed precision as the 2021-22 runs trained: the bf16 model's tensors at their dtypes (the loss in fp32, as
Megatron's cross entropy upcasts the logits), fp32 master weights and Adam state, gradients reduced in their own
2-byte dtype (Megatron-LM's fp16 runs; DeepSpeed's BF16 optimizer, ``communication_data_type`` bf16)."""


@dataclass(frozen=True)
class Model:
    """A GPT's shape as the paper gives it."""

    name: str
    layers: int
    hidden: int
    heads: int
    vocab: int
    seq: int
    attention: str = "unfused"


@dataclass(frozen=True)
class Run:
    """One published run: its layout and its published iteration time (seconds)."""

    table: str
    label: str
    model: Model
    cluster: str
    gpus: int
    tp: int
    pp: int
    batch: int
    microbatch: int
    recompute: str
    """``none``, ``selective`` (the attention core) or ``full`` (every block)."""
    published_s: float
    sequence_parallel: bool = False
    virtual_stages: int = 1
    fsdp: bool = False
    overlap_grad_sync: bool = False
    published_note: str = ""
    precision: str | Precision = MIXED_BF16
    """The mixed precision it is priced at (the captured model is bf16): :data:`MIXED_BF16` (2-byte gradient
    reductions) or ``bf16-mixed`` (fp32 ones)."""
    distributed_optimizer: bool | str = False
    """Optimizer state and master weights sharded over the data-parallel ranks (ZeRO-1): True, Megatron-LM's
    (gradients reduce-scattered), or ``"all_reduce"``, DeepSpeed's BF16 optimizer's (gradients all-reduced)."""
    grad_accumulation: str = "fused"
    """How the microbatches' gradients are summed (:attr:`cost.estimate.PlanOptions.grad_accumulation`): inside
    the weight-gradient GEMMs (Megatron-LM's gradient-accumulation fusion; the ZeRO-3 rows run one microbatch, so
    nothing is summed), or ``fp32_buffer`` (DeepSpeed's BF16 optimizer)."""
    overhead_s: float | None = None
    """Seconds each op costs besides its kernel (None: the cluster's kernel gap; backward ops count twice)."""

    def options(self) -> dict:
        """The pricing options of the run (besides its layout)."""
        return dict(precision=self.precision, optimizer="adam", global_batch=self.batch,
                    overlap_grad_sync=self.overlap_grad_sync, distributed_optimizer=self.distributed_optimizer,
                    grad_accumulation=self.grad_accumulation, overhead_s=self.overhead_s)

    @property
    def dp(self) -> int:
        """Data-parallel degree."""
        return self.gpus // (self.tp * self.pp)

    @property
    def microbatches(self) -> int:
        """Microbatches per replica per step."""
        return self.batch // (self.dp * self.microbatch)

    def strategy(self) -> dict:
        """The published layout as a strategy dict."""
        mesh = {"pp": self.pp} if self.pp > 1 else {}
        mesh.update({"dp": self.dp, "tp": self.tp})
        out: dict = {"mesh": mesh, "microbatches": self.microbatches}
        if self.tp > 1:  # Megatron's layout; its loss runs on vocabulary-split logits (vocab_parallel_cross_entropy)
            out["params"] = MEGATRON_LAYOUT
            out["vocab_parallel"] = True
            out["sequence_parallel"] = self.sequence_parallel
            if self.sequence_parallel:  # Megatron-LM's sequence-parallel linears keep their input's shard
                out["regather_activations"] = True
        if self.pp > 1:
            out["schedule"] = "interleaved" if self.virtual_stages > 1 else "1f1b"
            if self.virtual_stages > 1:
                out["virtual_stages"] = self.virtual_stages
        if self.recompute == "full":
            out["recompute"] = ["blocks.*"]
        if self.fsdp:
            out["fsdp"] = "dp"
        return out


def narayanan_flops(m: Model, batch: int) -> float:
    """Narayanan et al. eq. 3 (counts full recomputation's extra forward): 96·B·s·l·h²·(1 + s/6h + V/16lh)."""
    s, l, h, v = m.seq, m.layers, m.hidden, m.vocab
    return 96 * batch * s * l * h**2 * (1 + s / (6 * h) + v / (16 * l * h))


def model_flops(m: Model, batch: int) -> float:
    """Korthikanti et al. App. A model FLOPs: 72·B·L·s·h²·(1 + s/6h + v/12hL)."""
    s, l, h, v = m.seq, m.layers, m.hidden, m.vocab
    return 72 * batch * l * s * h**2 * (1 + s / (6 * h) + v / (12 * h * l))


# --------------------------------------------------------------------------------------------------
# The published table (CALIBRATION.md sections 1, 2 and 7)
# --------------------------------------------------------------------------------------------------

S2K, V51K = 2048, 51200
M22 = Model("22B", 48, 6144, 64, V51K, S2K)
M175 = Model("175B", 96, 12288, 96, V51K, S2K)
M530 = Model("530B", 105, 20480, 128, V51K, S2K)
M1T = Model("1T", 128, 25600, 160, V51K, S2K)


def _korthikanti() -> list[Run]:
    """Table 5 (tp 8, no data parallelism, interleaved with 3 stages per position for 175B and 530B;
    full recompute, or selective recompute with sequence parallelism) and the 530B run on 2240 GPUs."""
    rows = []
    layouts = [(M22, 8, 1, 4, 4, 1, 1.42, 1.10), (M175, 64, 8, 64, 1, 3, 18.13, 13.75),
               (M530, 280, 35, 280, 1, 3, 49.05, 37.83), (M1T, 512, 64, 512, 1, 1, 94.42, 71.49)]
    for model, gpus, pp, batch, micro, v, full_s, present_s in layouts:
        common = dict(model=model, cluster=f"dgx-a100:{gpus // 8}", gpus=gpus, tp=8, pp=pp, batch=batch,
                      microbatch=micro, virtual_stages=v)
        rows.append(Run("korthikanti", f"{model.name} full recompute", recompute="full", published_s=full_s,
                        **common))
        rows.append(Run("korthikanti", f"{model.name} selective+SP", recompute="selective", sequence_parallel=True,
                        published_s=present_s, **common))
    rows.append(Run("korthikanti", "530B selective+SP dp8 (2240 GPUs)", M530, "dgx-a100:280", 2240, 8, 35, 2240, 1,
                    "selective", 39.15, sequence_parallel=True, virtual_stages=3))
    return rows


def _narayanan() -> list[Run]:
    """Table 2: PTD-P (t, p) = (8, 12) / (8, 35), microbatch 1, full recompute; ZeRO-3 pure data parallelism
    (parameters, gradients and optimizer state sharded over every GPU), full recompute. Times derived from
    the published TFLOP/s with eq. 3."""
    rows = []
    ptdp = [(M175, 384, 12, 1536, 153), (M175, 768, 12, 1536, 149), (M175, 1536, 12, 1536, 141),
            (M530, 560, 35, 2240, 171), (M530, 1120, 35, 2240, 167), (M530, 2240, 35, 2240, 159)]
    for model, gpus, pp, batch, tflops in ptdp:
        rows.append(Run("narayanan", f"PTD-P {model.name} {gpus} GPUs", model, f"dgx-a100:{gpus // 8}", gpus, 8, pp,
                        batch, 1, "full", narayanan_flops(model, batch) / (tflops * 1e12 * gpus),
                        published_note=f"{tflops} TFLOP/s"))
    zero = [(M175, 384, 1536, 4, 144), (M175, 768, 1536, 2, 88), (M175, 1536, 1536, 1, 44),
            (M530, 640, 2560, 4, 138), (M530, 1120, 2240, 2, 98), (M530, 2240, 2240, 1, 48)]
    for model, gpus, batch, micro, tflops in zero:
        rows.append(Run("narayanan", f"ZeRO-3 {model.name} {gpus} GPUs", model, f"dgx-a100:{gpus // 8}", gpus, 1, 1,
                        batch, micro, "full", narayanan_flops(model, batch) / (tflops * 1e12 * gpus), fsdp=True,
                        overlap_grad_sync=True, published_note=f"{tflops} TFLOP/s"))
    return rows


SYNCHRONOUS_OP_S = 15e-6
"""What an eager op costs besides its kernel when every launch waits for the kernel to finish: 17 us for a
synchronized ``add`` of 512 x 512 fp32 elements on an A100 (flagos-ai/Torch-FL#27, "cuda_e2e"; host
dispatch alone 8 us), less its kernel's ~2 us at the A100's STREAM bandwidth (3 MiB moved)."""


def _bloom() -> list[Run]:
    """BLOOM-176B (bigscience-workshop/bigscience train/tr11-176B-ml, README and tr11-176B-ml.slurm): tp 4, pp 12,
    dp 8, microbatch 2, batch 2048, full recompute, 384 A100 80GB on Jean Zay (4 Omni-Path links a node,
    ``jean-zay:48``), Megatron-DeepSpeed with DeepSpeed's BF16 optimizer at ZeRO stage 0, which shards the fp32
    state over the data-parallel ranks but all-reduces the whole gradient (in bf16, DeepSpeed's
    ``communication_data_type`` for bf16) after the pipeline flush, not overlapped, and adds every
    microbatch's gradient into an fp32 buffer (deepspeed/runtime/bf16_optimizer.py, pipe/engine.py, v0.6.5). The
    slurm script sets ``CUDA_LAUNCH_BLOCKING=1`` ("do not remove or the training will hang"): every kernel launch
    waits for the kernel, so each op costs the host's dispatch besides its kernel (:data:`SYNCHRONOUS_OP_S`)."""
    model = Model("BLOOM-176B", 70, 14336, 112, 250880, S2K)
    return [Run("bloom", "BLOOM-176B 384 GPUs", model, "jean-zay:48", 384, 4, 12, 2048, 2, "full", 104.70,
                published_note="elapsed time per iteration", distributed_optimizer="all_reduce",
                grad_accumulation="fp32_buffer", overhead_s=SYNCHRONOUS_OP_S)]


def _megatron_h100() -> list[Run]:
    """Megatron-LM README (H100, vocabulary 131072, sequence 4096): microbatch, recompute and virtual stages
    are not published: microbatch 1, no recomputation, 1F1B, sequence parallelism with tp, flash attention,
    gradient reduction overlapped (--overlap-grad-reduce). ``--overlap-param-gather`` exists only with Megatron's
    distributed optimizer, so the rows shard the optimizer over dp and gather the parameters back; Megatron-LM
    reduces bf16 models' gradients in fp32 unless told otherwise (``accumulate_allreduce_grads_in_fp32``,
    megatron/training/arguments.py), so they are priced ``bf16-mixed``. Times derived from the published
    TFLOP/s with the model-FLOP formula (it reproduces the table's MFU at 989 TFLOP/s)."""
    rows = []
    table = [("1.7B", 16, 2048, 24, 1, 1, 192, 408.8), ("7.1B", 32, 4096, 30, 2, 1, 192, 465.9),
             ("16B", 48, 6144, 32, 4, 1, 192, 489.1), ("32B", 56, 7168, 48, 8, 1, 192, 459.6),
             ("70B", 64, 8192, 84, 8, 2, 384, 419.7), ("119B", 80, 10240, 92, 8, 4, 768, 420.5),
             ("177B", 96, 12288, 96, 8, 6, 1152, 432.8), ("314B", 128, 16384, 96, 8, 8, 1536, 474.4),
             ("462B", 144, 18432, 112, 8, 16, 3072, 459.9)]
    for name, heads, hidden, layers, tp, pp, batch, tflops in table:
        model = Model(name, layers, hidden, heads, 131072, 4096, attention="flash")
        gpus = tp * pp * 48
        rows.append(Run("megatron-h100", f"{name} {gpus} GPUs", model, f"dgx-h100:{gpus // 8}", gpus, tp, pp, batch,
                        1, "none", model_flops(model, batch) / (tflops * 1e12 * gpus), sequence_parallel=tp > 1,
                        overlap_grad_sync=True, published_note=f"{tflops} TFLOP/s", precision="bf16-mixed",
                        distributed_optimizer=True))
    return rows


_ZERO3 = ("DeepSpeed ZeRO-3 (2021): the published step does not shrink from 768 to 1536 GPUs (175B: 66.8 s both), "
          "so it is bound by its parameter gathers at a rate far below NCCL's measured bandwidth, which the "
          "simulator uses; DeepSpeed's own gather overheads are not modelled (its 2021 code gathered each "
          "parameter in its own call after a device synchronize: priced so, the rows read -25..-58%)")
MISSES = {
    **{f"ZeRO-3 {m} {g} GPUs": _ZERO3 for m, g in [("175B", 384), ("175B", 768), ("175B", 1536), ("530B", 640),
                                                    ("530B", 1120), ("530B", 2240)]},
    "1.7B 48 GPUs": "its step is its kernels' time (gradient traffic hidden, no tp), and the simulator's H100 kernel "
                    "rates run faster than the run's did: 1.4 ms more a layer and microbatch, not a fixed cost",
    "7.1B 96 GPUs": "as the 1.7B row (tp collectives 9% of its step): 1.5 ms more a layer and microbatch",
    "32B 384 GPUs": "its fp32 gradient reduce-scatter runs over one NIC a GPU (tp 8) and is mostly exposed, and "
                    "the run hid its tp collectives behind GEMMs (--tp-comm-overlap), which the simulator exposes "
                    "(hidden: +3.9%, but -14..-20% for 16B and 70B-462B, which ran with the flag too)",
}
"""Rows the simulator misses by more than :data:`GOAL`, with the reason (printed beside the row, and in the
README)."""


def published_runs() -> list[Run]:
    """Every row, in table order."""
    return _korthikanti() + _narayanan() + _bloom() + _megatron_h100()


# --------------------------------------------------------------------------------------------------
# Simulation
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def captured(model: Model, recompute_core: bool) -> Graph:
    """The model captured on the meta device with :data:`CAPTURED_BLOCKS` blocks, standing for all of them;
    ``recompute_core``: the attention core marked recomputed (selective recomputation)."""
    cfg = MegatronConfig(vocab_size=model.vocab, block_size=model.seq, n_layer=CAPTURED_BLOCKS, n_head=model.heads,
                         n_embd=model.hidden, attention=model.attention)
    tokens = torch.zeros(2, model.seq, dtype=torch.long)  # batch 1 would be specialised as a constant
    graph = capture(meta_model(cfg), (tokens, tokens), train=True).graph
    graph.attrs["example_dims"] = {"batch": 2, "seq": model.seq}
    graph.attrs[BLOCK_COUNT_ATTR] = model.layers
    if recompute_core:
        mark_recompute(graph, SELECTIVE)
    return graph


def simulate_run(run: Run, strategy: dict | str | None = None):
    """The :class:`~backends.simulator.SimReport` of ``run`` (its published layout, or ``strategy``)."""
    graph = captured(run.model, run.recompute == "selective")
    cluster = Cluster.load(run.cluster)
    return simulate((graph, strategy or run.strategy(), cluster), **run.options())


def table4_run(recompute: str, sequence_parallel: bool) -> Run:
    """Table 4's setting: one 22B model on 8 GPUs, tp 8, microbatch 4."""
    return Run("table4", "", M22, "dgx-a100:1", 8, 8, 1, 4, 4, recompute, 0.0, sequence_parallel=sequence_parallel)


def layer_times(recompute: str, sequence_parallel: bool) -> dict:
    """Table 4: one 22B block's forward and backward milliseconds (tp 8, microbatch 4), collectives
    included; backward includes the recomputed forward."""
    sim = simulate_run(table4_run(recompute, sequence_parallel))
    block = sim.stage_segments[0][2]  # a later block: the first has the boundary collectives of the prologue
    return {"forward_ms": block["forward_s"] * 1e3, "backward_ms": block["backward_s"] * 1e3}


def layer_activation_bytes(recompute: str, sequence_parallel: bool) -> float:
    """Table 4's 22B block: the activation bytes it keeps for each microbatch in flight, as the simulator prices
    the published layout (Korthikanti et al. section 4: 34·sbh/t with selective recomputation and sequence
    parallelism, see :func:`cost.memory.megatron_activation_bytes`)."""
    run = table4_run(recompute, sequence_parallel)
    graph = captured(run.model, run.recompute == "selective")
    evaluation = ModelView(graph).evaluate(run.strategy(), Cluster.load(run.cluster), PlanOptions(**run.options()))
    return evaluation.profile.segments[2].kept_bytes(run.microbatch)  # a later block (as layer_times)


def plan_auto(run: Run) -> tuple:
    """``strategy="auto"`` on the run's cluster and batch: (its simulation, the published layout's simulation,
    the chosen plan's summary, where it gains: :func:`gain_sources`)."""
    from passes.planner.search import search
    graph = captured(run.model, run.recompute == "selective")
    strategy, report = search(graph, Cluster.load(run.cluster), "auto", use_cache=False, **run.options())
    auto, published = simulate_run(run, strategy), simulate_run(run)
    return auto, published, report.chosen.summary, gain_sources(run, strategy, auto, published)


def gain_sources(run: Run, strategy, auto, published) -> str:
    """Where auto's plan (``strategy``, simulated as ``auto``) saves time against the published layout's simulation:
    first its pipeline schedule alone, run on the published layout (where both pipeline and the schedules differ),
    then the rest of the plan; then the breakdown parts that changed most, each plan's on the rank that finishes
    last (with other stage sizes that is another rank's share of the work, not less work)."""
    pipeline = getattr(strategy, "pipeline", None)
    schedule = pipeline.schedule if pipeline is not None else None
    sources, base = [], published.step_time_s
    layout = run.strategy()
    if run.pp > 1 and schedule not in (None, layout.get("schedule")):
        variant = {key: value for key, value in layout.items() if key != "virtual_stages"}
        variant["schedule"] = schedule
        if pipeline.virtual_stages:
            variant["virtual_stages"] = pipeline.virtual_stages
        alone = simulate_run(run, variant).step_time_s
        sources.append(f"the {schedule} schedule on the published layout {alone - base:+.2f} s")
        base = alone
    sources.append(f"{'the rest of the plan' if sources else 'the plan'} {auto.step_time_s - base:+.2f} s")
    parts = set(auto.breakdown) | set(published.breakdown)
    deltas = sorted(((auto.breakdown.get(k, 0.0) - published.breakdown.get(k, 0.0), k) for k in parts))
    changed = ", ".join(f"{name} {delta:+.2f} s" for delta, name in deltas[:3] if delta < 0)
    return ", ".join(sources) + (f"; on the rank that finishes last: {changed}" if changed else "")


def out_of_order(simulated: list[tuple[Run, float]]) -> list[tuple[Run, Run]]:
    """The pairs of rows of one table whose simulated steps are not in their published order (a tie is an order
    of its own: two rows published equal and simulated apart count)."""
    def order(x: float, y: float) -> int:
        return int(x > y) - int(x < y)
    return [(a, b) for (a, sa), (b, sb) in itertools.combinations(simulated, 2)
            if a.table == b.table and order(a.published_s, b.published_s) != order(sa, sb)]


TABLE4 = [("Baseline no recompute", "none", False, 7.7, 11.9), ("Sequence Parallelism", "none", True, 7.2, 11.8),
          ("Baseline with recompute", "full", False, 7.7, 19.5), ("Selective Recompute", "selective", False, 7.7, 13.2),
          ("Selective + Sequence", "selective", True, 7.2, 13.1)]
"""Korthikanti et al. Table 4: (experiment, recompute, sequence parallel, forward ms, backward ms)."""


def main(argv: list[str] | None = None) -> None:
    """Simulate every row (or one table) and print it beside the published figure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", choices=["korthikanti", "narayanan", "bloom", "megatron-h100"])
    parser.add_argument("--rows", nargs="*", help="only these rows (by label)")
    parser.add_argument("--auto", action="store_true", help="also plan each row with strategy='auto'")
    args = parser.parse_args(argv)
    print("Table 4 (22B block, tp 8, microbatch 4): simulated / published ms")
    for label, recompute, sp, fwd, bwd in TABLE4:
        t = layer_times(recompute, sp)
        print(f"  {label:26s} forward {t['forward_ms']:5.2f} / {fwd:4.1f} ({t['forward_ms'] / fwd - 1:+.0%})  "
              f"backward {t['backward_ms']:5.2f} / {bwd:4.1f} ({t['backward_ms'] / bwd - 1:+.0%})")
    print()
    print("| table | run | layout | published s | simulated s | error | simulated MFU |")
    print("|---|---|---|---|---|---|---|")
    misses, simulated = 0, []
    for run in published_runs():
        if (args.table and run.table != args.table) or (args.rows and run.label not in args.rows):
            continue
        start = time.perf_counter()
        sim = simulate_run(run)
        error = sim.step_time_s / run.published_s - 1
        misses += abs(error) > GOAL
        simulated.append((run, sim.step_time_s))
        layout = f"tp{run.tp} pp{run.pp} dp{run.dp} mb{run.microbatch}x{run.microbatches}" + \
            (f" v{run.virtual_stages}" if run.virtual_stages > 1 else "") + (" sp" if run.sequence_parallel else "") + \
            (" zero3" if run.fsdp else "") + f" {run.recompute}"
        print(f"| {run.table} | {run.label} | {layout} | {run.published_s:.2f} | {sim.step_time_s:.2f} | "
              f"{error:+.1%}{'' if sim.fits else ' (does not fit)'} | {sim.mfu:.1%} |"
              f"  ({time.perf_counter() - start:.1f}s)" + (f" miss: {MISSES.get(run.label, 'not explained')}" if abs(error) > GOAL else ""),
              flush=True)
    print(f"\n{misses} rows outside +-{GOAL:.0%}")
    swapped = out_of_order(simulated)
    print(f"{len(swapped)} pairs of rows of one table in another order than published"
          + "".join(f"\n  {a.table}: {a.label} / {b.label}" for a, b in swapped))
    if args.auto:
        print("\nstrategy='auto' on each row's cluster and batch (simulated step, auto / published layout):")
        for run in published_runs():
            if (args.table and run.table != args.table) or (args.rows and run.label not in args.rows):
                continue
            auto, published, summary, why = plan_auto(run)
            ratio = auto.step_time_s / published.step_time_s
            peak = max(published.peak_memory_bytes.values()) / 2**30
            print(f"  {run.label}: {ratio:.2f}x, {'fits' if auto.fits else 'DOES NOT FIT'}: {summary}"
                  + (f"; gains: {why}" if ratio < 0.9 else "")
                  + ("" if published.fits else f" (the published layout does not fit here: {peak:.1f} GiB at its "
                                               f"peak, over the memory headroom; auto must fit)"), flush=True)


if __name__ == "__main__":
    main()
