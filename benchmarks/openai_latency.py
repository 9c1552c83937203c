"""Job latency (OpenAI videos API) against the streaming API on the toy export, one local loopback cluster.

    python benchmarks/openai_latency.py [--runs 7]

The same request both ways, one at a time, interleaved (seed fixed, 6 frames, mp4 made):
streaming: ``VideoClient.generate`` (POST /v1/videos/stream) until the done event, which carries the mp4;
job: the ``openai`` client's ``videos.create_and_poll`` (polls every 100 ms, the server's
``openai-poll-after-ms``) then ``download_content``. Medians into ``benchmarks/results/openai_latency.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPT = "a red square moving right"


def measure(port: int, runs: int) -> dict:
    import openai

    from starflow_trt.serving.client import VideoClient

    warnings.simplefilter("ignore", DeprecationWarning)
    url = f"http://127.0.0.1:{port}"
    stream, oai = VideoClient(url, timeout=300), openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0)
    body = {"prompt": PROMPT, "seed": 0, "guidance": 3.0, "frames": 6, "mp4": True}

    def one_stream() -> dict:
        t0 = time.perf_counter()
        video = stream.generate(body)
        return {"total_s": time.perf_counter() - t0, "ttff_s": video.arrivals[0], "mp4_bytes": len(video.mp4)}

    def one_job() -> dict:
        t0 = time.perf_counter()
        job = oai.videos.create_and_poll(prompt=PROMPT, seconds="0.75", extra_body={"seed": 0, "guidance": 3.0})
        done = time.perf_counter() - t0
        mp4 = oai.videos.download_content(job.id).read()
        total = time.perf_counter() - t0
        oai.videos.delete(job.id)
        assert job.status == "completed", job
        return {"total_s": total, "completed_s": done, "mp4_bytes": len(mp4)}

    one_stream(), one_job()                                       # warm-up
    rows: dict[str, list[dict]] = {"stream": [], "job": []}
    for _ in range(runs):
        rows["stream"].append(one_stream())
        rows["job"].append(one_job())
    return summarise({"runs": runs, "request": body, "raw": rows})


def summarise(result: dict) -> dict:
    """Medians of each path, and the median of the paired differences (runs interleave: same load)."""
    rows = result["raw"]

    def med(kind: str, key: str) -> float:
        return round(statistics.median(r[key] for r in rows[kind]), 3)

    paired = [j["total_s"] - s["total_s"] for s, j in zip(rows["stream"], rows["job"])]
    result["median"] = {"stream_total_s": med("stream", "total_s"), "stream_ttff_s": med("stream", "ttff_s"),
                        "job_completed_s": med("job", "completed_s"), "job_total_s": med("job", "total_s"),
                        "job_minus_stream_paired_s": round(statistics.median(paired), 3)}
    return result


def markdown(result: dict) -> str:
    m = result["median"]
    return "\n".join([
        f"# Job latency vs the streaming API (toy, {result['runs']} runs each, medians, interleaved)", "",
        "| path | first frame (s) | result ready (s) | mp4 in hand (s) |", "|---|---|---|---|",
        f"| streaming (`POST /v1/videos/stream`, done event carries the mp4) | {m['stream_ttff_s']} | "
        f"{m['stream_total_s']} | {m['stream_total_s']} |",
        f"| job (`videos.create_and_poll` + `download_content`) | - | {m['job_completed_s']} | {m['job_total_s']} |",
        "", f"Job overhead on the mp4: {m['job_minus_stream_paired_s']} s (median of the paired differences; "
            f"{round(m['job_total_s'] / m['stream_total_s'], 2)}x the streaming median). The job pays the "
            "100 ms poll interval, the spritesheet and thumbnail, and the files' stage + rename.", ""])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)
    from starflow_trt.bench.serve_load import _free_port, start_cluster, toy_graphs
    from starflow_trt.serving.app import ServeConfig

    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="starflow-videos-") as videos:
        cluster = start_cluster(toy_graphs(), port, num_cpus=2,
                                config=ServeConfig(videos_dir=videos, thread_pool="shared"))
        try:
            result = {"cluster": cluster, **measure(port, args.runs)}
        finally:
            import ray
            from ray import serve

            serve.shutdown()
            ray.shutdown()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "openai_latency.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "openai_latency.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
