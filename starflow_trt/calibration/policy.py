"""Per-kind precision policy: what ``calibrate`` writes and which flags ``build`` sets for each graph.

A graph kind may declare ``precision_policy`` (a :class:`PrecisionPolicy`); kinds that do not get
:data:`DEFAULT_POLICY` (the flow graphs: the precision asked for). The media kinds declare theirs
in :mod:`starflow_trt.export.media_kinds`:

* T5 ``text_encoder``: FP32 always (T5 activations overflow FP16; INT8 / FP8 are not gated). BF16 only as a
  TensorRT builder flag on a GPU, and only when asked (``BuildOptions.bf16_text``).
* VAE graphs: FP16 (also in an INT8 or FP8 directory: no INT8 for convolutions until a quality gate holds);
  the latent normalisation and temporal scale are outside the graphs (runtime, FP32).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from ..errors import StarflowError

PRECISIONS = ("fp32", "fp16", "int8", "fp8")
#: precisions whose graphs carry Q/DQ (calibrated on captured activations)
QUANTIZED = ("int8", "fp8")


@dataclass(frozen=True)
class PrecisionPolicy:
    """``targets``: requested directory precision → this kind's graph precision; ``trt_flags``: TensorRT
    builder flags allowed in a weakly typed build of its FP32 graph; ``reason``: recorded in the manifest."""

    targets: Mapping[str, str] = field(default_factory=lambda: {p: p for p in PRECISIONS})
    trt_flags: tuple[str, ...] = ("FP16",)
    reason: str = "flow graph: the requested precision"

    def allows(self, precision: str) -> bool:
        """Whether a graph of this kind may hold ``precision`` (fp32 always may)."""
        return precision == "fp32" or precision in self.targets.values()


DEFAULT_POLICY = PrecisionPolicy()
TEXT_POLICY = PrecisionPolicy(targets={"fp32": "fp32", "fp16": "fp32", "int8": "fp32", "fp8": "fp32"}, trt_flags=("BF16",),
                              reason="T5 text encoder: FP32 always (FP16 overflows); BF16 only as a TensorRT flag")
VAE_POLICY = PrecisionPolicy(targets={"fp32": "fp32", "fp16": "fp16", "int8": "fp16", "fp8": "fp16"},
                             trt_flags=("FP16",),
                             reason="VAE: FP16 (no INT8 / FP8 for its convolutions); latent normalisation stays FP32 "
                                    "outside the graph")


def policy_of(kind) -> PrecisionPolicy:
    """The kind's ``precision_policy`` (None or a kind without one: :data:`DEFAULT_POLICY`)."""
    return getattr(kind, "precision_policy", None) or DEFAULT_POLICY


@dataclass(frozen=True)
class Decision:
    precision: str
    reason: str


def graph_precision(kind, requested: str, called: bool = True) -> Decision:
    """What ``calibrate --precision requested`` writes for a graph of ``kind``.

    ``called``: the graph saw calls during capture (INT8 needs them; without, it stays FP32).
    """
    if requested not in PRECISIONS:
        raise StarflowError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    policy = policy_of(kind)
    target = policy.targets.get(requested, "fp32")
    if target in QUANTIZED and not (called and getattr(kind, "int8", True)):
        why = "never called during capture" if not called else "its kind is not quantized"
        return Decision("fp32", f"{why}: kept fp32")
    return Decision(target, policy.reason)


def builder_flags(kind, precision: str, weakly_typed: bool, bf16_text: bool = False) -> list[str]:
    """TensorRT ``BuilderFlag`` names for one graph (pure logic; TensorRT itself is not imported).

    Strongly typed networks take precision from the ONNX (no flags; TensorRT, Explicit Quantization: "use
    explicit quantization with Strong Typing. Precision-control build flags are not required and should not be
    specified"), Q/DQ graphs included: a graph whose ONNX precision the kind's policy forbids is refused.
    Weakly typed (legacy ``--fp16-flag``, FP32 graphs): FP16 for the kinds that allow it, BF16 for the text
    encoder only when ``bf16_text``, nothing otherwise. A weakly typed Q/DQ graph would need the flag of its
    quantized type beside FP16 (``INT8``; ``FP8``, TensorRT 10 only): listed for such a plan.
    """
    policy = policy_of(kind)
    name = getattr(kind, "kind", "?")
    if not policy.allows(precision):
        raise StarflowError(f"a {name} graph must not be {precision} ({policy.reason}); rebuild from a "
                            "directory written by `starflow-trt calibrate`")
    if not weakly_typed:
        return []
    flags = [f for f in policy.trt_flags if f == "FP16"]
    if precision in QUANTIZED:
        flags.append(precision.upper())
    if bf16_text and "BF16" in policy.trt_flags:
        flags.append("BF16")
    return flags

