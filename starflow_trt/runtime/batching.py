"""Batches larger than an export's ``max_batch``: chunk bounds and the merged stats of chunked calls.

A call on B > max_batch samples runs once per chunk of at most ``max_batch`` rows, in order; its
result is the concatenation of the chunk results (exactly what calling on each chunk gives).
"""

from __future__ import annotations

from typing import Optional

import torch


def chunk_bounds(batch: int, max_batch: int) -> list[tuple[int, int]]:
    """[(start, end), ...] rows of each chunk: ``max_batch`` rows each, the last one shorter."""
    return [(s, min(s + max_batch, batch)) for s in range(0, batch, max_batch)]


def rows(value: Optional[torch.Tensor], start: int, end: int) -> Optional[torch.Tensor]:
    return None if value is None else value[start:end]


def _add(into: dict, more: dict) -> dict:
    for k, v in more.items():
        into[k] = round(into.get(k, 0) + v, 6) if isinstance(v, float) else into.get(k, 0) + v
    return into


def merge_stats(parts: list[dict], batch: int) -> dict:
    """Stats of a chunked generate: counts and seconds summed over chunks, the first chunk's
    time to first frame, every chunk's Jacobi traces in order, and each chunk's own stats in ``chunks``."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    merged = {**first, "graph_calls": {}, "graph_seconds": {}, "seconds": {}, "total_graph_calls": 0,
              "kv_allocations": 0, "jacobi": [], "batch": batch,
              "request": {**first["request"], "batch": batch, "chunks": len(parts)}}
    for p in parts:
        _add(merged["graph_calls"], p["graph_calls"])
        _add(merged["graph_seconds"], p["graph_seconds"])
        _add(merged["seconds"], p["seconds"])
        merged["total_graph_calls"] += p["total_graph_calls"]
        merged["kv_allocations"] += p["kv_allocations"]
        merged["jacobi"].extend(p["jacobi"])
    merged["chunks"] = [{k: p[k] for k in ("batch", "seconds", "total_graph_calls", "time_to_first_frame")}
                        for p in parts]
    return merged
