"""Rerun all benchmarks: ``python benchmarks/run.py [--runs 5] [--no-int8]`` (same as ``starflow-trt bench``)."""

import argparse

from starflow_trt.bench.run import run_benchmarks

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-int8", action="store_true")
    args = parser.parse_args()
    run_benchmarks(runs=args.runs, int8=not args.no_int8)
