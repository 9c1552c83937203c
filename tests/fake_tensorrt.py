"""A recording fake of the documented TensorRT Python API (and of the torch.cuda calls the ``trt`` backend makes).

TEST-ONLY. Nothing here is TensorRT: no engine is optimised, no GPU runs, and no figure it produces
is a TensorRT result. It exists so that ``engine/build.py`` and ``runtime/backends/trt_backend.py``
execute in CI on a machine without a GPU, line for line as they would under TensorRT, while the fake
checks the contracts the TensorRT 10 / 11 documentation states:

* ``OnnxParser.parse_from_file`` fails (False, with errors) on an op, an op's data type or an opset
  outside the parser's support table for the fake's version (``starflow_trt/engine/trt_onnx_support.json``,
  from onnx-tensorrt's docs/operators.md, read through ``engine/ops.py``), and, for a strongly typed
  network, on an op whose inputs mix float dtypes (no implicit conversions there);
* ``IOptimizationProfile.set_shape``: ``len(min) == len(opt) == len(max) == rank`` and
  ``0 <= min <= opt <= max`` (else ``RuntimeError``, as the Python bindings raise it in 10.x and
  11.x: pyCore.cpp turns a false ``setDimensions`` into RuntimeError), fixed dims equal; ``build_serialized_network``
  fails (``None``) when a dynamic input has no profile, or when a strongly typed network is given
  precision flags (FP16 / BF16 / INT8);
* ``IExecutionContext.set_input_shape`` returns False for a name that is not an engine input or a
  shape outside profile 0; ``set_tensor_address`` returns False for a name that is not an IO
  tensor of the engine; ``execute_async_v3`` returns False unless every input shape
  (``infer_shapes() == []``) and every IO tensor address is set;
* the stream handle passed to ``execute_async_v3`` is an ``int`` of a stream that exists; inside a
  CUDA-graph capture work on the capturing stream is recorded, not run (replay runs it on the
  addresses captured), and work on another stream fails as CUDA does;
* a captured graph replayed after its execution context was given other input shapes fails
  (:class:`FakeError`): what was captured were kernels for the shapes at capture time, and
  replaying them on a re-shaped context is nothing TensorRT documents.

Engines: ``build_serialized_network`` returns a plan that is a magic header, a JSON description
(IO tensors, profile, flags, the TensorRT version) and the ONNX bytes; ``deserialize_cuda_engine``
refuses anything else (and plans of another version). A context executes by running the same ONNX
on ONNX Runtime's CPU EP, reading inputs from and writing outputs to the bound addresses (the
buffers are host tensors; their ``data_ptr()`` stands for device pointers). Output shapes are
inferred from the ONNX dims and checked against what ORT produced before anything is written.

:func:`install` puts the fake ``tensorrt`` module into ``sys.modules`` and patches ``torch.cuda``
through a pytest ``monkeypatch`` (undone after the test); the package never imports this file.
"""

from __future__ import annotations

import ast
import contextlib
import ctypes
import enum
import hashlib
import json
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

MAGIC = b"FAKE-TENSORRT-PLAN (not a TensorRT engine)\n"
ALIGNMENT = 256   # setTensorAddress: "The pointer must have at least 256-byte alignment."

_NP = {1: np.float32, 10: np.float16, 16: None, 7: np.int64, 6: np.int32, 3: np.int8, 9: np.bool_}  # ONNX elem types


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    BF16 = 7
    INT64 = 8


_TRT_DTYPE = {1: DataType.FLOAT, 10: DataType.HALF, 16: DataType.BF16, 7: DataType.INT64, 6: DataType.INT32,
              3: DataType.INT8, 9: DataType.BOOL}


class NetworkDefinitionCreationFlag(enum.IntEnum):
    EXPLICIT_BATCH = 0   # deprecated, ignored (TensorRT 10)
    STRONGLY_TYPED = 1


class BuilderFlag10(enum.IntEnum):
    FP16 = 0
    INT8 = 1
    DEBUG = 2
    GPU_FALLBACK = 3
    REFIT = 4
    DISABLE_TIMING_CACHE = 5
    TF32 = 6
    BF16 = 17


