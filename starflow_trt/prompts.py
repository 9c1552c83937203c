"""Prompt files as upstream ships them: one prompt per line, each keeping its line number.

    f = read_prompt_file("prompts.txt", option="--prompts")   # f.lines: [PromptLine(line=1, text="a cat ..."), ...]

Blank lines are skipped (a line's number stays its place in the file, so outputs named by it can be traced
back); surrounding whitespace and a UTF-8 byte-order mark are stripped. ``generate --prompts`` and
``calibrate --prompts`` read them here. Torch-free.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from .errors import InputError


@dataclass(frozen=True)
class PromptLine:
    line: int    # 1-based line number in the file
    text: str


@dataclass(frozen=True)
class PromptFile:
    path: str                       # resolved
    sha256: str                     # of the file's bytes
    lines: tuple[PromptLine, ...]   # the non-blank lines, in file order

    @property
    def prompts(self) -> tuple[str, ...]:
        return tuple(p.text for p in self.lines)


def read_prompt_file(path: Union[str, os.PathLike], option: str = "--prompts",
                     max_chars: Optional[int] = None) -> PromptFile:
    """The non-blank lines of a UTF-8 text file; an InputError naming ``option``, the file and the line for a
    missing, non-UTF-8 or empty file, or a line of more than ``max_chars`` characters (default: a request's
    :attr:`~starflow_trt.request.RequestLimits.max_prompt_chars`)."""
    if max_chars is None:
        from .request import RequestLimits

        max_chars = RequestLimits().max_prompt_chars
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{option} {path}: no such file; pass a text file with one prompt a line")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")   # a byte-order mark (some editors write one) is not part of the first prompt
    except UnicodeDecodeError as exc:
        raise InputError(f"{option} {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                         "save it as UTF-8, one prompt a line") from None
    lines = tuple(PromptLine(i, t.strip()) for i, t in enumerate(text.splitlines(), 1) if t.strip())
    if not lines:
        raise InputError(f"{option} {path} holds no prompt (empty or blank lines only); write one prompt a line")
    for p in lines:
        if len(p.text) > max_chars:
            raise InputError(f"{option} {path}: line {p.line} has {len(p.text)} characters, over the limit of "
                             f"{max_chars} a prompt; shorten it")
    return PromptFile(str(path.resolve()), hashlib.sha256(data).hexdigest(), lines)
