"""Strategies: the user's parallel plan, normalised into one dict every pass reads."""
from __future__ import annotations

import difflib
import math

KNOWN_KEYS = ("mesh", "params", "activations", "sequence_parallel", "vocab_parallel", "fsdp", "stages",
              "stage_layers", "stage_devices", "microbatches", "schedule", "virtual_stages", "skip_ratio",
              "recompute", "grad_bucket_bytes")
SHORTHANDS = ("dp", "fsdp", "auto", "none")


class StrategyError(ValueError):
    """A strategy that cannot be applied: names the key or tensor and what to do."""


def closest(name: str, options, n: int = 3) -> str:
    """``; did you mean a, b?`` for the names closest to ``name`` (empty when none is close)."""
    close = difflib.get_close_matches(name, list(options), n=n, cutoff=0.5)
    return f"; did you mean {', '.join(close)}?" if close else ""


def normalize_strategy(strategy, world_size: int) -> dict:
    """A strategy dict with a mesh whose sizes multiply to ``world_size``."""
    if strategy is None or strategy == "none":
        strategy = {"mesh": {"dp": world_size}}
    elif isinstance(strategy, str):
        strategy = _shorthand(strategy, world_size)
    if not isinstance(strategy, dict):
        raise StrategyError(f"expected a strategy name ({', '.join(SHORTHANDS)}) or a dict, found "
                            f"{type(strategy).__name__}")
    unknown = [k for k in strategy if k not in KNOWN_KEYS]
    if unknown:
        raise StrategyError(f"unknown strategy key {unknown[0]!r}{closest(unknown[0], KNOWN_KEYS)}; "
                            f"known keys: {', '.join(KNOWN_KEYS)}")
    out = dict(strategy)
    out["mesh"] = dict(strategy.get("mesh") or {"dp": world_size})
    size = math.prod(int(v) for v in out["mesh"].values())
    if size != world_size:
        raise StrategyError(f"the mesh {out['mesh']} holds {size} devices but the cluster has {world_size}; "
                            f"make the axis sizes multiply to {world_size}")
    micro = out.get("microbatches")
    if isinstance(micro, int) and micro > 1 and "pp" not in out["mesh"]:
        out["mesh"] = {"pp": 1, **out["mesh"]}  # gradient accumulation is a one-stage pipeline
    if out.get("fsdp") is True:
        out["fsdp"] = "dp"
    if out.get("fsdp") and out["fsdp"] not in out["mesh"]:
        raise StrategyError(f"fsdp names mesh axis {out['fsdp']!r}, but the mesh has {list(out['mesh'])}")
    return out


def _shorthand(name: str, world_size: int) -> dict:
    if name == "dp":
        return {"mesh": {"dp": world_size}}
    if name == "fsdp":
        return {"mesh": {"dp": world_size}, "fsdp": "dp"}
    raise StrategyError(f"unknown strategy {name!r}{closest(name, SHORTHANDS)}; use one of "
                        f"{', '.join(s for s in SHORTHANDS if s != 'auto')} or a dict")


def tensor_axis(strategy: dict) -> str | None:
    """The mesh axis used for tensor (and sequence, vocabulary) parallelism."""
    mesh = strategy["mesh"]
    if "tp" in mesh:
        return "tp"
    others = [a for a in mesh if a not in ("dp", "pp")]
    return others[-1] if others else None
