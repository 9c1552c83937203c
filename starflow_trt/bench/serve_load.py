"""Load benchmark of the Ray Serve application against a direct in-process ``Pipeline`` (the toy model).

Closed loop on loopback: ``c`` clients each send a request, read its stream to the end and send the
next, until a fixed number of requests is done (or a time cap stops new ones). For every concurrency
(1, 2, 4, 8, 16): requests/s, p50/p99 latency and time to first frame, failed and lost requests, the
mean batch size. The baseline runs the same requests through one in-process ``Pipeline`` (one
``generate`` at a time, frames encoded to PNG as the server does), the way a program without a
serving engine would share one model between its clients. Served and baseline levels are interleaved
so a noisy machine disturbs both alike. Also recorded: cluster start-up time and the memory (RSS) of
every Ray process.

Workloads: ``default`` is the contract request (a toy prompt, its seed, guidance 3, the default
thresholded Jacobi schedule: requests run alone, see ``serving.batching``); ``exact`` samples token by
token (guidance 3), which batching cannot change, so concurrent requests share ``generate`` calls.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..staging import MANIFEST_NAME

REPO = Path(__file__).resolve().parents[2]
LEVELS = (1, 2, 4, 8, 16)
PROMPTS = ["a red square moving right", "a blue disc moving up", "a green square moving left",
           "a yellow disc moving down", "a red disc moving left", "a green disc moving down",
           "a blue square moving right", "a yellow square moving up"]
WORKLOADS = {
    "default": {"guidance": 3.0},
    "exact": {"guidance": 3.0, "sampler": "autoregressive"},
}


def _request(workload: str, i: int) -> dict:
    return {"prompt": PROMPTS[i % len(PROMPTS)], "seed": i, **WORKLOADS[workload]}


def _requests_at(c: int, per_level: int) -> int:
    return max(per_level, 2 * c)


def _pct(values: list[float], q: float) -> Optional[float]:
    return round(float(np.percentile(values, q)), 4) if values else None


def _summary(c: int, mode: str, records: list[dict], wall: float, issued: int) -> dict:
    ok = [r for r in records if r["status"] == "ok"]
    lat = [r["latency"] for r in ok]
    ttff = [r["ttff"] for r in ok if r["ttff"] is not None]
    batches = [r["batch"] for r in ok if r.get("batch")]
    return {"concurrency": c, "mode": mode, "issued": issued, "completed": len(ok),
            "failed": sum(r["status"] == "failed" for r in records),
            "lost": issued - len(records) + sum(r["status"] == "lost" for r in records),
            "wall_s": round(wall, 3), "requests_per_s": round(len(ok) / wall, 4) if wall > 0 else None,
            "latency_p50_s": _pct(lat, 50), "latency_p99_s": _pct(lat, 99),
            "ttff_p50_s": _pct(ttff, 50), "ttff_p99_s": _pct(ttff, 99),
            "batch_mean": round(float(np.mean(batches)), 2) if batches else None}


def closed_loop(c: int, n: int, one: Callable[[int], dict], max_seconds: float) -> tuple[list[dict], float, int]:
    """``c`` threads run ``one(i)`` for i = 0..n-1 (no new request after ``max_seconds``)."""
    lock = threading.Lock()
    state = {"next": 0}
    records: list[dict] = []
    t0 = time.perf_counter()

    def worker() -> None:
        while True:
            with lock:
                i = state["next"]
                if i >= n or time.perf_counter() - t0 > max_seconds:
                    return
                state["next"] += 1
            rec = one(i)
            with lock:
                records.append(rec)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(c)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records, time.perf_counter() - t0, state["next"]


# ------------------------------------------------------------------ one request, two ways
def served_request(port: int, body: dict) -> dict:
    t0 = time.perf_counter()
    ttff, frames, batch = None, 0, None
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request("POST", "/v1/videos", body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            resp.read()
            return {"status": "failed", "http": resp.status}
        while True:
            line = resp.readline()
            if not line:
                return {"status": "lost", "frames": frames}
            event = json.loads(line)
            if event["type"] == "frame":
                frames += 1
                if ttff is None:
                    ttff = time.perf_counter() - t0
            elif event["type"] == "done":
                batch = event["stats"].get("batch_size")
                return {"status": "ok", "latency": time.perf_counter() - t0, "ttff": ttff, "frames": frames,
                        "batch": batch}
            else:
                return {"status": "failed", "message": event.get("message")}
    except (OSError, http.client.HTTPException, ValueError) as exc:
        return {"status": "failed", "message": str(exc)}
    finally:
        conn.close()


class Baseline:
    """One in-process Pipeline shared by the client threads (one generate at a time)."""

    def __init__(self, directory: Path):
        from ..runtime import Pipeline
        from ..toy import load_bundled

        self.pipe = Pipeline.from_dir(directory, backend="ort", thread_pool="shared")
        self.toy = load_bundled()
        self.lock = threading.Lock()

    def request(self, body: dict) -> dict:
        from ..runtime import JacobiConfig
        from ..serving.frames import png_bytes

        t0 = time.perf_counter()
        first: list[float] = []

        def on_frame(i, frame) -> None:
            if not first:
                first.append(time.perf_counter() - t0)
            png_bytes(frame[0])

        y = self.toy.encode([body["prompt"]])
        yu = self.toy.encode([""])
        jacobi = None if body.get("sampler") == "autoregressive" else JacobiConfig()
        try:
            with self.lock:
                self.pipe.generate(y, yu, seed=body["seed"], guidance=body["guidance"], jacobi=jacobi,
                                   on_frame=on_frame)
        except Exception as exc:  # noqa: BLE001 - counted as failed
            return {"status": "failed", "message": str(exc)}
        return {"status": "ok", "latency": time.perf_counter() - t0, "ttff": first[0] if first else None,
                "batch": 1}


# ------------------------------------------------------------------ cluster
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_processes() -> list[dict]:
    """Every process below this one (Ray's, after ``ray.init``), with its RSS in MiB."""
    import psutil

    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = p.cmdline()
            if cmd and cmd[0].startswith("ray::"):
                name = cmd[0].split()[0].split(".")[0]       # actor process title (minus the running method)
            elif p.name().startswith("python") and len(cmd) > 1:
                name = next((c for c in cmd[1:] if c.endswith(".py")), cmd[1]).rsplit("/", 2)[-1]
            else:
                name = p.name()
            out.append({"pid": p.pid, "name": name, "rss_mib": round(p.memory_info().rss / 2**20, 1)})
        except psutil.Error:
            pass
    return sorted(out, key=lambda r: -r["rss_mib"])


def start_cluster(directory: Path, port: int, num_cpus: int, config=None) -> dict:
    """A loopback-only local cluster serving ``directory`` (``config``: a ServeConfig, default the defaults)."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray

    from ..serving.app import ServeConfig, start

    t0 = time.perf_counter()
    ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    t_ray = time.perf_counter() - t0
    start(directory, config or ServeConfig(thread_pool="shared"), host="127.0.0.1", port=port)
    return {"ray_init_s": round(t_ray, 2), "startup_s": round(time.perf_counter() - t0, 2)}


# ------------------------------------------------------------------ run
def toy_graphs(log=print) -> Path:
    """The toy export the serving benchmarks share (exported once into benchmarks/.cache)."""
    directory = REPO / "benchmarks" / ".cache" / "toy_graphs"
    if not (directory / MANIFEST_NAME).exists():
        from ..export.onnx_export import ExportLimits, export_graphs
        from ..toy import load_bundled

        log(f"exporting the toy model to {directory}")
        toy = load_bundled()
        export_graphs(toy.config_path, toy.checkpoint_path, directory, limits=ExportLimits(max_batch=8), force=True)
    return directory


def run(out_dir: Path, directory: Optional[Path], workloads: list[str], levels: tuple[int, ...], per_level: int,
        max_seconds: float, num_cpus: int = 2, log=print) -> dict:
    from .machine import machine_info

    directory = directory or toy_graphs(log)
    port = _free_port()
    log("baseline pipeline: loading and warming up")
    base = Baseline(directory)
    for w in workloads:
        base.request(_request(w, 0))
    log("starting a local Ray cluster and the application")
    cluster = start_cluster(directory, port, num_cpus)
    for w in workloads:
        served_request(port, _request(w, 0))  # warm-up
    cluster["processes_idle"] = ray_processes()
    result = {"machine": machine_info(), "cluster": cluster, "per_level": per_level, "max_seconds": max_seconds,
              "workloads": {}}
    try:
        for w in workloads:
            rows = []
            for c in levels:
                n = _requests_at(c, per_level)
                for mode in ("baseline", "served"):
                    one = ((lambda i, w=w: base.request(_request(w, 1000 + i))) if mode == "baseline" else
                           (lambda i, w=w: served_request(port, _request(w, 1000 + i))))
                    records, wall, issued = closed_loop(c, n, one, max_seconds)
                    row = _summary(c, mode, records, wall, issued)
                    rows.append(row)
                    log(f"{w:8s} c={c:2d} {mode:8s} {row['requests_per_s']} req/s  p50 {row['latency_p50_s']} s  "
                        f"p99 {row['latency_p99_s']} s  ttff p99 {row['ttff_p99_s']} s  failed {row['failed']} "
                        f"lost {row['lost']}  batch {row['batch_mean']}")
            result["workloads"][w] = {"request": _request(w, 0), "rows": rows}
        cluster["processes_loaded"] = ray_processes()
    finally:
        from ray import serve
        import ray

        serve.shutdown()
        ray.shutdown()
    cluster["rss_mib_total_idle"] = round(sum(p["rss_mib"] for p in cluster["processes_idle"]), 1)
    cluster["rss_mib_total_loaded"] = round(sum(p["rss_mib"] for p in cluster.get("processes_loaded", [])), 1)
    result["acceptance"] = _acceptance(result)
    write_results(result, out_dir)
    return result


def _acceptance(result: dict) -> dict:
    out = {}
    for w, data in result["workloads"].items():
        rows = {(r["concurrency"], r["mode"]): r for r in data["rows"]}
        s, b = rows.get((8, "served")), rows.get((8, "baseline"))
        if s and b:
            ratio = s["requests_per_s"] / b["requests_per_s"] if b["requests_per_s"] else None
            out[w] = {"c8_served_rps": s["requests_per_s"], "c8_baseline_rps": b["requests_per_s"],
                      "throughput_ratio": None if ratio is None else round(ratio, 3),
                      "c8_failed": s["failed"], "c8_lost": s["lost"], "c8_ttff_p99_s": s["ttff_p99_s"],
                      "pass": s["failed"] == 0 and s["lost"] == 0 and ratio is not None and ratio >= 0.8}
    return out


def write_results(result: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "serve_load.json", out_dir / "serve_load.md"]
    paths[0].write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    paths[1].write_text(markdown(result), encoding="utf-8")
    png = plot(result, out_dir / "serve_load.png")
    return paths + ([png] if png else [])


SERVE_COLUMNS = [("concurrency", "concurrency", ""), ("mode", "mode", ""), ("req/s", "requests_per_s", ""),
                 ("p50 latency (s)", "latency_p50_s", ""), ("p99 latency (s)", "latency_p99_s", ""),
                 ("p50 TTFF (s)", "ttff_p50_s", ""), ("p99 TTFF (s)", "ttff_p99_s", ""), ("failed", "failed", ""),
                 ("lost", "lost", ""), ("mean batch", "batch_mean", "")]


def markdown(result: dict) -> str:
    from .report import markdown_table

    cl = result["cluster"]
    lines = ["# Serving load benchmark (toy model, loopback, CPU)", "",
             f"Machine: {result['machine'].get('cpu')}, {result['machine'].get('cores')} cores (shared). "
             f"Cluster start-up (ray.init + Serve + replicas ready): {cl['startup_s']} s "
             f"(ray.init {cl['ray_init_s']} s). "
             f"Ray processes RSS: {cl.get('rss_mib_total_idle')} MiB idle, {cl.get('rss_mib_total_loaded')} MiB after "
             f"the load ({len(cl.get('processes_loaded', []))} processes).", ""]
    for w, data in result["workloads"].items():
        lines += [f"## {w}: `{json.dumps(data['request'])}`", "",
                  *markdown_table(data["rows"], SERVE_COLUMNS)]
        acc = result.get("acceptance", {}).get(w)
        if acc:
            lines += ["", f"Concurrency 8: served {acc['c8_served_rps']} req/s vs baseline {acc['c8_baseline_rps']} "
                          f"req/s (ratio {acc['throughput_ratio']}), failed {acc['c8_failed']}, lost {acc['c8_lost']}, "
                          f"p99 TTFF {acc['c8_ttff_p99_s']} s."]
        lines.append("")
    procs = result["cluster"].get("processes_loaded") or result["cluster"].get("processes_idle", [])
    lines += ["## Ray processes (RSS after the load)", "", "| process | RSS (MiB) |", "|---|---|"]
    lines += [f"| {p['name']} | {p['rss_mib']} |" for p in procs]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        result["plot"] = "skipped: matplotlib is not installed"
        return None
    workloads = list(result["workloads"])
    fig, axes = plt.subplots(len(workloads), 3, figsize=(13, 3.6 * len(workloads)), squeeze=False)
    for row, w in enumerate(workloads):
        rows = result["workloads"][w]["rows"]
        for mode, style, color in (("baseline", "o--", "tab:blue"), ("served", "s-", "tab:orange")):
            rs = [r for r in rows if r["mode"] == mode]
            cs = [r["concurrency"] for r in rs]
            axes[row][0].plot(cs, [r["requests_per_s"] for r in rs], style, color=color, label=mode)
            for q, alpha in (("p50", 1.0), ("p99", 0.4)):
                for col, key in ((1, "latency"), (2, "ttff")):
                    axes[row][col].plot(cs, [r[f"{key}_{q}_s"] for r in rs], style, color=color, alpha=alpha,
                                        label=f"{mode} {q}")
        for ax, title in zip(axes[row], ("requests/s", "latency (s)", "time to first frame (s)")):
            ax.set_xscale("log", base=2)
            ax.set_xticks(list(LEVELS), [str(c) for c in LEVELS])
            ax.set_xlabel("concurrent clients")
            ax.set_title(f"{w}: {title}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="Ray Serve load benchmark vs an in-process Pipeline (toy model)")
    parser.add_argument("--dir", type=Path, default=None, help="export directory (default: the toy, cached)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--workloads", default="default,exact", help="comma-separated: default, exact")
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)))
    parser.add_argument("--requests", type=int, default=8, help="requests per level (at least 2 x concurrency)")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="no new request after this, per level")
    parser.add_argument("--num-cpus", type=int, default=2, help="logical CPUs of the local Ray node")
    args = parser.parse_args(argv)
    workloads = [w for w in args.workloads.split(",") if w]
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {unknown}: choose from {', '.join(WORKLOADS)}")
    return run(args.out, args.dir, workloads, tuple(int(c) for c in args.levels.split(",")), args.requests,
               args.max_seconds, args.num_cpus)


if __name__ == "__main__":
    main()
