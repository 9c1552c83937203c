"""starflow-trt: deployment toolchain for STARFlow-V (ONNX export, TensorRT engines, runtime)."""

__version__ = "0.1.0"
