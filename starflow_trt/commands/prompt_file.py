"""``generate --prompts FILE``: one video per line, as upstream's ``--caption FILE`` runs them.

Line k (from 0, blank lines skipped) draws seed ``seed + k`` and, with ``--aspect random``, its aspect
from that seed, so each video equals the ``--prompt`` run of its line with that seed. Rows of one aspect
share a call (chunks of the export's ``max_batch``) only when sharing cannot change them
(:attr:`~starflow_trt.request.GenerationRequest.exact_batching`); a thresholded Jacobi stopping test
averages over a call's rows, so those run one prompt per call. Outputs are named by line number.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import click

from ..prompts import PromptLine, read_prompt_file
from ..request import RANDOM_ASPECT, GenerationRequest, RequestError, build_request, draw_aspect
from ..summary import ModelSummary
from . import options


@dataclass(frozen=True)
class PromptCall:
    """One executor call: the lines it generates (one row each, in order) and their request."""

    lines: tuple[PromptLine, ...]
    request: GenerationRequest


def prompt_file_requests(summary: ModelSummary, path: str, seed: int, aspect: Optional[str], negative: list[str],
                         fields: dict[str, Any]) -> list[PromptCall]:
    """The calls of a prompt file (see the module docstring); ``fields``: the other request fields, as
    :func:`~starflow_trt.request.build_request` takes them. Usage errors name the option."""
    if len(negative) > 1:
        raise click.BadParameter("give one negative prompt for every line of --prompts", param_hint="'--negative-prompt'")
    lines = read_prompt_file(path).lines
    seeds = [seed + k for k in range(len(lines))]
    aspects = [draw_aspect(summary, s) if aspect == RANDOM_ASPECT else aspect for s in seeds]
    calls = []
    try:
        for a in dict.fromkeys(aspects):   # each aspect once, in first-line order
            rows = [k for k in range(len(lines)) if aspects[k] == a]
            probe = _request(summary, [lines[rows[0]]], [seeds[rows[0]]], a, negative, fields)
            groups = [rows] if probe.exact_batching else [[k] for k in rows]
            for group in groups:
                picked = [lines[k] for k in group]
                calls.append(PromptCall(tuple(picked), _request(summary, picked, [seeds[k] for k in group], a,
                                                                negative, fields)))
    except RequestError as exc:
        raise options.option_error(exc) from None
    return calls


def _request(summary: ModelSummary, lines: list[PromptLine], seeds: list[int], aspect: Optional[str],
             negative: list[str], fields: dict[str, Any]) -> GenerationRequest:
    return build_request(summary, prompt=[p.text for p in lines], negative_prompt=negative * len(lines) or None,
                         seed=seeds, aspect=aspect, **fields)


def run_prompt_file(pipe, calls: list[PromptCall], out_dir: Path, cli: dict) -> list[str]:
    """Run every call; write ``video_<line>.mp4`` (frames: VAE exports, pixel-space models),
    ``latents_<line>.npy`` and ``stats.json`` (per line: prompt, seed, aspect, files; per call: its stats)
    into ``out_dir`` (the caller stages it). Returns the video names."""
    from .. import logs
    from ..runtime.outputs import save_npy_atomic, write_row_video
    from ..staging import write_json_atomic

    total = sum(len(c.lines) for c in calls)
    bar = logs.progress(total=total, desc="prompts", unit="video", leave=True)
    records, runs, videos = [], [], []
    try:
        for call in calls:
            result = pipe.run(call.request)
            seeds = call.request.seed
            for j, line in enumerate(call.lines):
                stem = f"{line.line:04d}"
                latents = save_npy_atomic(result.latents[j].numpy(), out_dir / f"latents_{stem}.npy")
                video = write_row_video(result, j, pipe, out_dir / f"video_{stem}.mp4", call.request.fps)
                if video is not None:
                    videos.append(video.name)
                records.append({"line": line.line, "prompt": line.text, "seed": seeds[j],
                                "aspect": call.request.aspect, "latents": latents.name,
                                "video": None if video is None else video.name})
            runs.append(result.stats)
            bar.update(len(call.lines))
    finally:
        bar.close()
    write_json_atomic(out_dir / "stats.json", {"prompts": records, "calls": runs, "cli": cli}, strict=True)
    return videos
