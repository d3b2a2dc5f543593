"""Lost peers: a collective that fails because another rank is gone stops this rank with one line.

Every process group has the --comm-timeout, so a collective whose peer died fails (at once when the
connection closes, else after the timeout) instead of hanging. Under ``torchrun --max-restarts N`` the elastic
agent then restarts every rank, and ``--resume`` continues from the last checkpoint.
"""
import contextlib
import os
import re
import traceback

import torch
import torch.distributed as dist

from .core import fail

TORCH_FILES = os.path.dirname(torch.__file__)


@contextlib.contextmanager
def peer_failures(step):
    """Run a training step; a collective failing in it (a peer rank died or timed out) ends this rank with
    one line naming the step and the collective. Other errors pass unchanged."""
    try:
        yield
    except RuntimeError as error:  # gloo raises RuntimeError; nccl and the c10d store raise dist.DistError
        if not is_collective_failure(error):
            raise
        fail(f"step {step}: {failed_collective(error)} failed: {reason(error)} (a peer rank is gone, or the "
             f"collective outlived --comm-timeout; see the other ranks' logs)", abandon=True)


def is_collective_failure(error):
    text = str(error).lower()
    return isinstance(error, dist.DistError) or "gloo" in text or "nccl" in text


def failed_collective(error):
    """The collective that failed, as this program called it: the call, the function, the mesh axis."""
    frames = [(frame, summary) for (frame, _), summary in
              zip(traceback.walk_tb(error.__traceback__), traceback.extract_tb(error.__traceback__))
              if not summary.filename.startswith(TORCH_FILES)]
    if not frames:
        return "a collective"
    frame, summary = frames[-1]
    call = re.search(r"([\w.]+)\(", summary.line or "")
    axis = frame.f_locals.get("axis")
    return (f"the collective {call.group(1) if call else summary.line} in {summary.name}"
            + (f" over mesh axis {axis}" if isinstance(axis, str) else ""))


def reason(error):
    """The first sentence of a collective's error, without the source location gloo puts first."""
    text = re.sub(r"^\[[^\]]*\] ", "", str(error).strip())
    return text.split(". ")[0].splitlines()[0] if text else type(error).__name__
