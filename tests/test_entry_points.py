"""One request currency: the CLI, the Python API and the server reach the executor, ``Pipeline.run``, with one
``GenerationRequest``; prompt files run as upstream runs them (one video per line, seeds by line)."""

from __future__ import annotations

import asyncio
import json
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from starflow_trt.cli import main
from starflow_trt.request import GenerationRequest
from starflow_trt.runtime import Pipeline
from starflow_trt.sampling import JacobiConfig

PROMPTS = ["a red square moving right", "a blue disc moving up", "a green square moving left"]


@pytest.fixture
def runs(monkeypatch) -> list[GenerationRequest]:
    """Every request ``Pipeline.run`` executes in this process, in order."""
    seen: list[GenerationRequest] = []
    real = Pipeline.run

    def spy(self, request, *args, **kwargs):
        seen.append(request)
        return real(self, request, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "run", spy)
    return seen


def _cli(*args: str) -> None:
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, res.output


def test_the_api_and_the_cli_run_one_request_and_the_toy_encodes_prompts(toy_export, runs, tmp_path):
    """The bundled toy's export has no text_encoder graph: its word encoder is the text stage, so what the
    validator accepts (a prompt) the executor runs, from the API and the CLI alike, with equal frames."""
    with Pipeline.from_dir(toy_export) as pipe:
        assert "text_encoder" not in pipe.manifest.graphs and pipe.summary.prompt_encoder == "toy"
        api = pipe.generate(prompt=[PROMPTS[0]], seed=3, num_frames=2, jacobi=JacobiConfig())   # the CLI's sampler
    assert len(runs) == 1 and runs[0].prompts == (PROMPTS[0],) and runs[0].seed == 3
    _cli("generate", toy_export, "--prompt", PROMPTS[0], "--seed", 3, "--frames", 2, "-o", tmp_path / "out")
    assert len(runs) == 2 and runs[1].prompts == (PROMPTS[0],) and runs[1].frames == 2
    assert np.array_equal(np.load(tmp_path / "out" / "latents.npy"), api.latents.numpy())
    assert (tmp_path / "out" / "video.mp4").stat().st_size > 0


def test_the_server_runs_its_batch_as_one_request_of_per_row_seeds(toy_export, runs):
    """Two queued requests of equal options: one ``Pipeline.run`` of both rows (seeds per row), each row's frames
    those of its own one-row call."""
    from starflow_trt.request import RequestLimits
    from starflow_trt.serving.batching import Ticket
    from starflow_trt.serving.deployment import VideoGenerator
    from starflow_trt.serving.limits import decode_npy, parse_request

    pipe = Pipeline.from_dir(toy_export)
    gen = VideoGenerator.func_or_class.__new__(VideoGenerator.func_or_class)
    noop = SimpleNamespace(set=lambda *a: None, observe=lambda *a: None, inc=lambda *a: None)
    gen.__dict__.update(pipe=pipe, summary=pipe.summary, _queued=2, _closing=False, _recent=deque(), replica="r",
                        _worker=ThreadPoolExecutor(1),
                        metrics=SimpleNamespace(**{k: noop for k in ("queue", "batch", "generate", "frames", "fps",
                                                                     "cancelled")}))
    tickets = []
    for prompt, seed in zip(PROMPTS[:2], (5, 9)):
        body = {"prompt": prompt, "seed": seed, "frames": 2, "sampler": "autoregressive", "output": "latents"}
        t = Ticket(parse_request(json.dumps(body).encode(), pipe.summary, RequestLimits()))
        t.prepared = gen.prepare(t.request)
        tickets.append(t)

    async def events() -> list:
        return [wave async for wave in gen._run_group(tickets)]

    try:
        waves = asyncio.run(events())
    finally:
        gen._worker.shutdown()
    served = [r for r in runs if r.batch == 2]
    assert len(served) == 1 and served[0].seed == (5, 9) and served[0].encoded
    done = [e for wave in waves for t, e in wave if e["type"] == "done"]
    assert len(done) == 2
    frames = {id(t): [] for t in tickets}
    for wave in waves:
        for t, e in wave:
            if e["type"] == "frame":
                frames[id(t)].append(e)
    for t, prompt, seed in zip(tickets, PROMPTS[:2], (5, 9)):
        want = pipe.generate(prompt=[prompt], seed=seed, num_frames=2).latents[0]
        got = torch.stack([torch.from_numpy(decode_npy(e["latents"])) for e in frames[id(t)]])
        assert torch.equal(got, want)
    pipe.close()


def test_a_prompt_file_gives_the_videos_of_its_lines_prompt_runs(toy_export, runs, tmp_path):
    """3 lines (a blank one between): 3 videos named by line number, line k seeded seed + k, each equal to the
    ``--prompt`` run of its line with that seed; the thresholded default runs one prompt per call."""
    lines = tmp_path / "prompts.txt"
    lines.write_text(f"{PROMPTS[0]}\n\n{PROMPTS[1]}\n  {PROMPTS[2]}  \n")
    _cli("generate", toy_export, "--prompts", lines, "--seed", 7, "--frames", 2, "-o", tmp_path / "file")
    assert [r.batch for r in runs] == [1, 1, 1]
    stats = json.loads((tmp_path / "file" / "stats.json").read_text())
    assert [(p["line"], p["prompt"], p["seed"]) for p in stats["prompts"]] == [
        (1, PROMPTS[0], 7), (3, PROMPTS[1], 8), (4, PROMPTS[2], 9)]
    for p in stats["prompts"]:
        one = tmp_path / f"one{p['line']}"
        _cli("generate", toy_export, "--prompt", p["prompt"], "--seed", p["seed"], "--frames", 2, "-o", one)
        got = np.load(tmp_path / "file" / f"latents_{p['line']:04d}.npy")
        assert np.array_equal(got, np.load(one / "latents.npy")[0])
        assert (tmp_path / "file" / f"video_{p['line']:04d}.mp4").stat().st_size > 0
    # exact options share a call: the three rows in one request of per-row seeds, the same frames
    runs.clear()
    _cli("generate", toy_export, "--prompts", lines, "--seed", 7, "--frames", 2, "--jacobi-threshold", 0,
         "-o", tmp_path / "batched")
    assert [(r.batch, r.seed) for r in runs] == [(3, (7, 8, 9))]
    runs.clear()
    _cli("generate", toy_export, "--prompt", PROMPTS[1], "--seed", 8, "--frames", 2, "--jacobi-threshold", 0,
         "-o", tmp_path / "exact")
    assert np.array_equal(np.load(tmp_path / "batched" / "latents_0003.npy"), np.load(tmp_path / "exact" / "latents.npy")[0])


@pytest.mark.parametrize("args, needle", [
    (["--prompts", "{empty}"], "holds no prompt"),
    (["--prompts", "{empty}", "--prompt", "a red square"], "drop --prompt"),
    (["--prompt", "{empty}"], "is a file: pass it as --prompts"),
    (["--frames", "2", "--target-length", "5"], "give one of them"),
])
def test_prompt_options_refuse_bad_input_in_one_line(toy_export, tmp_path, args, needle):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["generate", str(toy_export), *[a.format(empty=empty) for a in args], "-o", str(out)])
    assert res.exit_code == 2 and needle in res.output and "Traceback" not in res.output
    assert not out.exists()
