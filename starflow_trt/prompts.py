"""Prompt files as upstream ships them: one prompt per line, each keeping its line number.

    lines = read_prompt_file("prompts.txt", max_chars=2000)   # [PromptLine(line=1, text="a cat ..."), ...]

Blank lines are skipped (a line's number stays its place in the file, so outputs named by it can be
traced back); surrounding whitespace is stripped. Torch-free.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Union

from .errors import InputError


@dataclass(frozen=True)
class PromptLine:
    line: int    # 1-based line number in the file
    text: str


def read_prompt_file(path: Union[str, os.PathLike], max_chars: int) -> list[PromptLine]:
    """The non-blank lines of a UTF-8 text file; InputError (naming the file and line) for a missing,
    unreadable or empty file, or a line of more than ``max_chars`` characters."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = f.read().splitlines()
    except FileNotFoundError:
        raise InputError(f"prompt file {path} does not exist; pass a text file with one prompt per line") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read prompt file {path} ({type(exc).__name__}); pass a UTF-8 text file with "
                         "one prompt per line") from None
    lines = [PromptLine(i, text.strip()) for i, text in enumerate(raw, 1) if text.strip()]
    if not lines:
        raise InputError(f"prompt file {path} holds no prompt; write one prompt per line")
    for p in lines:
        if len(p.text) > max_chars:
            raise InputError(f"{path}:{p.line}: {len(p.text)} characters exceed the limit of {max_chars}; "
                             "shorten the prompt")
    return lines
