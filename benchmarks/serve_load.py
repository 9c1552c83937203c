"""Ray Serve load benchmark vs a direct in-process Pipeline on the toy model (needs ``starflow-trt[serve]``).

    python benchmarks/serve_load.py [--workloads default,exact] [--levels 1,2,4,8,16] [--requests 8]

Writes ``benchmarks/results/serve_load.{json,md,png}``; see ``starflow_trt/bench/serve_load.py``.
"""

from starflow_trt.bench.serve_load import main

if __name__ == "__main__":
    main()
