"""FP16 / INT8: activation capture, Q/DQ graphs, TensorRT calibration cache, quality gate."""

from .calibrate import QualityGate, calibrate_directory, default_gate
from .trt_cache import read_cache, write_cache

__all__ = ["calibrate_directory", "QualityGate", "default_gate", "read_cache", "write_cache"]
