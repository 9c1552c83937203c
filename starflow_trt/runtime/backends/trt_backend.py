"""``trt`` backend: TensorRT engines with device-resident buffers and named bindings.

Every buffer is a CUDA torch tensor owned by the pipeline (KV caches live on the GPU
for the whole call; a step reads a prefix view and writes its new K/V into the next
slots: no host round trips). Per call: ``set_input_shape`` + ``set_tensor_address``
for every binding, then ``execute_async_v3`` on the backend's own CUDA stream (ordered after
the caller's stream and before its next op), the pattern of NVIDIA's TensorRT diffusion demos.
Optional CUDA-graph replay for repeated calls with identical shapes and addresses (the
iterations of one Jacobi chunk), each graph on an execution context of its own that is never
re-shaped (:class:`_Captured`). ``close()`` frees the captured graphs and their contexts, the
execution contexts, the engines and the runtime, in that order.

Written against the TensorRT 10/11 Python API documentation. Without a GPU, its code paths
run in tests/test_fake_tensorrt.py under a recording fake of that documented API (buffers in
host memory, the engines executed by ONNX Runtime): that checks the bind / execute / capture
plumbing, never TensorRT itself. ``pytest -m gpu`` verifies it on a machine that has one.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ...errors import BackendUnavailable, StarflowError
from ...export.manifest import GraphSpec, Manifest
from .base import Backend, GraphRunner

#: where the engines' buffers live: CUDA device 0, the GPU that ``cuda_device()`` describes
DEVICE = torch.device("cuda", 0)
#: ``setTensorAddress``: "The pointer must have at least 256-byte alignment."
ALIGNMENT = 256


def check_engine_io(spec: GraphSpec, engine, trt) -> None:
    """Refuse an engine whose IO tensors (names, input / output) are not the manifest entry's."""
    mode = {engine.get_tensor_name(i): engine.get_tensor_mode(engine.get_tensor_name(i))
            for i in range(engine.num_io_tensors)}
    want = {**{t.name: trt.TensorIOMode.INPUT for t in spec.inputs},
            **{t.name: trt.TensorIOMode.OUTPUT for t in spec.outputs}}
    if mode != want:
        diff = sorted(set(mode.items()) ^ set(want.items()), key=str)
        raise StarflowError(f"engine {spec.path.name} does not have the IO tensors the manifest names for "
                            f"{spec.name!r} (differs in {', '.join(str(n) for n, _ in diff)}); rebuild it "
                            "with `starflow-trt build`")


#: captured CUDA graphs a runner keeps (each with its own execution context); the least recently used goes
MAX_CAPTURED = 8
#: keys a runner remembers having run once (forgotten all at once past this: a long serving process)
MAX_SEEN = 4096


class _Captured:
    """One CUDA graph and the execution context it was captured on, bound once to one shape/address key.

    Why a context of its own: a captured graph holds the kernels TensorRT chose for the context's
    shapes at capture time; re-shaping that context (``set_input_shape``) and replaying the graph is
    not a documented use (NVIDIA's diffusion demo keeps static shapes, one graph per engine). A
    captured context is never re-shaped or re-bound, so every replay runs what was captured.
    """

    def __init__(self, context, graph):
        self.context, self.graph = context, graph


