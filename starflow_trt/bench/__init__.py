"""Benchmarks: machine probes, workloads, roofline, GPU projections, reports."""
