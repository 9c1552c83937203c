"""``trt`` backend: TensorRT engines with device-resident buffers and named bindings.

Every buffer is a CUDA torch tensor owned by the pipeline (KV caches live on the GPU
for the whole call; a step reads a prefix view and writes its new K/V into the next
slots: no host round trips). Per call: ``set_input_shape`` + ``set_tensor_address``
for every binding, then ``execute_async_v3`` on the current torch stream, the pattern
of NVIDIA's TensorRT diffusion demos. Optional CUDA-graph replay for repeated calls
with identical shapes and addresses (the iterations of one Jacobi chunk). ``close()`` frees
the captured graphs, the execution contexts, the engines and the runtime, in that order.

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


class TrtRunner(GraphRunner):
    def __init__(self, spec: GraphSpec, engine, device: torch.device, cuda_graphs: bool):
        super().__init__(spec)
        self.engine = engine
        self.context = engine.create_execution_context()
        self.device = device
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        raw = torch.zeros(2 * ALIGNMENT, dtype=torch.uint8, device=device)
        self._dummy = raw[_pad(raw.data_ptr()):]       # a valid, aligned address for empty tensors (P = 0)
        self._scratch: dict[str, torch.Tensor] = {}   # per IO name: aligned bytes for a misaligned binding

    def _staged(self, inputs: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]):
        """The tensors to bind: each one itself when aligned, else this runner's aligned scratch of its
        shape (KV-cache slot views and token slices start anywhere in their buffer). Returns
        (inputs, outputs, [(scratch, output)] to copy back after the run); inputs are copied in here."""
        bound_in = {name: self._aligned(name, t, copy_in=True) for name, t in inputs.items()}
        bound_out = {name: self._aligned(name, t, copy_in=False) for name, t in outputs.items()}
        back = [(bound_out[name], t) for name, t in outputs.items() if bound_out[name] is not t]
        return bound_in, bound_out, back

    def _aligned(self, name: str, t: torch.Tensor, copy_in: bool) -> torch.Tensor:
        if t.numel() == 0 or t.data_ptr() % ALIGNMENT == 0:
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

    def _bind(self, inputs: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]) -> None:
        ctx = self.context
        for name, t in inputs.items():
            if t.device != self.device:
                raise StarflowError(f"trt input {name!r} is on {t.device}, expected {self.device}")
            if not ctx.set_input_shape(name, tuple(t.shape)):  # False: not an input, or outside the profile
                raise StarflowError(f"TensorRT refused shape {tuple(t.shape)} for {name!r} of {self.spec.name}: "
                                    "outside the engine's optimisation profile; rebuild with a wider --shape")
            self._address(name, t)
        for name, t in outputs.items():
            self._address(name, t)

    def _address(self, name: str, t: torch.Tensor) -> None:
        if not self.context.set_tensor_address(name, t.data_ptr() if t.numel() else self._dummy.data_ptr()):
            raise StarflowError(f"TensorRT refused the address of {name!r} for {self.spec.name} (not a tensor of "
                                "the engine: see the TensorRT log); rebuild the engine")

    def _execute(self, stream_handle: int, what: str) -> None:
        if not self.context.execute_async_v3(stream_handle):
            raise StarflowError(f"TensorRT execution of {self.spec.name} failed{what} (see the TensorRT log above)")

    def infer_impl(self, inputs: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]) -> None:
        inputs, outputs, back = self._staged(inputs, outputs)
        self._run(inputs, outputs)
        for scratch, out in back:
            out.copy_(scratch)

    def _run(self, inputs: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]) -> None:
        stream = torch.cuda.current_stream(self.device)
        key = None
        if self.cuda_graphs:
            key = tuple((n, tuple(t.shape), t.data_ptr()) for n, t in (*inputs.items(), *outputs.items()))
            graph = self._graphs.get(key)
            if graph is not None:
                graph.replay()
                return
        self._bind(inputs, outputs)
        if key is None:
            self._execute(stream.cuda_stream, "")
            return
        # first call with these shapes/addresses: run once (lazy init), then capture for replays
        self._execute(stream.cuda_stream, "")
        graph = torch.cuda.CUDAGraph()
        capture = torch.cuda.Stream(self.device)
        capture.wait_stream(stream)
        with torch.cuda.graph(graph, stream=capture):
            self._execute(capture.cuda_stream, " while capturing a CUDA graph (retry without --cuda-graphs)")
        stream.wait_stream(capture)
        self._graphs[key] = graph

    def _drop_graphs(self) -> None:
        if self._graphs:
            torch.cuda.synchronize(self.device)   # no replay may still be in flight
            for graph in self._graphs.values():
                graph.reset()
            self._graphs.clear()

    def close(self) -> None:
        """Free the captured CUDA graphs, then the execution context (its activation memory)."""
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
        return TrtRunner(spec, engine, self.device, self.cuda_graphs)

    def release(self) -> None:
        self.runtime = None   # after every engine and context of it (closed by Backend.close)

    def describe(self) -> dict:
        return {"backend": self.name, "device": f"{self.device_info.name} (sm {self.device_info.compute_capability})",
                "tensorrt": self.trt.__version__, "cuda_graphs": self.cuda_graphs}
