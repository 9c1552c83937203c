"""The backend interface: load graphs named by the manifest, run them on preallocated tensors.

Every buffer the runtime hands to a backend is a contiguous ``torch.Tensor`` on
``backend.device`` (CPU tensors for ORT's CPU EP, CUDA tensors for TensorRT or
ORT's CUDA/TensorRT EPs). Inputs and outputs are bound by name and address, so
KV caches are never copied between steps: a step reads a prefix view of the
cache and writes its new entries straight into the next slots.

A runner checks every call against its manifest entry (names, shapes within the exported
dims, dtypes) the first time it sees a shape signature, so a bad buffer is refused with one
line instead of being bound. ``Backend.close()`` (or ``with backend:``) closes every runner
it loaded: sessions, TensorRT contexts and captured CUDA graphs are freed.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator, Mapping, Optional

import torch

from ...errors import ManifestError, StarflowError
from ...export.dtypes import TORCH_DTYPES
from ...export.manifest import GraphSpec


class GraphRunner(ABC):
    """One loaded graph: ``run`` (= ``infer``) checks the call against the manifest, then ``infer_impl`` runs it.

    The check (:meth:`GraphSpec.check_shapes` on every input and output, plus dtypes) runs once
    per shape signature; later calls with the same shapes pay one set lookup.
    """

    def __init__(self, spec: GraphSpec):
        self.spec = spec
        self.closed = False
        self._checked: set[tuple] = set()
        self._dtypes = {t.name: TORCH_DTYPES.get(t.dtype) for t in (*spec.inputs, *spec.outputs)}

    def io_dtype(self, name: str) -> Optional[torch.dtype]:
        """The dtype this runner takes for input or output ``name``: the manifest's, unless the backend keeps
        it in its own (the torch backend's K/V caches in its ``dtype``); None where any is accepted."""
        return self._dtypes[name]

    def run(self, inputs: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]) -> None:
        """Run once. ``inputs``/``outputs``: every graph input/output by name, contiguous,
        on the backend's device, outputs preallocated with their exact shapes."""
        if self.closed:
            raise StarflowError(f"graph {self.spec.name!r} was used after its backend was closed")
        key = (*((n, t.shape, t.dtype) for n, t in inputs.items()), None,
               *((n, t.shape, t.dtype) for n, t in outputs.items()))
        if key not in self._checked:
            self.check(inputs, outputs)
            self._checked.add(key)
        self.infer_impl(inputs, outputs)

    def infer(self, inputs: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]
              ) -> Mapping[str, torch.Tensor]:
        """:meth:`run`, returning ``outputs`` (polygraphy's ``infer`` spelling)."""
        self.run(inputs, outputs)
        return outputs

    def check(self, inputs: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]) -> None:
        """Raise ManifestError if names, shapes or dtypes break the graph's manifest entry."""
        self.spec.check_shapes({k: tuple(v.shape) for k, v in inputs.items()},
                               {k: tuple(v.shape) for k, v in outputs.items()})
        for name, t in (*inputs.items(), *outputs.items()):
            want = self._dtypes[name]
            if want is not None and t.dtype != want:
                raise ManifestError(f"graph {self.spec.name!r}: {name!r} is {t.dtype}, the manifest says {want}")

    @abstractmethod
    def infer_impl(self, inputs: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]) -> None:
        """Run once on checked buffers (what a backend implements)."""

    def close(self) -> None:
        """Release what the runner holds (sessions, contexts, captured graphs); idempotent."""
        self.closed = True


class Backend(ABC):
    """Loads graphs for one execution engine; ``close()`` (or ``with backend:``) frees every loaded graph."""

    name: str = "?"
    device: torch.device = torch.device("cpu")
    #: torch threads for the runtime's own tensor ops while this backend runs graphs (None: leave as is)
    host_threads: Optional[int] = None

    def __init__(self) -> None:
        self._runners: list[GraphRunner] = []
        self._closed = False

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

    def load(self, spec: GraphSpec) -> GraphRunner:
        """Prepare ``spec`` for running; the backend keeps the runner to close it."""
        if self._closed:
            raise StarflowError(f"backend {self.name!r} is closed; make a new one")
        runner = self.load_impl(spec)
        self._runners.append(runner)
        return runner

    @abstractmethod
    def load_impl(self, spec: GraphSpec) -> GraphRunner:
        """Parse, build or deserialize ``spec`` (what a backend implements)."""

    def close(self) -> None:
        """Close every runner this backend loaded, then release the backend's own resources; idempotent."""
        runners, self._runners = self._runners, []
        for runner in runners:
            runner.close()
        if not self._closed:
            self._closed = True
            self.release()

    def release(self) -> None:
        """Backend-wide resources to free on close (TensorRT runtime, ...)."""

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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
