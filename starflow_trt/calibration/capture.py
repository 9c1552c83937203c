"""Capture the real inputs of every graph while the runtime samples (and scores its samples).

A :class:`CaptureBackend` wraps any backend; each graph call's inputs (tokens,
KV caches, Jacobi iterates, RoPE rows …) are copied into a per-graph reservoir
(uniform sample of at most ``max_calls`` calls, seeded), then written as
size-bounded ``.npz`` shards: ``DIR/<graph>/shard_0000.npz`` holding entries
``<call>/<input name>``.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence

import numpy as np
import torch

from ..export.manifest import GraphSpec
from ..runtime.backends.base import Backend, GraphRunner

Call = dict[str, np.ndarray]


class CallReservoir:
    """Uniform reservoir sample of graph calls, per graph (Vitter's algorithm R)."""

    def __init__(self, max_calls: int, seed: int = 0):
        self.max_calls = max_calls
        self.rng = random.Random(seed)
        self.calls: dict[str, list[Call]] = {}
        self.seen: dict[str, int] = {}

    def offer(self, graph: str, inputs: Mapping[str, torch.Tensor]) -> None:
        n = self.seen.get(graph, 0)
        self.seen[graph] = n + 1
        bucket = self.calls.setdefault(graph, [])
        if len(bucket) < self.max_calls:
            bucket.append({k: v.detach().cpu().numpy().copy() for k, v in inputs.items()})
            return
        j = self.rng.randrange(n + 1)
        if j < self.max_calls:
            bucket[j] = {k: v.detach().cpu().numpy().copy() for k, v in inputs.items()}


class _CaptureRunner(GraphRunner):
    def __init__(self, inner: GraphRunner, reservoir: CallReservoir):
        super().__init__(inner.spec)
        self.inner = inner
        self.reservoir = reservoir

    def infer_impl(self, inputs, outputs) -> None:   # checked by run() already
        self.reservoir.offer(self.spec.name, inputs)
        self.inner.infer_impl(inputs, outputs)

    def close(self) -> None:
        super().close()
        self.inner.close()


class CaptureBackend(Backend):
    """Delegates to ``inner`` and records every call's inputs into ``reservoir``."""

    def __init__(self, inner: Backend, reservoir: CallReservoir):
        super().__init__()
        self.inner = inner
        self.reservoir = reservoir
        self.name = f"capture({inner.name})"
        self.device = inner.device

    def load_impl(self, spec: GraphSpec) -> GraphRunner:
        return _CaptureRunner(self.inner.load(spec), self.reservoir)

    def describe(self) -> dict:
        return self.inner.describe()


@dataclass
class CaptureSet:
    """Captured calls per graph, in memory or read back from shards."""

    calls: dict[str, list[Call]] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)

    def save(self, directory: Path, shard_bytes: int = 64 << 20) -> dict:
        """Write size-bounded shards; returns the index written to ``directory/index.json``."""
        directory.mkdir(parents=True, exist_ok=True)
        index = {"shard_bytes": shard_bytes, "graphs": {}}
        for graph, calls in self.calls.items():
            gdir = directory / graph
            gdir.mkdir(exist_ok=True)
            shards, current, size = [], {}, 0
            for i, call in enumerate(calls):
                nbytes = sum(a.nbytes for a in call.values())
                if current and size + nbytes > shard_bytes:
                    shards.append(_write_shard(gdir, len(shards), current))
                    current, size = {}, 0
                current.update({f"{i}/{k}": v for k, v in call.items()})
                size += nbytes
            if current:
                shards.append(_write_shard(gdir, len(shards), current))
            index["graphs"][graph] = {"calls": len(calls), "seen": self.seen.get(graph, len(calls)),
                                      "shards": shards}
        (directory / "index.json").write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
        return index

    @classmethod
    def load(cls, directory: Path) -> "CaptureSet":
        index = json.loads((directory / "index.json").read_text(encoding="utf-8"))
        out = cls()
        for graph, info in index["graphs"].items():
            calls: dict[int, Call] = {}
            for shard in info["shards"]:
                with np.load(directory / graph / shard, allow_pickle=False) as data:
                    for key in data.files:
                        i, name = key.split("/", 1)
                        calls.setdefault(int(i), {})[name] = data[key]
            out.calls[graph] = [calls[i] for i in sorted(calls)]
            out.seen[graph] = info["seen"]
        return out

    def split(self, holdout: float = 0.25) -> tuple["CaptureSet", "CaptureSet"]:
        """(calibration, held-out) by call index: every k-th call is held out."""
        cal, held = CaptureSet(seen=dict(self.seen)), CaptureSet(seen=dict(self.seen))
        step = max(2, int(round(1 / holdout))) if holdout > 0 else 0
        for graph, calls in self.calls.items():
            cal.calls[graph] = [c for i, c in enumerate(calls) if not step or i % step != step - 1]
            held.calls[graph] = [c for i, c in enumerate(calls) if step and i % step == step - 1] or calls[-1:]
        return cal, held


def _write_shard(directory: Path, n: int, arrays: dict[str, np.ndarray]) -> str:
    name = f"shard_{n:04d}.npz"
    tmp = directory / f".{name}.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, directory / name)
    return name


def capture_activations(pipe, prompts_y: torch.Tensor, uncond_y: Optional[torch.Tensor], seeds: Sequence[int],
                        guidance: float, jacobi, max_calls: int = 48, seed: int = 0, score: bool = True,
                        progress=None) -> CaptureSet:
    """Generate one video per (prompt, seed) through ``pipe``'s graphs and score the samples,
    recording every graph's inputs. prompts_y [N, L, D]; uncond_y [N, L, D] for guidance."""
    from ..runtime.pipeline import Pipeline

    reservoir = CallReservoir(max_calls, seed)
    capture_pipe = Pipeline(pipe.manifest, CaptureBackend(pipe.backend, reservoir))
    batch = pipe.geo.max_batch
    n = prompts_y.shape[0]
    for i in range(0, n, batch):
        y = prompts_y[i:i + batch]
        u = uncond_y[i:i + batch] if uncond_y is not None else None
        for s in seeds:
            result = capture_pipe.generate(y, u, seed=s, guidance=guidance, jacobi=jacobi)
            if score:
                capture_pipe.score(result.raw, y)
            if progress:
                progress()
    return CaptureSet(calls=reservoir.calls, seen=reservoir.seen)


def iter_feeds(calls: Sequence[Call], names: Sequence[str]) -> Iterator[dict[str, np.ndarray]]:
    """Feeds for ORT in graph input order (skips inputs a graph does not have)."""
    for call in calls:
        yield {n: call[n] for n in names if n in call}
