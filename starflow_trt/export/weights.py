"""Weights of one graph taken from a (memory-mapped) state dict, without building the whole model.

FP16/BF16 exports (``dtype``): the Linear layers' weights and biases are converted tensor by
tensor from the stored dtype (e.g. a BF16 checkpoint) straight to the export dtype, never
through a float32 copy of the block; the precision-critical small tensors (norm weights,
the SOS vector, the affine head ``proj_out``) stay float32. A converted tensor's pages of a
memory-mapped checkpoint are handed back to the OS (they are re-read from the file if
touched again), so converting a block costs its converted size, not that plus the source.
"""

from __future__ import annotations

import ctypes
import mmap
from typing import Callable

import torch
from torch import nn

from ..config import ModelConfig
from ..reference.denoiser import Denoiser
from ..reference.flow import FlowBlock
from ..reference.model import deprecated_buffer_values

#: Linear layers of a flow block kept in float32 in a half-precision export (its affine head)
FP32_LINEARS = ("proj_out",)


class BlockLoader:
    """Builds one block (or the denoiser, or any module) with only its tensors taken from the state dict.

    ``dtype``: float32 (default), float16 or bfloat16 (the Linear layers; see the module docstring).
    """

    def __init__(self, cfg: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32):
        self.cfg = cfg
        self.state = state
        self.dtype = dtype
        self.defaults = deprecated_buffer_values(cfg)

    def __call__(self, prefix: str) -> nn.Module:
        """``blocks.{k}.`` → FlowBlock k, ``learnable_self_denoiser.`` → Denoiser."""
        if prefix.startswith("learnable_self_denoiser"):
            return self.denoiser()
        return self.block(int(prefix.split(".")[1]))

    def block(self, k: int) -> FlowBlock:
        return self.load(lambda: FlowBlock(self.cfg, k), f"blocks.{k}.")

    def denoiser(self) -> Denoiser:
        return self.load(lambda: Denoiser(self.cfg), "learnable_self_denoiser.")

    def load(self, factory: Callable[[], nn.Module], prefix: str) -> nn.Module:
        """``factory()`` built on the meta device, then given the tensors under ``prefix`` (strict):
        float32, or the export dtype for Linear layers (not :data:`FP32_LINEARS`)."""
        with torch.device("meta"):
            module = factory()
        half = self._half_names(module)
        sub = {k[len(prefix):]: v for k, v in self.state.items() if k.startswith(prefix)}
        for k, v in self.defaults.items():
            if k.startswith(prefix):
                sub.setdefault(k[len(prefix):], v)
        sub = {k: _convert(v, self.dtype if k in half else torch.float32) for k, v in sub.items()}
        module.load_state_dict(sub, strict=True, assign=True)
        return module.eval().requires_grad_(False)

    def _half_names(self, module: nn.Module) -> set[str]:
        if self.dtype == torch.float32:
            return set()
        keep = FP32_LINEARS if isinstance(module, FlowBlock) else ()
        return {f"{name}.{p}" for name, m in module.named_modules() if isinstance(m, nn.Linear)
                and name not in keep for p, _ in m.named_parameters(recurse=False)}

    def tensor(self, name: str) -> torch.Tensor:
        """One state-dict tensor as float32 (KeyError names it when absent)."""
        return self.state[name].float()


def _convert(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``; when that copied a file-mapped tensor, its source pages leave the RSS."""
    if t.dtype == dtype:
        return t
    out = t.to(dtype)
    _release_mapped(t)
    return out


_MADV_DONTNEED = 4
_PAGE = mmap.PAGESIZE


def _file_mapped(addr: int) -> bool:
    """True when ``addr`` lies in a private mapping of a regular file (a memory-mapped checkpoint)."""
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as fh:
            for line in fh:
                parts = line.split(maxsplit=5)
                lo, hi = (int(v, 16) for v in parts[0].split("-"))
                if lo <= addr < hi:
                    path = parts[5].strip() if len(parts) > 5 else ""
                    return path.startswith("/") and parts[1].endswith("p")
    except OSError:
        return False
    return False


def _release_mapped(t: torch.Tensor, min_bytes: int = 1 << 24) -> None:
    """MADV_DONTNEED the whole pages of a large, file-backed, private, never-written CPU tensor: they are
    dropped from this process (and re-read from the file on the next touch). Anonymous memory is never
    touched (there the advice would zero it)."""
    nbytes = t.numel() * t.element_size()
    if t.device.type != "cpu" or nbytes < min_bytes:
        return
    start = t.data_ptr()
    lo = -(-start // _PAGE) * _PAGE
    hi = (start + nbytes) // _PAGE * _PAGE
    if hi <= lo or not _file_mapped(start):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), ctypes.c_int(_MADV_DONTNEED))
    except (OSError, AttributeError):   # not Linux / no libc: the pages simply stay mapped
        pass
