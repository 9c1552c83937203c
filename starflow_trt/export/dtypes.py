"""The torch dtype of each tensor dtype name the manifest records (``TensorInfo.dtype``)."""

from __future__ import annotations

import torch

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "int64": torch.int64, "int32": torch.int32, "int8": torch.int8, "bool": torch.bool}
