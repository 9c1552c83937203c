"""``torch`` backend: runs the export wrappers themselves in PyTorch (debugging, parity).

It needs the checkpoint the graphs were exported from (recorded in the manifest;
pass ``checkpoint=`` if it moved). The sha256 is checked so the two cannot drift.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional, Union

import torch

from ...errors import ManifestError
from ...export.manifest import GraphSpec, Manifest
from .base import Backend, GraphRunner


class TorchRunner(GraphRunner):
    def __init__(self, spec: GraphSpec, module: torch.nn.Module):
        super().__init__(spec)
        self.module = module

    @torch.no_grad()
    def run(self, inputs: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]) -> None:
        args = [inputs[t.name] for t in self.spec.inputs if t.name in inputs]
        result = self.module(*args)
        result = result if isinstance(result, tuple) else (result,)
        for info, value in zip(self.spec.outputs, result):
            outputs[info.name].copy_(value)


class TorchBackend(Backend):
    """``torch``: the reference modules behind the same named-binding interface."""

    name = "torch"

    def __init__(self, manifest: Manifest, checkpoint: Optional[Union[str, os.PathLike]] = None):
        from ...checkpoint import load_state_dict, sha256_file, strip_wrapper_prefixes
        from ...export.onnx_export import BlockLoader

        path = Path(checkpoint or manifest.checkpoint.get("path", ""))
        if not path.is_file():
            raise ManifestError(f"backend 'torch' needs the checkpoint the graphs came from; "
                                f"{str(path) or 'none'} not found: pass checkpoint=PATH (--checkpoint)")
        if sha256_file(path) != manifest.checkpoint.get("sha256"):
            raise ManifestError(f"checkpoint {path} is not the one {manifest.root} was exported from (sha256 differs)")
        state, _ = strip_wrapper_prefixes(load_state_dict(path))
        self.loader = BlockLoader(manifest.config, state)
        self.frame_local = manifest.geometry.frame_local
        self.top = manifest.geometry.top_index

    def load(self, spec: GraphSpec) -> GraphRunner:
        from ...export.graphs import DenoiserGraph, ForwardGraph, StepGraph, TextPrefillGraph

        if spec.kind == "denoiser":
            return TorchRunner(spec, DenoiserGraph(self.loader("learnable_self_denoiser.")))
        block = self.loader(f"blocks.{spec.block}.")
        if spec.kind == "prefill":
            module = TextPrefillGraph(block)
        elif spec.kind == "step":
            module = StepGraph(block)
        else:
            module = ForwardGraph(block, self.frame_local and spec.block != self.top)
        return TorchRunner(spec, module)
