"""Optimisation profiles from the manifest's dims (min/opt/max per symbolic dimension)."""

from __future__ import annotations

from typing import Mapping, Optional

from ..errors import StarflowError
from ..export.manifest import GraphSpec

Shapes = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


def parse_shape_override(text: str) -> tuple[str, dict[str, int]]:
    """``"P=0:512:4096"`` → ("P", {"min": 0, "opt": 512, "max": 4096}); ``"batch=::2"`` sets max only."""
    try:
        name, spec = text.split("=", 1)
        parts = spec.split(":")
        if len(parts) != 3:
            raise ValueError
        out = {k: int(v) for k, v in zip(("min", "opt", "max"), parts) if v != ""}
    except ValueError as exc:
        raise StarflowError(f"--shape must look like DIM=MIN:OPT:MAX (empty parts keep the manifest's), "
                            f"got {text!r}") from exc
    return name.strip(), out


def graph_profile(spec: GraphSpec, overrides: Optional[Mapping[str, Mapping[str, int]]] = None) -> dict[str, Shapes]:
    """Input name → (min, opt, max) shape for one optimisation profile of ``spec``.

    ``overrides`` (dim name → partial min/opt/max) apply to the dims this graph has; one
    override set serves every graph of a directory.
    """
    return spec.profile({k: v for k, v in (overrides or {}).items() if k in spec.dims})


def within(profile: Mapping[str, Shapes], shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Reasons why concrete input ``shapes`` fall outside ``profile`` (empty when covered)."""
    problems = []
    for name, shape in shapes.items():
        if name not in profile:
            problems.append(f"{name}: not an input of the profile")
            continue
        lo, _, hi = profile[name]
        if len(shape) != len(lo):
            problems.append(f"{name}: rank {len(shape)} != {len(lo)}")
            continue
        for axis, (a, v, b) in enumerate(zip(lo, shape, hi)):
            if not a <= v <= b:
                problems.append(f"{name}[{axis}]={v} outside [{a}, {b}]")
    return problems
