"""What TensorRT's ONNX parser accepts, per TensorRT release: operators, opsets and data types.

The table is data (``trt_onnx_support.json`` beside this file): the rows marked Y in
onnx/onnx-tensorrt ``docs/operators.md`` for each release, with the source of each entry noted
there. A TensorRT version reads the newest entry at or below it ("10" and "10.3" read 10.0's,
"10.15" reads 10.15's). The test fake of TensorRT (tests/fake_tensorrt.py) reads the same file.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..errors import StarflowError
from ..export.dtypes import elem_types

TABLE_PATH = Path(__file__).with_name("trt_onnx_support.json")

#: operators.md's type names → ONNX TensorProto element types (FP8: the four float8 encodings)
TYPE_ELEMS = {"FP32": (1,), "FP16": (10,), "BF16": (16,), "INT32": (6,), "INT64": (7,), "BOOL": (9,),
              "UINT8": (2,), "INT8": (3,), "FP8": (17, 18, 19, 20), "INT4": (22,), "FP4": (23,)}
ELEM_NAMES = {e: name for name, elems in TYPE_ELEMS.items() for e in elems} | {11: "DOUBLE"}
#: the input whose type the "Supported Types" column describes, where it is not input 0 (-1: the output).
#: ConstantOfShape: input 0 is always the INT64 shape; the column is its ``value``'s type (the importer,
#: onnxOpImporters.cpp at release/10.0-GA, converts the value attribute, never the shape's type)
TYPED_INPUT = {"Where": 1, "Constant": -1, "ConstantOfShape": -1}


@dataclass(frozen=True)
class SupportTable:
    """One release's entry: ``ops`` maps an op type to the element types its typed input may have."""

    version: str
    source: str
    opsets: tuple[int, int]
    ops: dict[str, frozenset[int]]

    def reads_opset(self, opset: int) -> bool:
        return self.opsets[0] <= opset <= self.opsets[1]


def _key(version: str) -> tuple[int, int]:
    """``"10"`` → (10, 0), ``"10.15.1"`` → (10, 15)."""
    major, minor = (str(version).split(".") + ["0"])[:2]
    return int(major), int(minor)


@lru_cache(maxsize=None)
def support_table(trt_version: str = "10") -> SupportTable:
    """The table entry for TensorRT ``trt_version`` (``"10"``, ``"10.15.1"``, ``"11"``)."""
    data = json.loads(TABLE_PATH.read_text())
    entries = data["versions"]
    try:
        want = _key(trt_version)
    except ValueError:
        raise StarflowError(f"not a TensorRT version: {trt_version!r} (want e.g. 10 or 10.15)") from None
    known = sorted(entries, key=_key)
    at = [v for v in known if _key(v) <= want and _key(v)[0] == want[0]]
    if not at:
        raise StarflowError(f"no ONNX parser table for TensorRT {trt_version} (known: {', '.join(known)}); "
                            "target one of those with --trt-version")
    entry = entries[at[-1]]
    ops = entry["ops"] if "ops" in entry else entries[entry["inherits"]]["ops"]
    return SupportTable(at[-1], entry["source"], tuple(entry["opsets"]),
                        {op: frozenset(e for t in types for e in TYPE_ELEMS[t]) for op, types in ops.items()})


def graph_ops(path: str | Path) -> Counter:
    """Op types of an ONNX graph (without loading external weights)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return Counter(n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx"))


def unsupported(model, table: SupportTable) -> list[tuple[str, int]]:
    """(what, count) for every op type, op data type and opset of ``model`` that ``table`` does not list."""
    bad: Counter = Counter()
    types = elem_types(model)
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            bad[f"custom-domain {node.domain}::{node.op_type}"] += 1
        elif node.op_type not in table.ops:
            bad[node.op_type] += 1
        else:
            index = TYPED_INPUT.get(node.op_type, 0)
            names = node.output if index < 0 else node.input
            elem = types.get(names[max(index, 0)]) if len(names) > max(index, 0) else None
            if elem is not None and elem not in table.ops[node.op_type]:
                bad[f"{node.op_type} on {ELEM_NAMES.get(elem, f'element type {elem}')}"] += 1
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if not table.reads_opset(opset):
        bad[f"opset {opset}"] += 1
    return sorted(bad.items())


#: TensorProto element types of the float dtypes a strongly typed network does not mix in one op
FLOAT_ELEMS = {1: "FP32", 10: "FP16", 16: "BF16", 11: "DOUBLE"}


def mixed_float_nodes(model, types: dict[str, int] | None = None) -> list[str]:
    """Nodes (``"name (op): FP16, FP32"``) whose inputs mix float dtypes. A strongly typed TensorRT network
    (TensorRT 11's only kind) takes each tensor's type from the ONNX and inserts no conversions, so such
    an op has no single precision; only Cast / CastLike change a type."""
    types = elem_types(model) if types is None else types
    out = []
    for node in model.graph.node:
        if node.op_type in ("Cast", "CastLike"):
            continue
        floats = sorted({FLOAT_ELEMS[types[i]] for i in node.input if types.get(i) in FLOAT_ELEMS})
        if len(floats) > 1:
            out.append(f"{node.name or '?'} ({node.op_type}): {', '.join(floats)}")
    return out


def check_graph_ops(path: str | Path, trt_version: str = "10", strongly_typed: bool = False
                    ) -> list[tuple[str, int]]:
    """(op type / op on a data type / opset, count) of everything in the graph that TensorRT ``trt_version``'s
    ONNX parser does not accept, per :func:`support_table`; ``strongly_typed``: also every op whose inputs
    mix float dtypes (:func:`mixed_float_nodes`)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    bad = unsupported(model, support_table(str(trt_version)))
    if strongly_typed:
        bad += [(f"mixed float inputs at {node}", 1) for node in mixed_float_nodes(model)]
    return bad