class BuilderFlag11(enum.IntEnum):   # TensorRT 11: strongly typed only, no precision flags
    DEBUG = 2
    GPU_FALLBACK = 3
    REFIT = 4
    DISABLE_TIMING_CACHE = 5
    TF32 = 6


PRECISION_FLAGS = {"FP16", "BF16", "INT8"}


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0


class FakeError(AssertionError):
    """A documented contract broken in a way TensorRT would not survive either (raised, not returned)."""


# ------------------------------------------------------------------ recording
@dataclass
class Recorder:
    """Everything the code under test asked of the fake, for the tests to assert on."""

    version: str = "10.3.0"
    calls: list[tuple] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)          # what TensorRT would log at ERROR
    misaligned: set[str] = field(default_factory=set)         # IO tensors bound below 256-byte alignment
    executions: int = 0                                       # engine runs (direct + replayed)
    captures: int = 0
    replays: int = 0
    #: ``fail_execute(context, stream_handle, capturing) -> bool``: make ``execute_async_v3`` return False
    fail_execute: Optional[Callable[[Any, int, bool], bool]] = None

    def call(self, *what) -> None:
        self.calls.append(what)

    def named(self, name: str) -> list[tuple]:
        return [c for c in self.calls if c[0] == name]

    def error(self, message: str) -> bool:
        self.errors.append(message)
        return False


# ------------------------------------------------------------------ builder side
class Logger:
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    def __init__(self, min_severity: int = 2):
        self.min_severity = min_severity


class HostMemory(bytes):
    """IHostMemory: a buffer (``bytes(memory)``) with ``nbytes``."""

    @property
    def nbytes(self) -> int:
        return len(self)


@dataclass
class _Tensor:
    name: str
    shape: tuple[int, ...]      # -1: dynamic
    dims: tuple                 # ONNX dims: int or symbolic str
    elem: int

    @property
    def dtype(self) -> DataType:
        return _TRT_DTYPE[self.elem]


def _onnx_io(model) -> tuple[list[_Tensor], list[_Tensor]]:
    def tensors(values):
        out = []
        for v in values:
            dims = tuple(d.dim_param if d.dim_param else d.dim_value for d in v.type.tensor_type.shape.dim)
            out.append(_Tensor(v.name, tuple(-1 if isinstance(d, str) else d for d in dims), dims,
                               v.type.tensor_type.elem_type))
        return out

    inits = {i.name for i in model.graph.initializer}
    return tensors([i for i in model.graph.input if i.name not in inits]), tensors(model.graph.output)


