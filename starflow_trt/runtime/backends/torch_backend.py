"""``torch`` backend: runs the export wrappers themselves in PyTorch (debugging, parity).

It needs the checkpoint the graphs were exported from (recorded in the manifest;
pass ``checkpoint=`` if it moved). The sha256 is checked so the two cannot drift. Media graphs
(text encoder, VAE) are rebuilt from the source weights their manifest entries record (same check).
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
    def infer_impl(self, inputs: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]) -> None:
        result = self.module(*(inputs[t.name] for t in self.spec.inputs))
        result = result if isinstance(result, tuple) else (result,)
        for info, value in zip(self.spec.outputs, result):
            outputs[info.name].copy_(value)

    def close(self) -> None:
        super().close()
        self.module = None


class TorchBackend(Backend):
    """``torch``: the export wrappers (built by each graph's registered kind) behind the same interface."""

    name = "torch"

    def __init__(self, manifest: Manifest, checkpoint: Optional[Union[str, os.PathLike]] = None):
        from ...checkpoint import load_state_dict, sha256_file, strip_wrapper_prefixes
        from ...export.weights import BlockLoader

        super().__init__()
        path = Path(checkpoint or manifest.checkpoint.get("path", ""))
        if not path.is_file():
            raise ManifestError(f"backend 'torch' needs the checkpoint the graphs came from; "
                                f"{str(path) or 'none'} not found: pass checkpoint=PATH (--checkpoint)")
        if sha256_file(path) != manifest.checkpoint.get("sha256"):
            raise ManifestError(f"checkpoint {path} is not the one {manifest.root} was exported from (sha256 differs)")
        state, _ = strip_wrapper_prefixes(load_state_dict(path))
        self.loader = BlockLoader(manifest.config, state)
        self.geo = manifest.geometry

    def load_impl(self, spec: GraphSpec) -> GraphRunner:
        from ...export.registry import graph_kind

        from ...export.weights import BlockLoader
        from .base import TORCH_DTYPES

        kind = graph_kind(spec.kind)
        # graphs of an `export --dtype fp16|bf16` take half K/V: build their modules in that dtype
        kv = TORCH_DTYPES[next((t.dtype for t in spec.outputs if t.name.startswith("new_k_")), "float32")]
        loader = self.loader if kv == torch.float32 else BlockLoader(self.loader.cfg, self.loader.state, kv)
        # a kind with its own weights (text encoder, VAE) rebuilds them from the source its entry records
        return TorchRunner(spec, kind.build(self.geo, spec.block, kind.runtime_weights(spec, loader)))

    def release(self) -> None:
        self.loader = None