class TrtRunner(GraphRunner):
    """One engine. Plain calls run on ``self.context`` (re-shaped per call). With ``cuda_graphs``, a key
    (input shapes + every bound address) seen a second time gets its own context, bound once and
    captured; later calls with that key replay it (the iterations of one Jacobi chunk)."""

    def __init__(self, spec: GraphSpec, engine, device: torch.device, stream: "torch.cuda.Stream",
                 cuda_graphs: bool):
        super().__init__(spec)
        self.engine = engine
        self.context = engine.create_execution_context()
        self.device = device
        self.stream = stream   # the backend's own stream: never the default (legacy, synchronising) stream
        self.cuda_graphs = cuda_graphs
        self._captured: dict[tuple, _Captured] = {}   # insertion order = least recently used first
        self._seen: set[tuple] = set()               # keys run once (captured when they repeat)
        raw = torch.zeros(2 * ALIGNMENT, dtype=torch.uint8, device=device)
        self._dummy = raw[_pad(raw.data_ptr()):]       # a valid, aligned address for empty tensors (P = 0)
        self._scratch: dict[str, torch.Tensor] = {}   # per IO name: aligned contiguous bytes for a binding

    def _staged(self, inputs: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]):
        """The tensors to bind: each one itself when contiguous and aligned, else this runner's aligned
        scratch of its shape (KV-cache slot views and token slices start anywhere in their buffer; a strided
        view has no single address TensorRT could read densely). Returns (inputs, outputs, [(scratch, output)]
        to copy back after the run); inputs are copied in here."""
        bound_in = {name: self._aligned(name, t, copy_in=True) for name, t in inputs.items()}
        bound_out = {name: self._aligned(name, t, copy_in=False) for name, t in outputs.items()}
        back = [(bound_out[name], t) for name, t in outputs.items() if bound_out[name] is not t]
        return bound_in, bound_out, back

    def _aligned(self, name: str, t: torch.Tensor, copy_in: bool) -> torch.Tensor:
        if t.numel() == 0 or (t.data_ptr() % ALIGNMENT == 0 and t.is_contiguous()):
            return t
        nbytes = t.numel() * t.element_size()
        buf = self._scratch.get(name)
        if buf is None or buf.numel() < nbytes:
            self._drop_graphs()   # a captured graph may hold the old scratch address
            raw = torch.empty(nbytes + ALIGNMENT, dtype=torch.uint8, device=t.device)
            buf = self._scratch[name] = raw[_pad(raw.data_ptr()):][:nbytes]
        view = buf[:nbytes].view(t.dtype).view(t.shape)
        if copy_in:
            view.copy_(t)
        return view

    def _bind(self, ctx, inputs: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]) -> None:
        for name, t in inputs.items():
            if t.device != self.device:
                raise StarflowError(f"trt input {name!r} is on {t.device}, expected {self.device}")
            if not ctx.set_input_shape(name, tuple(t.shape)):  # False: not an input, or outside the profile
                raise StarflowError(f"TensorRT refused shape {tuple(t.shape)} for {name!r} of {self.spec.name}: "
                                    "outside the engine's optimisation profile; rebuild with a wider --shape")
            self._address(ctx, name, t)
        for name, t in outputs.items():
            self._address(ctx, name, t)

    def _address(self, ctx, name: str, t: torch.Tensor) -> None:
        if not ctx.set_tensor_address(name, t.data_ptr() if t.numel() else self._dummy.data_ptr()):
            raise StarflowError(f"TensorRT refused the address of {name!r} for {self.spec.name} (not a tensor of "
                                "the engine: see the TensorRT log); rebuild the engine")

    def _execute(self, ctx, what: str) -> None:
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise StarflowError(f"TensorRT execution of {self.spec.name} failed{what} (see the TensorRT log above)")

    def infer_impl(self, inputs: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]) -> None:
        inputs, outputs, back = self._staged(inputs, outputs)
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)   # the inputs (and scratch copies) were written on the caller's stream
        self._run(inputs, outputs)
        current.wait_stream(self.stream)   # the caller's next op reads the outputs
        for scratch, out in back:
            out.copy_(scratch)

    def _run(self, inputs: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]) -> None:
        if not self.cuda_graphs:
            self._bind(self.context, inputs, outputs)
            self._execute(self.context, "")
            return
        key = tuple((n, tuple(t.shape), t.data_ptr()) for n, t in (*inputs.items(), *outputs.items()))
        captured = self._captured.pop(key, None)
        if captured is not None:
            self._captured[key] = captured   # most recently used
            with torch.cuda.stream(self.stream):
                captured.graph.replay()
            return
        if key not in self._seen:   # a first sight: run plainly, capture only if the key repeats
            if len(self._seen) >= MAX_SEEN:
                self._seen.clear()
            self._seen.add(key)
            self._bind(self.context, inputs, outputs)
            self._execute(self.context, "")
            return
        self._capture(key, inputs, outputs)

    def _capture(self, key: tuple, inputs: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]) -> None:
        """A context of its own for ``key``: bound once, run once (TensorRT's lazy initialisation happens
        outside the capture; its outputs are this call's), then captured on the runner's stream, which records
        the work without running it."""
        if len(self._captured) >= MAX_CAPTURED:
            self._free(self._captured.pop(next(iter(self._captured))))
        ctx = self.engine.create_execution_context()
        self._bind(ctx, inputs, outputs)
        self._execute(ctx, "")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):
            self._execute(ctx, " while capturing a CUDA graph (retry without --cuda-graphs)")
        self._captured[key] = _Captured(ctx, graph)

    def _free(self, captured: _Captured) -> None:
        torch.cuda.synchronize(self.device)   # no replay may still be in flight
        captured.graph.reset()
        captured.context = None

    def _drop_graphs(self) -> None:
        while self._captured:
            self._free(self._captured.popitem()[1])
        self._seen.clear()

    def close(self) -> None:
        """Free the captured CUDA graphs and their contexts, then the plain execution context."""
        super().close()
        self._drop_graphs()
        self.context = None
        self.engine = None
        self._dummy = None
        self._scratch.clear()


