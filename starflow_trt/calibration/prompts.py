"""Calibration prompts as text: a file of prompts (one a line) or the default set shipped in this package.

    prompt_set = read_prompt_file("prompts.txt")          # or default_prompt_set()
    y, y_uncond = encode_prompt_set(pipe, prompt_set)      # [N, L, D] each, through the export's text encoder

Encoding goes through :meth:`Pipeline.encode_text`, so the captions get upstream's templates exactly as
``generate --prompt`` gives them (the export's fps and default aspect), and the unconditional embeddings are
the template around ``""``. Where a set came from is recorded in the calibrated manifest (:meth:`PromptSet.record`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import torch

from ..errors import InputError
from ..prompts import read_prompt_file as prompt_lines

if TYPE_CHECKING:
    from ..runtime.pipeline import Pipeline
    from ..runtime.stages.text import TextStage

#: package data: the default set, varied video prompts (subject, motion, camera, style, lighting), one a line
DEFAULT_PROMPTS_FILE = "prompts.txt"


@dataclass(frozen=True)
class PromptSet:
    """Calibration prompts and where they came from.

    ``source``: ``"default"`` (:data:`DEFAULT_PROMPTS_FILE`), ``"file"`` (``path``) or the name of a set a
    caller made (``"toy"``); ``sha256``: of the file the prompts were read from.
    """

    prompts: tuple[str, ...]
    source: str
    path: Optional[str] = None
    sha256: Optional[str] = None

    def describe(self) -> str:
        """How an error message names this set."""
        return f"--prompts {self.path}" if self.source == "file" else f"the {self.source} prompt set"

    def first(self, count: Optional[int]) -> "PromptSet":
        """The first ``count`` prompts (None: all); more than the set holds is an input error."""
        if count is None:
            return self
        if not 1 <= count <= len(self.prompts):
            raise InputError(f"--samples {count} but {self.describe()} has {len(self.prompts)} prompt(s); pass at "
                             f"most {len(self.prompts)} samples or more prompts")
        return PromptSet(self.prompts[:count], self.source, self.path, self.sha256)

    def record(self) -> dict[str, Any]:
        """The calibrated manifest's entry: which set, its hash, how many prompts were used."""
        out: dict[str, Any] = {"source": self.source, "count": len(self.prompts)}
        if self.path is not None:
            out["path"] = self.path
        if self.sha256 is not None:
            out["sha256"] = self.sha256
        return out


def read_prompt_file(path: Union[str, Path], max_chars: Optional[int] = None) -> PromptSet:
    """``calibrate --prompts FILE``: the file's prompts (:func:`starflow_trt.prompts.read_prompt_file`)."""
    f = prompt_lines(path, "--prompts", max_chars)
    return PromptSet(f.prompts, "file", f.path, f.sha256)


def default_prompt_set() -> PromptSet:
    """The set shipped with the package (:data:`DEFAULT_PROMPTS_FILE`), for encoders that read free text."""
    data = (resources.files(__package__) / DEFAULT_PROMPTS_FILE).read_bytes()
    prompts = tuple(p for p in (line.strip() for line in data.decode("utf-8").splitlines()) if p)
    return PromptSet(prompts, "default", sha256=hashlib.sha256(data).hexdigest())


def text_stage_of(pipe: "Pipeline") -> Optional["TextStage"]:
    """The export's prompt encoder (its text_encoder graph, or the bundled toy's words); None when it takes
    embeddings only. A broken text_encoder graph (tokenizer files changed) is an error."""
    return None if pipe.summary.prompt_encoder is None else pipe.text_stage


def template_options(pipe: "Pipeline") -> dict[str, Any]:
    """fps and aspect of the calibration captions: the export's defaults, those of ``generate --prompt`` without
    ``--fps`` / ``--aspect`` (calibration samples on the default grid)."""
    return {"fps": pipe.summary.default_fps, "aspect": pipe.summary.aspect}


def encode_prompt_set(pipe: "Pipeline", prompt_set: PromptSet) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, y_uncond) [N, L, D] of the set's prompts through the export's text encoder (uncond: ``""``)."""
    return pipe.encode_text(list(prompt_set.prompts), **template_options(pipe))