class INetworkDefinition:
    def __init__(self, rec: Recorder, flags: int):
        self.rec, self.flags = rec, flags
        major = int(_STATE["module"].__version__.split(".")[0])   # TensorRT 11: strongly typed networks only
        self.strongly_typed = major >= 11 or bool(flags & (1 << NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        self.inputs: list[_Tensor] = []
        self.outputs: list[_Tensor] = []
        self.onnx: Optional[bytes] = None

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    @property
    def num_outputs(self) -> int:
        return len(self.outputs)


class OnnxParser:
    def __init__(self, network: INetworkDefinition, logger: Logger):
        if not isinstance(network, INetworkDefinition) or not isinstance(logger, Logger):
            raise TypeError("OnnxParser(network, logger): incompatible arguments")
        self.network, self._errors = network, []

    @property
    def num_errors(self) -> int:
        return len(self._errors)

    def get_error(self, index: int) -> str:
        return self._errors[index]

    def parse_from_file(self, path: str) -> bool:
        import onnx

        from starflow_trt.engine.ops import mixed_float_nodes, support_table, unsupported

        if not isinstance(path, str):
            raise TypeError("parse_from_file(model: str)")
        self.network.rec.call("parse_from_file", path)
        try:
            model = onnx.load(path)   # resolves external data next to the file, as the parser does
        except Exception as exc:  # noqa: BLE001
            self._errors.append(f"could not parse {path}: {exc}")
            return False
        table = support_table(_STATE["module"].__version__)
        self._errors += [f"unsupported by the TensorRT {table.version} parser: {what} (x{n})"
                         for what, n in unsupported(model, table)]
        if self.network.strongly_typed:
            self._errors += [f"strongly typed network: inputs of mixed float types at {node}"
                             for node in mixed_float_nodes(model)]
        if self._errors:
            return False
        self.network.inputs, self.network.outputs = _onnx_io(model)
        self.network.onnx = model.SerializeToString()
        return True


class IOptimizationProfile:
    def __init__(self):
        self.shapes: dict[str, tuple] = {}

    def set_shape(self, input: str, min, opt, max) -> None:  # noqa: A002 (TensorRT's parameter names)
        lo, mid, hi = (tuple(int(v) for v in s) for s in (min, opt, max))
        if not len(lo) == len(mid) == len(hi):
            raise RuntimeError(f"set_shape({input!r}): ranks of min/opt/max differ")
        if not all(0 <= a <= b <= c for a, b, c in zip(lo, mid, hi)):
            raise RuntimeError(f"set_shape({input!r}): need 0 <= min <= opt <= max, got {lo} {mid} {hi}")
        self.shapes[input] = (lo, mid, hi)

    def get_shape(self, input: str) -> list:  # noqa: A002
        return list(self.shapes.get(input, ()))


class ITimingCache:
    def __init__(self, entries: list[str]):
        self.entries = list(entries)

    def serialize(self) -> HostMemory:
        return HostMemory(b"FAKE-TIMING-CACHE\n" + json.dumps(self.entries).encode())


class IBuilderConfig:
    def __init__(self, rec: Recorder, flag_enum):
        self.rec, self._flag_enum = rec, flag_enum
        self.flags: set[str] = set()
        self.pool_limits: dict[int, int] = {}
        self.profiles: list[IOptimizationProfile] = []
        self._opt_level = 3
        self._cache: Optional[ITimingCache] = None

    @property
    def builder_optimization_level(self) -> int:
        return self._opt_level

    @builder_optimization_level.setter
    def builder_optimization_level(self, level: int) -> None:
        if not isinstance(level, int) or not 0 <= level <= 5:
            raise ValueError(f"builder_optimization_level must be 0-5, got {level!r}")
        self._opt_level = level

    def set_memory_pool_limit(self, pool, pool_size: int) -> None:
        if not isinstance(pool, MemoryPoolType) or not isinstance(pool_size, int) or pool_size <= 0:
            raise TypeError(f"set_memory_pool_limit(pool: MemoryPoolType, pool_size: int > 0), got {pool!r}, "
                            f"{pool_size!r}")
        self.pool_limits[int(pool)] = pool_size

    def set_flag(self, flag) -> None:
        if not isinstance(flag, self._flag_enum):
            raise TypeError(f"set_flag(flag: BuilderFlag), got {flag!r}")
        self.rec.call("set_flag", flag.name)
        self.flags.add(flag.name)

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        if not isinstance(profile, IOptimizationProfile) or not profile.shapes:
            return -1
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, serialized_timing_cache: bytes) -> ITimingCache:
        data = bytes(serialized_timing_cache)
        self.rec.call("create_timing_cache", data)
        if not data:   # documented: b"" creates a new cache
            return ITimingCache([])
        head = b"FAKE-TIMING-CACHE\n"
        if not data.startswith(head):
            raise FakeError("create_timing_cache got bytes that no (fake) builder serialized")
        return ITimingCache(json.loads(data[len(head):]))

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        if not isinstance(cache, ITimingCache):
            raise TypeError("set_timing_cache(cache: ITimingCache, ignore_mismatch: bool)")
        self._cache = cache
        return True

    def get_timing_cache(self) -> Optional[ITimingCache]:
        return self._cache


class Builder:
    def __init__(self, logger: Logger):
        if not isinstance(logger, Logger):
            raise TypeError("Builder(logger: ILogger)")
        self.rec: Recorder = _STATE["rec"]

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        if not isinstance(flags, int) or isinstance(flags, bool):
            raise TypeError(f"create_network(flags: int), got {flags!r}")
        if flags >> (max(NetworkDefinitionCreationFlag) + 1):
            raise FakeError(f"create_network: unknown NetworkDefinitionCreationFlag bits in {flags:#x}")
        self.rec.call("create_network", flags)
        return INetworkDefinition(self.rec, flags)

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig(self.rec, _STATE["module"].BuilderFlag)

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> Optional[HostMemory]:
        rec = self.rec
        if network.onnx is None:
            rec.error("build_serialized_network: nothing was parsed into the network")
            return None
        if len(config.profiles) != 1:
            rec.error(f"build_serialized_network: {len(config.profiles)} optimisation profiles (expected 1)")
            return None
        shapes = config.profiles[0].shapes
        by_name = {t.name: t for t in network.inputs}
        for name in shapes:
            if name not in by_name:
                rec.error(f"profile names {name!r}, which is not a network input")
                return None
        for t in network.inputs:
            if -1 in t.shape and t.name not in shapes:
                rec.error(f"dynamic input {t.name!r} has no profile shape (set_shape must be called for it)")
                return None
            if t.name in shapes:
                lo, opt, hi = shapes[t.name]
                if len(lo) != len(t.shape) or any(d != -1 and not a == b == c == d
                                                  for a, b, c, d in zip(lo, opt, hi, t.shape)):
                    rec.error(f"profile of {t.name!r} {shapes[t.name]} disagrees with its dims {t.shape}")
                    return None
        if network.strongly_typed and config.flags & PRECISION_FLAGS:
            rec.error(f"strongly typed network: precision flags {sorted(config.flags & PRECISION_FLAGS)} "
                      "are not allowed")
            return None
        cache = config.get_timing_cache()
        if cache is not None:
            cache.entries.append(hashlib.sha256(network.onnx).hexdigest()[:16])
        header = {"tensorrt": _STATE["module"].__version__, "strongly_typed": network.strongly_typed,
                  "flags": sorted(config.flags), "opt_level": config.builder_optimization_level,
                  "workspace": config.pool_limits.get(int(MemoryPoolType.WORKSPACE)),
                  "profile": {k: [list(s) for s in v] for k, v in shapes.items()},
                  "inputs": [[t.name, list(t.dims), t.elem] for t in network.inputs],
                  "outputs": [[t.name, list(t.dims), t.elem] for t in network.outputs]}
        rec.call("build_serialized_network", header)
        blob = json.dumps(header).encode()
        return HostMemory(MAGIC + len(blob).to_bytes(8, "little") + blob + network.onnx)


# ------------------------------------------------------------------ runtime side
def _eval_dim(expr, env: dict[str, int]) -> int:
    """An ONNX symbolic dim ("s27", "s0*s27*s53", 4) under the bindings of the input shapes; -1 if unknown."""
    if isinstance(expr, int):
        return expr

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            return env[node.id]
        if isinstance(node, ast.BinOp):
            a, b = ev(node.left), ev(node.right)
            ops = {ast.Add: a + b, ast.Sub: a - b, ast.Mult: a * b}
            if type(node.op) in ops:
                return ops[type(node.op)]
            if isinstance(node.op, ast.FloorDiv):
                return a // b
        raise KeyError(expr)

    try:
        return int(ev(ast.parse(expr, mode="eval")))
    except (KeyError, SyntaxError, ZeroDivisionError):
        return -1


class ICudaEngine:
    def __init__(self, rec: Recorder, header: dict, onnx_bytes: bytes):
        self.rec, self.header, self._onnx = rec, header, onnx_bytes
        self.io: dict[str, tuple[TensorIOMode, _Tensor]] = {}
        for mode, key in ((TensorIOMode.INPUT, "inputs"), (TensorIOMode.OUTPUT, "outputs")):
            for name, dims, elem in header[key]:
                dims = tuple(dims)
                self.io[name] = (mode, _Tensor(name, tuple(-1 if isinstance(d, str) else d for d in dims), dims, elem))
        self.profile = {k: tuple(tuple(s) for s in v) for k, v in header["profile"].items()}
        self._session = None

    # the documented name-based queries
    @property
    def num_io_tensors(self) -> int:
        return len(self.io)

    @property
    def num_optimization_profiles(self) -> int:
        return 1

    def get_tensor_name(self, index: int) -> str:
        return list(self.io)[index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return self.io[name][0] if name in self.io else TensorIOMode.NONE

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.io[name][1].shape if name in self.io else ()

    def get_tensor_dtype(self, name: str) -> DataType:
        return self.io[name][1].dtype

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list:
        return [tuple(s) for s in self.profile.get(name, ())] if profile_index == 0 else []

    def create_execution_context(self) -> "IExecutionContext":
        return IExecutionContext(self)

    def session(self):
        if self._session is None:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            opts.add_session_config_entry("session.x64quantprecision", "1")   # exact int8 GEMM, as TensorRT's
            self._session = ort.InferenceSession(self._onnx, opts, providers=["CPUExecutionProvider"])
        return self._session


class Runtime:
    def __init__(self, logger: Logger):
        if not isinstance(logger, Logger):
            raise TypeError("Runtime(logger: ILogger)")
        self.rec: Recorder = _STATE["rec"]

    def deserialize_cuda_engine(self, serialized_engine: bytes) -> Optional[ICudaEngine]:
        data = bytes(serialized_engine)
        self.rec.call("deserialize_cuda_engine", len(data))
        if not data.startswith(MAGIC):
            self.rec.error("deserialize_cuda_engine: not a (fake) TensorRT plan")
            return None
        n = int.from_bytes(data[len(MAGIC):len(MAGIC) + 8], "little")
        start = len(MAGIC) + 8
        header = json.loads(data[start:start + n])
        if header["tensorrt"] != _STATE["module"].__version__:   # plans are only valid for their version
            self.rec.error(f"plan of TensorRT {header['tensorrt']} on {_STATE['module'].__version__}")
            return None
        return ICudaEngine(self.rec, header, data[start + n:])


class IExecutionContext:
    def __init__(self, engine: ICudaEngine):
        self.engine, self.rec = engine, engine.rec
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.captures = 0     # graphs captured on this context
        self.shape_sets = 0   # its first full set of input shapes, then each change of one

    def set_input_shape(self, name: str, shape) -> bool:
        shape = tuple(int(v) for v in shape)
        self.rec.call("set_input_shape", name, shape)
        mode, t = self.engine.io.get(name, (TensorIOMode.NONE, None))
        if mode != TensorIOMode.INPUT:
            return self.rec.error(f"set_input_shape: {name!r} is not an input of the engine")
        if len(shape) != len(t.shape) or any(d != -1 and d != v for d, v in zip(t.shape, shape)):
            return self.rec.error(f"set_input_shape: {name!r} {shape} disagrees with the network dims {t.shape}")
        if name in self.engine.profile:
            lo, _, hi = self.engine.profile[name]
            if not all(a <= v <= b for a, v, b in zip(lo, shape, hi)):
                return self.rec.error(f"set_input_shape: {name!r} {shape} is outside profile 0 [{lo}, {hi}]")
        if self.shapes.get(name) != shape and (name in self.shapes or not self.shapes):
            self.shape_sets += 1
        self.shapes[name] = shape
        return True

    def set_tensor_address(self, name: str, memory: int) -> bool:
        if not isinstance(memory, int):
            raise TypeError(f"set_tensor_address(name: str, memory: int), got {type(memory).__name__}")
        self.rec.call("set_tensor_address", name, memory)
        if name not in self.engine.io:
            return self.rec.error(f"set_tensor_address: {name!r} is not an IO tensor of the engine")
        if memory % ALIGNMENT:
            self.rec.misaligned.add(name)
        self.addresses[name] = memory
        return True

    def get_tensor_address(self, name: str) -> int:
        return self.addresses.get(name, 0)

    def _env(self) -> dict[str, int]:
        env: dict[str, int] = {}
        for name, (mode, t) in self.engine.io.items():
            if mode == TensorIOMode.INPUT and name in self.shapes:
                for d, v in zip(t.dims, self.shapes[name]):
                    if isinstance(d, str):
                        env.setdefault(d, v)
        return env

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        mode, t = self.engine.io.get(name, (TensorIOMode.NONE, None))
        if mode == TensorIOMode.NONE:
            return (-1,)
        if mode == TensorIOMode.INPUT:
            return self.shapes.get(name, t.shape)
        env = self._env()
        return tuple(_eval_dim(d, env) for d in t.dims)

    def infer_shapes(self) -> list[str]:
        return [n for n, (mode, t) in self.engine.io.items()
                if mode == TensorIOMode.INPUT and -1 in t.shape and n not in self.shapes]

    def execute_async_v3(self, stream_handle: int) -> bool:
        rec, cuda = self.rec, _STATE["cuda"]
        if not isinstance(stream_handle, int):
            raise TypeError(f"execute_async_v3(stream_handle: int), got {type(stream_handle).__name__}")
        capturing = cuda.capturing is not None
        rec.call("execute_async_v3", stream_handle, capturing)
        if stream_handle not in cuda.streams:
            return rec.error(f"execute_async_v3: {stream_handle:#x} is not a CUDA stream")
        if capturing and cuda.capturing[1] != stream_handle:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        missing = self.infer_shapes()
        if missing:
            return rec.error(f"execute_async_v3: input shapes not set for {missing}")
        unbound = [n for n in self.engine.io if not self.addresses.get(n)]
        if unbound:
            return rec.error(f"execute_async_v3: no address bound for {unbound}")
        if rec.fail_execute is not None and rec.fail_execute(self, stream_handle, capturing):
            return rec.error("execute_async_v3: injected failure")
        bound = (dict(self.shapes), dict(self.addresses), {n: self.get_tensor_shape(n) for n in self.engine.io})
        if capturing:   # recorded into the graph, run on replay against the captured addresses
            cuda.capturing[0].work.append(lambda: self._replayed(*bound))
            rec.captures += 1
            self.captures += 1
            return True
        self._run(*bound)
        return True

    def _replayed(self, shapes: dict, addresses: dict, inferred: dict) -> None:
        if self.shapes != shapes:
            raise FakeError(f"replay of a CUDA graph captured at input shapes {shapes} on a context re-shaped to "
                            f"{self.shapes} since: the captured kernels are for the old shapes")
        self._run(shapes, addresses, inferred)

    def _view(self, name: str, shape: tuple[int, ...], address: int) -> np.ndarray:
        elem = self.engine.io[name][1].elem
        if _NP.get(elem) is None:
            raise FakeError(f"{name!r}: ONNX element type {elem} has no numpy view here")
        dtype = np.dtype(_NP[elem])
        n = int(np.prod(shape, dtype=np.int64))
        if n == 0:
            return np.empty(shape, dtype)
        buf = (ctypes.c_char * (n * dtype.itemsize)).from_address(address)
        return np.frombuffer(buf, dtype=dtype, count=n).reshape(shape)

    def _run(self, shapes: dict, addresses: dict, inferred: dict) -> None:
        self.rec.executions += 1
        sess = self.engine.session()
        feeds = {n: self._view(n, shapes[n], addresses[n]).copy()
                 for n, (mode, _) in self.engine.io.items() if mode == TensorIOMode.INPUT}
        names = [n for n, (mode, _) in self.engine.io.items() if mode == TensorIOMode.OUTPUT]
        for name, value in zip(names, sess.run(names, feeds)):
            want = inferred[name]
            if -1 in want or tuple(value.shape) != want:   # never write past a buffer sized for `want`
                raise FakeError(f"output {name!r}: ORT produced {value.shape}, the engine infers {want}")
            np.copyto(self._view(name, want, addresses[name]), value)


# ------------------------------------------------------------------ CUDA (the torch.cuda calls of the backend)
class FakeStream:
    def __init__(self, cuda: "FakeCuda", handle: int):
        self._cuda, self.cuda_stream = cuda, handle

    def wait_stream(self, other: "FakeStream") -> None:
        if not isinstance(other, FakeStream):
            raise TypeError("wait_stream(stream: Stream)")
        self._cuda.rec.call("wait_stream", self.cuda_stream, other.cuda_stream)


class FakeCUDAGraph:
    def __init__(self):
        self.work: list[Callable[[], None]] = []
        self.captured = False
        self.freed = False

    def replay(self) -> None:
        if not self.captured or self.freed:
            raise RuntimeError("replay of a CUDA graph that was not captured or was reset")
        _STATE["rec"].replays += 1
        _STATE["rec"].call("replay", _STATE["cuda"].current.cuda_stream)   # torch replays on the current stream
        for run in self.work:
            run()

    def reset(self) -> None:
        self.freed = True
        self.work.clear()


class FakeCuda:
    """The torch.cuda surface the trt backend and ``cuda_device()`` use."""

    def __init__(self, rec: Recorder):
        self.rec = rec
        self.default = FakeStream(self, 0)   # torch's default stream handle is 0
        self.streams: dict[int, FakeStream] = {0: self.default}
        self.current = self.default
        self.capturing: Optional[tuple[FakeCUDAGraph, int]] = None

    def current_stream(self, device=None) -> FakeStream:
        return self.current

    @contextlib.contextmanager
    def stream(self, stream: FakeStream):
        if not isinstance(stream, FakeStream):
            raise TypeError("torch.cuda.stream(stream: Stream)")
        before, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = before

    def Stream(self, device=None) -> FakeStream:  # noqa: N802 (torch's name)
        handle = 0x7000 + 0x10 * len(self.streams)
        self.streams[handle] = FakeStream(self, handle)
        return self.streams[handle]

    @contextlib.contextmanager
    def graph(self, cuda_graph: FakeCUDAGraph, pool=None, stream: Optional[FakeStream] = None,
              capture_error_mode: str = "global"):
        if not isinstance(cuda_graph, FakeCUDAGraph):
            raise TypeError("torch.cuda.graph(cuda_graph: CUDAGraph, ...)")
        if stream is None or stream.cuda_stream == 0:
            raise RuntimeError("CUDA graphs must be captured on a non-default stream")
        if self.capturing is not None:
            raise RuntimeError("a CUDA graph capture is already underway")
        self.capturing = (cuda_graph, stream.cuda_stream)
        before, self.current = self.current, stream   # torch.cuda.graph makes the capture stream current
        try:
            yield
        finally:
            self.capturing, self.current = None, before
        cuda_graph.captured = True

    def synchronize(self, device=None) -> None:
        if self.capturing is not None:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        self.rec.call("synchronize")


_STATE: dict[str, Any] = {}


def make_module(rec: Recorder) -> types.ModuleType:
    """The fake ``tensorrt`` module for ``rec.version`` (10.x: weak typing and precision flags exist; 11.x: not)."""
    mod = types.ModuleType("tensorrt")
    mod.__doc__ = "FAKE tensorrt for tests (tests/fake_tensorrt.py): not TensorRT"
    mod.__version__ = rec.version
    mod.__file__ = __file__
    major = int(rec.version.split(".")[0])
    mod.BuilderFlag = BuilderFlag11 if major >= 11 else BuilderFlag10
    for name, value in dict(Logger=Logger, Builder=Builder, OnnxParser=OnnxParser, Runtime=Runtime,
                            NetworkDefinitionCreationFlag=NetworkDefinitionCreationFlag, MemoryPoolType=MemoryPoolType,
                            TensorIOMode=TensorIOMode, DataType=DataType, IOptimizationProfile=IOptimizationProfile,
                            ITimingCache=ITimingCache, IHostMemory=HostMemory).items():
        setattr(mod, name, value)
    return mod


def install(monkeypatch, version: str = "10.3.0") -> Recorder:
    """Install the fake ``tensorrt`` and CUDA for one test (``monkeypatch`` undoes it); the backend's buffers
    live in host memory. Returns the recorder."""
    import torch

    from starflow_trt.runtime.backends import trt_backend

    rec = Recorder(version=version)
    cuda = FakeCuda(rec)
    module = make_module(rec)
    monkeypatch.setitem(_STATE, "rec", rec)
    monkeypatch.setitem(_STATE, "cuda", cuda)
    monkeypatch.setitem(_STATE, "module", module)
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    for name, value in dict(is_available=lambda: True, get_device_capability=lambda device=None: (8, 9),
                            get_device_name=lambda device=None: "FAKE-GPU (tests/fake_tensorrt.py, not a GPU)",
                            current_stream=cuda.current_stream, Stream=cuda.Stream, stream=cuda.stream, CUDAGraph=FakeCUDAGraph,
                            graph=cuda.graph, synchronize=cuda.synchronize).items():
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(trt_backend, "DEVICE", torch.device("cpu"))   # data_ptr() of host tensors as device pointers
    return rec


def plan_header(path: Path) -> dict:
    """The JSON description inside a fake plan (what the fake 'built')."""
    data = Path(path).read_bytes()
    assert data.startswith(MAGIC), f"{path} is not a fake plan"
    n = int.from_bytes(data[len(MAGIC):len(MAGIC) + 8], "little")
    return json.loads(data[len(MAGIC) + 8:len(MAGIC) + 8 + n])
