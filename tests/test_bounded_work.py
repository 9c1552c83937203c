"""Bounded work per request (issue 32, item 1): the server's frame, row and memory limits, a long video's memory
bounded by the window, and cancellation that reaches the work before its first graph call.

Peak RSS is measured in a subprocess of its own (``ru_maxrss`` only grows), on the bundled toy's export
(64 tokens a frame, ``max_frames`` 6, ``max_batch`` 8, no attention window: a Jacobi window of 6 frames).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from starflow_trt.costs import CallMemory
from starflow_trt.errors import GenerationCancelled
from starflow_trt.request import RequestError, build_request
from starflow_trt.serving.config import ServeConfig
from starflow_trt.serving.limits import parse_request
from starflow_trt.summary import ModelSummary

from .conftest import REPO

#: the toy export's call memory (what ``ModelSummary.from_manifest`` reads off it)
TOY_MEMORY = CallMemory(text_length=6, tokens_per_frame=64, token_channels=12, head_dim=32, max_frames=6,
                        frame_local=True, deep=(4, 4, 128), shallow=(1, 2, 64), denoiser=(8, 2, 64), kv_bytes=4,
                        pixel_frame_bytes=768)
TOY = ModelSummary(directory="/x", precision="fp32", channels=3, height=16, width=16, max_frames=6, max_batch=8,
                   text_length=6, text_width=16, pixel_space=True, has_denoiser=True, window=None,
                   default_guidance=3.0, noise_std=0.15, prompt_encoder="toy", config_hash="h",
                   checkpoint_sha256=None, graphs=("deep_step",), memory=TOY_MEMORY)
MIB = 1 << 20


def _body(**fields) -> bytes:
    return json.dumps({"prompt": "a red square", "seed": 0, **fields}).encode()


# ------------------------------------------------------------------------------------------------ limits
def test_frames_beyond_the_servers_limit_are_refused_naming_the_limit_and_the_flag():
    limits = ServeConfig(memory_budget_mb=1e6).request_limits()
    with pytest.raises(RequestError, match=r"2000 latent frames exceed the limit of 6 \(the export's max_frames; "
                                           r"serve --max-frames raises it\)") as info:
        parse_request(_body(frames=2000, denoise=False), TOY, limits)     # the request
    assert info.value.field == "frames" and "\n" not in str(info.value)
    assert parse_request(_body(frames=6), TOY, limits).frames == 6
    raised = ServeConfig(max_frames=24, memory_budget_mb=1e6).request_limits()
    assert parse_request(_body(frames=24, denoise=False), TOY, raised).frames == 24   # past the window: raised
    with pytest.raises(RequestError, match=r"25 latent frames exceed the limit of 24 \(serve --max-frames\)"):
        parse_request(_body(frames=25, denoise=False), TOY, raised)
    # the CLI and the Python API keep their own limit (long videos through the window)
    assert build_request(TOY, prompt="a", frames=2000, denoise=False).frames == 2000


def test_rows_beyond_the_servers_batch_are_refused():
    limits = ServeConfig(max_batch=2, memory_budget_mb=1e6).request_limits()
    assert build_request(TOY, limits, prompt=["a", "b"], frames=2).batch == 2
    with pytest.raises(RequestError, match=r"3 rows exceed the limit of 2 a request \(serve --max-batch\)"):
        build_request(TOY, limits, prompt=["a", "b", "c"], frames=2)


def test_memory_budget_refuses_what_the_cost_model_puts_over_it():
    # the largest call a one-row request can join is a full batch (8 rows), guided (16 deep rows)
    need = TOY_MEMORY.call_bytes(8, 6, None, True, 8 * 16, 0, True, True) / MIB
    assert parse_request(_body(frames=6), TOY, ServeConfig(memory_budget_mb=need + 1).request_limits())
    with pytest.raises(RequestError, match=rf"6 frames need an estimated {need:.0f} MiB in a call of 8 row\(s\), "
                                           r"over the budget of \d+ MiB \(serve --memory-budget\)") as info:
        parse_request(_body(frames=6), TOY, ServeConfig(memory_budget_mb=need - 1).request_limits())
    assert info.value.field == "frames"
    # a smaller server batch is a smaller call
    assert parse_request(_body(frames=6), TOY, ServeConfig(max_batch=1, memory_budget_mb=need / 4).request_limits())


def test_call_memory_of_a_long_video_is_bounded_by_the_window():
    est = [TOY_MEMORY.call_bytes(1, f, 6, True, 128, denoise=False) for f in (12, 24, 48)]
    # only the video itself grows: (8 copies a row + 4 a deep row) x tokens x channels x 4 bytes a frame
    per_frame = (8 * 1 + 4 * 2) * 64 * 12 * 4
    assert est[1] - est[0] == 12 * per_frame and est[2] - est[1] == 24 * per_frame


def test_serve_config_limits_and_flags(tmp_path):
    from click.testing import CliRunner

    from starflow_trt.cli import main

    assert ServeConfig().request_limits().max_frames is None            # None: the export's max_frames
    assert ServeConfig(replicas=2).memory_budget() == pytest.approx(ServeConfig().memory_budget() / 2)
    assert ServeConfig(gpus_per_replica=1).memory_budget() is None                   # GPU: only when given
    assert ServeConfig(gpus_per_replica=1, memory_budget_mb=512).request_limits().max_memory_mb == 512
    for bad in ({"max_frames": 0}, {"max_frames": 1 << 17}, {"memory_budget_mb": 0}):
        with pytest.raises(Exception, match="max_frames|memory budget"):
            ServeConfig(**bad)
    assert ServeConfig.from_dict(ServeConfig(max_frames=12).to_dict()).request_limits().max_frames == 12
    out = CliRunner().invoke(main, ["serve", "--help"]).output
    assert "--max-frames" in out and "--memory-budget" in out
    bad = CliRunner().invoke(main, ["serve", str(tmp_path), "--max-frames", "0"])
    assert bad.exit_code == 2 and "--max-frames" in bad.output


def test_summary_carries_the_call_memory_through_json(toy_export):
    summary = ModelSummary.from_dir(toy_export)
    assert summary.memory == TOY_MEMORY
    assert ModelSummary.from_dict(json.loads(json.dumps(summary.to_dict()))) == summary


# --------------------------------------------------------------------------------------------- peak RSS
#: runs in a subprocess: a warm pipeline (the replica's warm-up), then the calls named, printing the peak RSS
#: (MiB) after the warm-up and after each call
PEAK = """
import json, resource, sys
import numpy as np
from starflow_trt.request import build_request, stack_rows
from starflow_trt.runtime import JacobiConfig, Pipeline
from starflow_trt.serving.config import ServeConfig

peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
pipe = Pipeline.from_dir(sys.argv[1])
s, spec = pipe.summary, json.loads(sys.argv[2])
y = np.zeros((1, s.text_length, s.text_width), np.float32)
pipe.generate(y, y_uncond=y, guidance=1.0, num_frames=2, jacobi=JacobiConfig())   # VideoGenerator._warmup
out = {"warm": peak()}
limits = ServeConfig(**spec["config"]).request_limits()
for frames in spec["frames"]:
    rows = [build_request(s, limits, text_embeddings=y, negative_embeddings=y, seed=[k], frames=frames,
                          **spec["request"]) for k in range(spec["rows"])]
    pipe.run(stack_rows(rows), on_frame=lambda i, f: None)   # the server streams
    out[str(frames)] = peak()
print(json.dumps(out))
"""


def _peaks(export, frames, rows, request, config=None) -> dict:
    spec = {"frames": frames, "rows": rows, "request": request, "config": config or {"memory_budget_mb": 1e6}}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", PEAK, str(export), json.dumps(spec)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow   # ~50 s on a shared 2-core machine
def test_long_video_runs_in_memory_bounded_by_the_window(toy_export):
    # 2x then 4x the window (6 frames) in one warm process, 4 rows: the second call may add at most twice
    # the bytes of its longer video's own tensors (by the cost model: the working set under the window is
    # the same), never a working set that grows with the frames (before: +17 MiB here, the step scratch
    # sized frames x frames tokens, the shallow blocks batching every frame)
    peak = _peaks(toy_export, [12, 24], 4, {"guidance": 1.0, "denoise": False},
                  {"max_frames": 24, "memory_budget_mb": 1e6})
    video = (TOY_MEMORY.call_bytes(4, 24, 6, True, 128, denoise=False)
             - TOY_MEMORY.call_bytes(4, 12, 6, True, 128, denoise=False)) / MIB
    assert peak["24"] - peak["12"] <= 2 * video, (peak, video)


def test_largest_accepted_request_stays_within_the_budget(toy_export):
    budget = 256.0
    cfg = {"memory_budget_mb": budget}
    summary = ModelSummary.from_dir(toy_export)
    limits = ServeConfig(**cfg).request_limits()
    y = np.zeros((1, 6, 16), np.float32)
    largest = dict(text_embeddings=y, negative_embeddings=y, guidance=3.0, seed=[0], denoise=True)
    build_request(summary, limits, frames=summary.max_frames, **largest)            # accepted: the limit
    with pytest.raises(RequestError, match="--max-frames"):
        build_request(summary, limits, frames=summary.max_frames + 1, **largest)
    estimate = summary.memory.call_bytes(8, 6, None, True, 8 * 16, 0, True, True) / MIB
    # a full batch of the largest one-row request, as the replica stacks them
    peak = _peaks(toy_export, [summary.max_frames], summary.max_batch, {"guidance": 3.0, "denoise": True}, cfg)
    used = peak[str(summary.max_frames)] - peak["warm"]
    assert used <= estimate <= budget, (used, estimate)


# ------------------------------------------------------------------------------------------- cancellation
@pytest.fixture(scope="module")
def toy_pipe(toy_export):
    from starflow_trt.runtime import Pipeline

    return Pipeline.from_dir(toy_export)


def _counting(monkeypatch) -> list[str]:
    """Every graph call the runtime makes, by name, in order."""
    from starflow_trt.runtime.backends.base import CallStats

    calls: list[str] = []
    original = CallStats.timed

    def timed(self, runner, inputs, outputs):
        calls.append(runner.spec.name)
        original(self, runner, inputs, outputs)

    monkeypatch.setattr(CallStats, "timed", timed)
    return calls


def test_cancelled_before_the_first_frame_runs_no_graph_call(toy_pipe, monkeypatch):
    calls = _counting(monkeypatch)
    y = np.zeros((1, 6, 16), np.float32)
    request = build_request(toy_pipe.summary, text_embeddings=y, negative_embeddings=y, guidance=3.0, frames=24,
                            seed=0, denoise=False)
    frames = []
    with pytest.raises(GenerationCancelled):   # a caller gone before the work began: not even the text prefill
        toy_pipe.run(request, on_frame=lambda i, f: frames.append(i), should_stop=lambda: True)
    assert calls == [] and frames == []


@pytest.mark.parametrize("graph", ["deep_prefill", "denoiser"])
def test_cancellation_stops_within_one_graph_call(toy_pipe, monkeypatch, graph):
    # the caller leaves during graph `graph`'s first call: no graph call follows (the prefill and the
    # denoiser were not checked before: only Jacobi sweeps and emitted frames were)
    calls = _counting(monkeypatch)
    y = np.zeros((1, 6, 16), np.float32)
    request = build_request(toy_pipe.summary, text_embeddings=y, negative_embeddings=y, guidance=3.0, frames=6,
                            seed=0, denoise=True)
    with pytest.raises(GenerationCancelled):
        toy_pipe.run(request, on_frame=lambda i, f: None, should_stop=lambda: graph in calls)
    assert graph in calls and calls[-1] == graph and calls.count(graph) == 1, calls
    # the pipeline runs the next request as if nothing happened
    replay = toy_pipe.run(replace(request, seed=1)).latents
    assert replay.shape == (1, 6, 3, 16, 16) and np.isfinite(replay.numpy()).all()
