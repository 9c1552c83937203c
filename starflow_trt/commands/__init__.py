"""CLI verbs, one module each; ``starflow_trt.cli`` registers them."""