def _pad(address: int) -> int:
    """Bytes from ``address`` to the next ``ALIGNMENT`` boundary."""
    return -address % ALIGNMENT


class TrtBackend(Backend):
    """Deserializes ``<graph>.engine`` files of an engine directory (``starflow-trt build``)."""

    name = "trt"

    def __init__(self, manifest: Manifest, cuda_graphs: bool = False):
        from ...engine.build import _tensorrt, cuda_device

        super().__init__()
        try:
            self.trt = _tensorrt()
            self.device_info = cuda_device()
        except BackendUnavailable as exc:  # the engine builder's message suggests build --dry-run: not for running
            raise BackendUnavailable("backend 'trt' runs TensorRT engines and needs TensorRT and an NVIDIA GPU, "
                                     "which this machine lacks; use --backend ort here (`starflow-trt doctor` "
                                     "shows what is usable)") from exc
        if "engines" not in manifest.extra:
            raise BackendUnavailable(f"{manifest.root} holds ONNX graphs, not engines; run "
                                     "`starflow-trt build DIR -o ENGINES` and pass that directory")
        self.device = DEVICE
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.runtime = self.trt.Runtime(self.logger)
        self.cuda_graphs = cuda_graphs
        self.stream = torch.cuda.Stream(self.device)   # every engine of this backend runs on it, in order

    def load_impl(self, spec: GraphSpec) -> GraphRunner:
        from ...engine.metadata import EngineMetadata, check_engine_metadata

        # the metadata written beside the engine must match the graph the manifest names,
        # this GPU and this TensorRT
        meta = EngineMetadata.load(spec.root / f"{spec.name}.engine.json")
        check_engine_metadata(meta, spec.extra["engine"]["graph_sha256"], self.device_info, self.trt.__version__)
        engine = self.runtime.deserialize_cuda_engine(spec.path.read_bytes())
        if engine is None:
            raise StarflowError(f"TensorRT could not deserialize {spec.path}; rebuild it")
        check_engine_io(spec, engine, self.trt)
        return TrtRunner(spec, engine, self.device, self.stream, self.cuda_graphs)

    def release(self) -> None:
        self.runtime = None   # after every engine and context of it (closed by Backend.close)

    def describe(self) -> dict:
        return {"backend": self.name, "device": f"{self.device_info.name} (sm {self.device_info.compute_capability})",
                "tensorrt": self.trt.__version__, "cuda_graphs": self.cuda_graphs}
