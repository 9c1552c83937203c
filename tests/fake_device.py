"""A fake accelerator for CPU tests: tensors "on the device" raise on mixing with CPU tensors, as CUDA does.

    with FakeDevice() as fake:
        x = torch.zeros(3, device=fake.device)   # a CPU tensor tagged as on the device; x.device == fake.device
        x + torch.ones(3)                          # RuntimeError: Expected all tensors to be on the same device

A :class:`~torch.overrides.TorchFunctionMode` sees every torch call. A factory or ``.to`` given
``fake.device`` (``meta``, which no real tensor of these tests uses) runs on the CPU and its result is
tagged; results of ops on tagged tensors are tagged; ``.device`` of a tagged tensor reports
``fake.device``. An op that takes a tagged tensor and an untagged CPU tensor of one or more
dimensions raises like CUDA's device check (CPU 0-dim tensors may mix, as on CUDA); copies
(``copy_``, slice assignment, ``.to``, ``.cpu()``) may cross. ``nn.Parameter`` counts as on the
device: the backend under test placed the module there.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

FAKE = torch.device("meta")
_DEVICE_ATTR = torch._C.TensorBase.__dict__["device"]
_TAG = "_on_fake_device"
#: calls that may take tensors of both devices (cross-device copies, CPU indices of device tensors)
_CROSSING = {torch.Tensor.copy_, torch.Tensor.__setitem__, torch.Tensor.to, torch.Tensor.cpu,
             torch.Tensor.__getitem__}
#: calls whose result is on the CPU
_TO_HOST = {torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.tolist, torch.Tensor.item}


def on_fake(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and (getattr(t, _TAG, False) or isinstance(t, nn.Parameter))


def _tag(t: Any) -> Any:
    if isinstance(t, torch.Tensor):
        setattr(t, _TAG, True)
    return t


def _is_fake(d: Any) -> bool:
    return (isinstance(d, torch.device) and d.type == FAKE.type) or d == FAKE.type


def _host(d: Any) -> bool:
    return (isinstance(d, torch.device) and d.type == "cpu") or d == "cpu"


class FakeDevice(TorchFunctionMode):
    """The mode; ``device`` is what tagged tensors report. ``calls`` counts intercepted calls."""

    device = FAKE

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        self.calls += 1
        if getattr(func, "__self__", None) is _DEVICE_ATTR:   # ``t.device``
            return FAKE if on_fake(args[0]) else func(*args)
        to_fake = any(_is_fake(a) for a in (*args[1:], *kwargs.values())) or _is_fake(kwargs.get("device"))
        if to_fake:   # run on the CPU, tag the result
            args = tuple(torch.device("cpu") if _is_fake(a) else a for a in args)
            kwargs = {k: torch.device("cpu") if _is_fake(v) else v for k, v in kwargs.items()}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        fake = [t for t in tensors if on_fake(t)]
        host = [t for t in tensors if not on_fake(t) and t.dim() > 0]
        if fake and host and func not in _CROSSING:
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                               f"{FAKE} and cpu! ({getattr(func, '__name__', func)}, CPU shapes "
                               f"{[tuple(t.shape) for t in host]})")
        if func is torch.Tensor.__getitem__ and not on_fake(args[0]) and fake:
            raise RuntimeError(f"indices should be either on cpu or on the same device as the indexed tensor (cpu)")
        out = func(*args, **kwargs)
        to_host = func in _TO_HOST or (func is torch.Tensor.to and not to_fake and any(
            _host(a) for a in (*args[1:], kwargs.get("device"))))
        if to_host:
            if out is args[0] and on_fake(out):   # .cpu() of a CPU tensor is itself: give an untagged copy
                out = out.clone()
            return out
        if args and out is args[0]:   # in place (or a no-op .to): the tensor stays where it is
            if not (to_fake and not on_fake(out)):
                return out
            out = out.clone()           # .to(device) of a CPU tensor: a copy on the "device", the source stays
        if to_fake or fake:
            tree_map(_tag, out)
        return out
