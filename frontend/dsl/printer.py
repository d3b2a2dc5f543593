"""A :class:`~strategy.Strategy` as canonical plan text: ``parse_plan(format_plan(s)) == s``."""
from __future__ import annotations

from typing import Any, Iterable, Iterator

from frontend.dsl.errors import located
from strategy import AUTO, Options, Pipeline, Strategy, normalize


def format_plan(strategy: Strategy | dict | str) -> str:
    """Canonical plan text, one statement per line in the order of ``strategy.KEYS``.

    Takes a :class:`~strategy.Strategy` or anything :func:`strategy.normalize` reads (a dict, a
    shorthand); a malformed dict raises :class:`~frontend.dsl.PlanError` naming the dict path.
    """
    canonical = located(None, "<strategy>", lambda: normalize(strategy))
    if canonical.shorthand is not None:
        return f"strategy {canonical.shorthand}\n"
    return "".join(line + "\n" for line in _plan_lines(canonical))


def _plan_lines(strategy: Strategy) -> Iterator[str]:
    if strategy.mesh is not None:
        yield "mesh " + (AUTO if strategy.mesh == AUTO else _pairs(strategy.mesh.items()))
    for layouts, word in ((strategy.params, "param"), (strategy.activations, "activation")):
        for layout in layouts:
            yield f"{word} {layout.glob}: " + (AUTO if layout.sbp == AUTO else _pairs(layout.sbp))
    yield from _option_lines(strategy.options)
    yield from _pipeline_lines(strategy.pipeline)
    if strategy.recompute is not None:
        recompute = strategy.recompute
        words = {True: "all", False: "none", AUTO: AUTO}
        yield "recompute " + (", ".join(recompute) if isinstance(recompute, tuple) else words[recompute])
    if strategy.precision is not None:
        yield f"precision {strategy.precision}"


def _pairs(pairs: Iterable[tuple[str, Any]]) -> str:
    return ", ".join(f"{key}={value}" for key, value in pairs)


def _option_lines(options: Options) -> Iterator[str]:
    for key in ("sequence_parallel", "vocab_parallel", "solved_layouts"):
        value = getattr(options, key)
        if value is not None:
            yield {True: key, False: f"{key} off", AUTO: f"{key} auto"}[value]
    if options.fsdp is not None:
        yield f"fsdp {options.fsdp}"
    if options.grad_bucket_bytes is not None:
        yield f"grad_bucket_bytes {options.grad_bucket_bytes}"
    if options.cp_attention is not None:
        yield f"cp_attention {options.cp_attention}"
    if options.moe_overlap_chunks is not None:
        yield f"moe_overlap_chunks {options.moe_overlap_chunks}"
    if options.regather_activations is not None:
        yield {True: "regather_activations", False: "regather_activations off",
               AUTO: "regather_activations auto"}[options.regather_activations]


def _pipeline_lines(pipeline: Pipeline) -> Iterator[str]:
    if pipeline.stages is not None:
        yield "stages auto" if pipeline.stages == AUTO else "stages at " + ", ".join(pipeline.stages)
    yield from _stage_lines(pipeline)
    if pipeline.microbatches is not None:
        yield f"microbatches {pipeline.microbatches}"
    if pipeline.schedule is not None:
        virtual = pipeline.virtual_stages
        yield f"schedule {pipeline.schedule}" + (f" virtual_stages={virtual}" if virtual is not None else "")
    if pipeline.skip_ratio is not None:
        ratio = pipeline.skip_ratio
        yield f"skip_ratio {ratio if ratio == AUTO else repr(float(ratio))}"


def _stage_lines(pipeline: Pipeline) -> Iterator[str]:
    layers, devices = pipeline.stage_layers, pipeline.stage_devices
    for index in range(len(layers or devices or ())):
        parts = []
        if layers:
            parts.append(f"layers {layers[index][0]}..{layers[index][1]}")
        if devices:
            ids = devices[index]
            parts.append(("on device " if len(ids) == 1 else "on devices ") + _format_devices(ids))
        yield f"stage {index}: " + " ".join(parts)


def _format_devices(ids: Iterable[int]) -> str:
    """``0..3, 6``: runs of three or more consecutive ids become ranges."""
    spans: list[list[int]] = []
    for device in ids:
        if spans and device == spans[-1][-1] + 1:
            spans[-1].append(device)
        else:
            spans.append([device])
    return ", ".join(f"{s[0]}..{s[-1]}" if len(s) >= 3 else ", ".join(map(str, s)) for s in spans)
