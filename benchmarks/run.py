"""Rerun the published benchmarks into this folder: ``python benchmarks/run.py [--runs 5] [--no-int8] [--quick]``.

Same as ``starflow-trt bench -o benchmarks/results --cache benchmarks/.cache`` run from the repository root.
"""

import argparse
from pathlib import Path

from starflow_trt.bench.run import run_benchmarks

HERE = Path(__file__).resolve().parent

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--no-int8", action="store_true")
    parser.add_argument("--quick", action="store_true", help="smoke run at small shapes (not the published figures)")
    parser.add_argument("-o", "--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    run_benchmarks(args.out, HERE / ".cache", runs=args.runs, int8=False if args.no_int8 else None, quick=args.quick)
