"""``benchmarks/gpu_check.py --device cpu --quick``: the one-call GPU check runs end to end and reports every section."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from .conftest import REPO


@pytest.mark.slow
def test_gpu_check_quick_on_cpu(tmp_path):
    out = tmp_path / "check"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--out", str(out),
                           "--device", "cpu", "--quick"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert time.perf_counter() - start < 180
    result = json.loads((out / "gpu_check.json").read_text())
    sections = result["sections"]
    assert list(sections) == ["env", "ceilings", "goldens", "toy", "bench", "deep_step"]
    assert all("error" not in s for s in sections.values()), {k: s.get("error") for k, s in sections.items()}
    assert result["ok"] and result["device"] == "cpu" and result["quick"]
    assert all(s["seconds"] >= 0 and s["peak_rss_gib"] > 0 for s in sections.values())
    assert sections["env"]["torch"] and sections["ceilings"]["matmul_bf16"]["tflops"] > 0
    gold = {r["run"]: r for r in sections["goldens"]["rows"]}
    for run in ("ar.g0", "ar.g2", "i2v", "denoised", "upstream.th",
                "upstream.exact", "sliding.exact", "predictive.exact"):
        assert gold[run]["ok"] and gold[run]["max_err"] <= gold[run]["bound"], gold[run]
    toy = sections["toy"]["rows"]
    assert [r["dtype"] for r in toy] == ["fp32", "bf16"] and all(r["schedule"] == "predictive" for r in toy)
    bench = sections["bench"]["rows"]
    assert bench[0]["run"] == "eager reference sampler"
    assert {r["schedule"] for r in bench[1:]} == {"upstream", "sliding", "predictive"}
    # the torch backend's upstream schedule is the reference sampler's computation
    up = next(r for r in bench[1:] if r["schedule"] == "upstream" and r["dtype"] == "fp32")
    assert up["deep_calls"] == bench[0]["deep_calls"] and abs(up["dist_to_ar"] - bench[0]["dist_to_ar"]) < 1e-4
    steps = sections["deep_step"]["rows"]
    assert {(r["path"], r["S"]) for r in steps} == {(p, s) for p in ("eager two-part", "torch backend")
                                                    for s in (1, 16, 64)}
    assert len({r["P"] for r in steps}) == 3 and all(r["ms"] > 0 and r["pct_roofline"] > 0 for r in steps)
    md = (out / "gpu_check.md").read_text()
    assert all(f"## {name}" in md for name in sections) and "| path | S | P | ms |" in md


def test_gpu_torch_layout_patch_is_restored():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gpu_torch
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    from starflow_trt.export import graphs

    original = graphs.kv_to_layers
    with pytest.raises(ZeroDivisionError):
        with gpu_torch._past_layout("bhpd"):
            assert graphs.kv_to_layers is not original
            1 / 0
    assert graphs.kv_to_layers is original
