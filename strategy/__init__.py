"""The parallel strategy: one typed value (:class:`Strategy`) and its one normalisation (:func:`normalize`).

Below the plan language (``frontend``), the passes, the cost model and the backends in the import
order; it reads only ``ir.sbp``. ``docs/architecture.md`` says how to add a strategy key.
"""
from strategy.errors import VALUE, StrategyError, closest, dict_path, did_you_mean
from strategy.normalize import AXIS_PATTERN, GLOB_PATTERN, WILDCARD_CHARS, check_complete, normalize
from strategy.types import (AUTO, CONTEXT_AXIS, CP_ATTENTIONS, DATA_AXIS, EXPERT_AXIS, KEYS, PIPELINE_AXIS, PRECISION_DTYPES,
                            PRECISION_SHORTHANDS, SCHEDULES, SHORTHANDS, Layout, MeshSpec, Options, Pipeline,
                            PrecisionSpec, Strategy)

__all__ = ["AUTO", "AXIS_PATTERN", "CONTEXT_AXIS", "CP_ATTENTIONS", "DATA_AXIS", "EXPERT_AXIS", "GLOB_PATTERN", "KEYS", "PIPELINE_AXIS",
           "PRECISION_DTYPES", "PRECISION_SHORTHANDS", "SCHEDULES", "SHORTHANDS", "VALUE", "WILDCARD_CHARS", "Layout",
           "MeshSpec", "Options", "Pipeline", "PrecisionSpec", "Strategy", "StrategyError",
           "check_complete", "closest", "dict_path", "did_you_mean", "normalize"]
