"""The Jacobi residual floor of quantised graphs: measured at calibration, recorded in the manifest.

Q/DQ rounding makes the step function noisy: once a sweep changes its inputs by more than a
quantisation step, the rounding errors are drawn anew, so the relative update between two
sweeps stops decreasing at about the squared relative error of the graph's output (toy INT8:
``deep_step`` rel. L2 ≈ 0.045, floor ≈ 2e-3) — above the usual threshold 1e-3. Upstream's test
then never passes and chunks run to ``max_iter`` without getting closer to anything. The floor
is a high quantile of the level the updates stall at (:data:`QUANTILE`, over the full-length chunks of
:data:`PROMPTS` prompts); the sampler stops at ``max(threshold, floor)``
(:attr:`starflow_trt.sampling.JacobiConfig.stop`). Float exports record none (floor 0), so their
behaviour is unchanged.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..defaults import DEFAULT_JACOBI_BLOCK
from ..export import names
from ..sampling import JacobiConfig

#: sweeps per chunk while measuring: enough for a float chunk to fall far below any threshold
SWEEPS = 12
#: the floor is this quantile of the stalled updates. At the median, half the stalled chunks stayed above it and
#: ran to ``max_iter``: toy INT8, 16 held-out prompts, default schedule, deep calls 727 against FP32's 627 (1.16x);
#: at 0.75 (floor 2.0e-3 -> 2.7e-3) 682 (1.09x), the median distance to the FP32 result 0.22 -> 0.24, within the
#: scatter of the quantisation's own (INT8 autoregressive vs FP32: 0.21); benchmarks/README.md, issue 31
QUANTILE = 0.75
#: calibration prompts the floor is measured on (4 full-length chunks each on the toy)
PROMPTS = 8


def measure_residual_floor(pipe, text: torch.Tensor, uncond: Optional[torch.Tensor], guidance: float,
                           block_size: int = DEFAULT_JACOBI_BLOCK, prompts: int = PROMPTS, seed: int = 31) -> dict:
    """Run the upstream schedule with threshold 0 for :data:`SWEEPS` sweeps per chunk on ``prompts``
    prompts at most (text [n, L, D]) and return ``{"value": floor, ...}``: the :data:`QUANTILE` of the last
    relative update of the deep block's full-length chunks (the ones that stall: the update of
    a 4·block_size chunk averages more rounding noise than frame 0's short chunks show)."""
    jac = JacobiConfig(block_size=block_size, max_iter=SWEEPS, threshold=0.0, schedule="upstream")
    last = []
    for i in range(min(prompts, text.shape[0])):
        u = uncond[i : i + 1] if uncond is not None and guidance > 0 else None
        r = pipe.generate(text[i : i + 1], u, guidance=guidance if u is not None else 0.0, jacobi=jac,
                          seed=seed + i, denoise=False)
        for trace in r.stats["jacobi"]:
            if trace["block"] == names.DEEP_STEP:   # the full-length chunks (4·block_size, after frame 0)
                longest = max(c["length"] for c in trace["chunks"])
                last += [c["delta"] for c in trace["chunks"] if c["length"] == longest > 1]
    value = float(torch.tensor(last).quantile(QUANTILE)) if last else 0.0
    return {"value": value, "quantile": QUANTILE, "sweeps": SWEEPS, "block_size": block_size, "chunks": len(last),
            "median": float(torch.tensor(last).median()) if last else 0.0}
