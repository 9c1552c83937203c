"""Checkpoint loading: ``.pth`` (``torch.load(weights_only=True)`` only) and ``.safetensors``.

Nothing here unpickles arbitrary objects: a ``.pth`` holding code objects is
refused by torch's weights-only unpickler and reported as such.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Mapping, Optional, Union

import torch

from .errors import CheckpointError
from .staging import fix_mode

PathLike = Union[str, os.PathLike]
#: {state_dict key: tensor shape}
Shapes = Mapping[str, tuple[int, ...]]
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
#: Deprecated upstream buffers (spec §2.2): accepted when present, tolerated when absent, never read.
DEPRECATED_KEYS_PATTERNS = (re.compile(r"^var$"), re.compile(r"^blocks\.\d+\.attn_mask$"),
                            re.compile(r"^feat_rope\.freqs_(cos|sin)$"))
_SHOW = 20


def is_deprecated_key(key: str) -> bool:
    return any(p.match(key) for p in DEPRECATED_KEYS_PATTERNS)


def _refusal(exc: Exception) -> Optional[str]:
    """The offending global named by torch's weights-only unpickler, if that is why it failed."""
    match = re.search(r"GLOBAL ([\w.]+)", str(exc))
    return match.group(1) if match else None


def _reason(exc: BaseException) -> str:
    """A short reason for a failed ``torch.load``, without torch's advice to retry with
    ``weights_only=False`` (which would execute code from the file: never for this project)."""
    text = str(exc)
    match = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    if match:
        return " ".join(match.group(1).split())[:200]
    first = text.strip().splitlines()[0] if text.strip() else ""
    if not first or "weights_only" in first or "Weights only" in first:
        return type(exc).__name__
    return first[:200]


def load_state_dict(path: PathLike, *, mmap: bool = True) -> dict[str, torch.Tensor]:
    """Read a state_dict (``.safetensors`` or a torch ``.pth``) as {key: tensor}, stored dtypes kept.

    ``.pth`` goes through ``torch.load(weights_only=True)`` (memory-mapped when the file is in
    the zip format). A file whose top level is ``{"model": sd}`` or ``{"state_dict": sd}`` is unwrapped.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} not found; pass the path of a .pth or .safetensors state_dict")
    if p.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {p} is empty (0 bytes); re-download or re-save it")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(p)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {p} is not a valid safetensors file ({exc}); re-save it") from exc
    use_mmap = mmap and zipfile.is_zipfile(p)
    try:
        data = torch.load(p, map_location="cpu", weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as exc:
        culprit = _refusal(exc)
        if culprit:
            raise CheckpointError(
                f"checkpoint {p} refused: it contains pickled code objects ({culprit}); only plain state_dicts "
                "are loaded; re-save with torch.save(model.state_dict())") from exc
        raise CheckpointError(f"checkpoint {p} is not a torch state_dict (unpickling failed: {_reason(exc)}); "
                              "pass a .pth saved with torch.save(model.state_dict()) or a .safetensors file") from exc
    except ImportError:
        raise  # a broken installation, not a bad file: never reported as one
    except Exception as exc:  # noqa: BLE001 - garbage bytes make the unpickler raise anything
        reason = _reason(exc)
        raise CheckpointError(f"checkpoint {p} is truncated or not a torch checkpoint ({reason}); "
                              "re-download or re-save it") from exc
    if isinstance(data, Mapping) and len(data) == 1 and next(iter(data)) in ("model", "state_dict"):
        data = next(iter(data.values()))
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"checkpoint {p} does not hold a state_dict (a dict of tensors); "
                              "save model.state_dict() instead")
    return dict(data)


def strip_wrapper_prefixes(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Remove a prefix shared by all keys among ``module.`` / ``_orig_mod.`` (repeatedly)."""
    state = dict(state)
    notes = []
    changed = True
    while changed and state:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                notes.append(f"stripped prefix {prefix!r} from {len(state)} keys")
                changed = True
    return state, notes


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOW])
    return shown + (f" ... and {len(keys) - _SHOW} more" if len(keys) > _SHOW else "")


def validate_state_dict(state: Mapping[str, torch.Tensor], expected: Shapes) -> None:
    """Raise one CheckpointError listing every missing, unexpected and mis-shaped key."""
    missing = sorted(k for k in expected if k not in state and not is_deprecated_key(k))
    unexpected = sorted(k for k in state if k not in expected)
    mismatched = sorted(k for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k]))
    if not (missing or unexpected or mismatched):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing: {_listing(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected: {_listing(unexpected)}")
    if mismatched:
        parts.append(f"{len(mismatched)} shape-mismatched: " + _listing(
            [f"{k} {tuple(state[k].shape)} != {tuple(expected[k])}" for k in mismatched]))
    common = [k for k in state if k in expected]
    hint = "fix the config or pass the matching checkpoint"
    if common and len(mismatched) > len(common) // 2:
        hint = "the checkpoint was trained with a different config; pass the config it was trained with"
    raise CheckpointError("checkpoint does not match the config: " + "; ".join(parts) + f" ({hint})")


def load_checkpoint(path: PathLike, expected: Union[Shapes, Callable[[Mapping[str, torch.Tensor]], Shapes]]
                    ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The one way a model checkpoint is read: load (:func:`load_state_dict`), strip wrapper prefixes,
    validate (:func:`validate_state_dict`). Returns the state_dict, stored dtypes kept, and notes on
    the prefixes stripped.

    ``expected`` is {key: shape}, or a function of the loaded state returning it: for a config whose
    sizes the checkpoint completes (``txt_dim``, :func:`starflow_trt.reference.load_weights`)."""
    state, notes = strip_wrapper_prefixes(load_state_dict(path))
    validate_state_dict(state, expected(state) if callable(expected) else expected)
    return state, notes


def save_state_dict(state: Mapping[str, torch.Tensor], path: PathLike) -> Path:
    """Atomically write a state_dict as ``.safetensors`` or torch ``.pth`` (by suffix)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    os.close(fd)
    try:
        tensors, seen = {}, set()
        for k, v in state.items():  # safetensors refuses aliased storage (e.g. tied buffers)
            v = v.detach().contiguous()
            ptr = v.untyped_storage().data_ptr()
            tensors[k] = v.clone() if ptr in seen else v
            seen.add(ptr)
        if p.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, tmp)
        else:
            torch.save(tensors, tmp)
        fix_mode(tmp)  # mkstemp makes 0600; a saved checkpoint gets the usual umask mode
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return p
