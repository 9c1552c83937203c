"""The backend interface: load graphs named by the manifest, run them on preallocated tensors.

Every buffer the runtime hands to a backend is a contiguous ``torch.Tensor`` on
``backend.device`` (CPU tensors for ORT's CPU EP, CUDA tensors for TensorRT or
ORT's CUDA/TensorRT EPs). Inputs and outputs are bound by name and address, so
KV caches are never copied between steps: a step reads a prefix view of the
cache and writes its new entries straight into the next slots.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator, Mapping, Optional

import torch

from ...export.manifest import GraphSpec

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "int64": torch.int64, "int32": torch.int32, "int8": torch.int8, "bool": torch.bool}


class GraphRunner(ABC):
    """One loaded graph."""

    def __init__(self, spec: GraphSpec):
        self.spec = spec

    @abstractmethod
    def run(self, inputs: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]) -> None:
        """Run once. ``inputs``/``outputs``: every graph input/output by name, contiguous,
        on the backend's device, outputs preallocated with their exact shapes."""


class Backend(ABC):
    """Loads graphs for one execution engine."""

    name: str = "?"
    device: torch.device = torch.device("cpu")
    #: torch threads for the runtime's own tensor ops while this backend runs graphs (None: leave as is)
    host_threads: Optional[int] = None

    @contextmanager
    def host_thread_limit(self) -> Iterator[None]:
        """Limit torch's threads to ``host_threads`` for the duration (restored after)."""
        before = torch.get_num_threads()
        if self.host_threads:
            torch.set_num_threads(self.host_threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    @abstractmethod
    def load(self, spec: GraphSpec) -> GraphRunner:
        """Prepare ``spec`` for running (parse, build or deserialize)."""

    def describe(self) -> dict:
        return {"backend": self.name, "device": str(self.device)}


class CallStats:
    """Calls and wall seconds per graph (what ``result.stats`` reports)."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = defaultdict(int)
        self.seconds: dict[str, float] = defaultdict(float)

    def timed(self, runner: GraphRunner, inputs, outputs) -> None:
        start = time.perf_counter()
        runner.run(inputs, outputs)
        self.seconds[runner.spec.name] += time.perf_counter() - start
        self.calls[runner.spec.name] += 1
