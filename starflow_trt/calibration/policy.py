"""Per-kind precision policy: what ``calibrate`` writes and which flags ``build`` sets for each graph.

Keyed by graph kind (``GraphSpec.kind``) in :data:`KIND_POLICIES`; kinds not listed get
:data:`DEFAULT_POLICY` (the flow graphs: the precision asked for). The media kinds:

* T5 ``text_encoder``: FP32 always (T5 activations overflow FP16; INT8 / FP8 are not gated). BF16 only as a
  TensorRT builder flag on a GPU, and only when asked (``BuildOptions.bf16_text``).
* VAE graphs: FP16 (also in an INT8 or FP8 directory: no INT8 for convolutions until a quality gate holds);
  the latent normalisation and temporal scale are outside the graphs (runtime, FP32).

A kind registered elsewhere (:func:`starflow_trt.export.registry.register_graph`) adds its entry to
:data:`KIND_POLICIES`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional

from ..errors import StarflowError
from ..export import names as n
from .fp16 import FP16_MODULES

#: graph precisions a directory may hold: ``calibrate`` writes fp16 / int8 / fp8, ``export --dtype`` fp16 / bf16
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
#: precisions whose graphs carry Q/DQ (calibrated on captured activations)
QUANTIZED = ("int8", "fp8")


@dataclass(frozen=True)
class PrecisionPolicy:
    """``targets``: requested directory precision → this kind's graph precision; ``trt_flags``: TensorRT
    builder flags allowed in a weakly typed build of its FP32 graph; ``reason``: recorded in the manifest;
    ``fp16_modules``: module paths (the exporter's ``namespace`` metadata) an FP16 graph runs in FP16
    (``("",)``: every node; :data:`~.fp16.FP32_OPS` stay FP32 always); ``exclude``: MatMul module-path
    regexes a Q/DQ graph keeps in float, besides ``calibrate --exclude``."""

    targets: Mapping[str, str] = field(default_factory=lambda: {p: p for p in PRECISIONS})
    trt_flags: tuple[str, ...] = ("FP16",)
    reason: str = "flow graph: the requested precision"
    fp16_modules: tuple[str, ...] = FP16_MODULES
    exclude: tuple[str, ...] = ()

    def allows(self, precision: str) -> bool:
        """Whether a graph of this kind may hold ``precision`` (fp32 always may)."""
        return precision == "fp32" or precision in self.targets.values()


DEFAULT_POLICY = PrecisionPolicy()
TEXT_POLICY = PrecisionPolicy(targets=dict.fromkeys(PRECISIONS, "fp32"), trt_flags=("BF16",),
                              reason="T5 text encoder: FP32 always (FP16 overflows); BF16 only as a TensorRT flag")
VAE_POLICY = PrecisionPolicy(targets={"fp32": "fp32", "fp16": "fp16", "bf16": "fp16", "int8": "fp16", "fp8": "fp16"},
                             trt_flags=("FP16",),
                             reason="VAE: FP16 (no INT8 / FP8 for its convolutions); latent normalisation stays FP32 "
                                    "outside the graph",
                             fp16_modules=("",))

#: graph kind → its policy (kinds not listed: :data:`DEFAULT_POLICY`)
KIND_POLICIES: dict[str, PrecisionPolicy] = {n.TEXT_ENCODER: TEXT_POLICY, "toy_text_encoder": TEXT_POLICY,
                                             **dict.fromkeys(n.VAE_GRAPHS, VAE_POLICY)}


def policy_of(kind: Optional[str]) -> PrecisionPolicy:
    """The policy of graph kind ``kind`` (None or a kind without one: :data:`DEFAULT_POLICY`)."""
    return KIND_POLICIES.get(kind, DEFAULT_POLICY) if kind else DEFAULT_POLICY


@dataclass(frozen=True)
class Decision:
    precision: str
    reason: str


def graph_precision(kind: Optional[str], requested: str, called: bool = True) -> Decision:
    """What ``calibrate --precision requested`` writes for a graph of kind ``kind``.

    ``called``: the graph saw calls during capture (INT8 needs them; without, it stays FP32).
    """
    if requested not in PRECISIONS:
        raise StarflowError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    policy = policy_of(kind)
    target = policy.targets.get(requested, "fp32")
    if target in QUANTIZED and not called:
        return Decision("fp32", "never called during capture: kept fp32")
    return Decision(target, policy.reason)


def builder_flags(kind: Optional[str], precision: str, weakly_typed: bool, bf16_text: bool = False) -> list[str]:
    """TensorRT ``BuilderFlag`` names for one graph of kind ``kind`` (pure logic; TensorRT itself is not imported).

    Strongly typed networks take precision from the ONNX (no flags; TensorRT, Explicit Quantization: "use
    explicit quantization with Strong Typing. Precision-control build flags are not required and should not be
    specified"), Q/DQ graphs included: a graph whose ONNX precision the kind's policy forbids is refused.
    Weakly typed (legacy ``--fp16-flag``, FP32 graphs): FP16 for the kinds that allow it, BF16 for the text
    encoder only when ``bf16_text``, nothing otherwise. A weakly typed Q/DQ graph would need the flag of its
    quantized type beside FP16 (``INT8``; ``FP8``, TensorRT 10 only): listed for such a plan.
    """
    policy = policy_of(kind)
    if not policy.allows(precision):
        raise StarflowError(f"a {kind or '?'} graph must not be {precision} ({policy.reason}); rebuild from a "
                            "directory written by `starflow-trt calibrate`")
    if not weakly_typed:
        return []
    flags = [f for f in policy.trt_flags if f == "FP16"]
    if precision in QUANTIZED:
        flags.append(precision.upper())
    if bf16_text and "BF16" in policy.trt_flags:
        flags.append("BF16")
    return flags
