"""One video job: the streaming API's events → progress, then the mp4, thumbnail and spritesheet files.

The events are those ``POST /v1/videos/stream`` sends for the job's request (PNG frames, then
``done`` with the mp4), so a job and a stream of the same request give the same frames.
"""

from __future__ import annotations

import asyncio
import base64
import math
from typing import AsyncIterator

import numpy as np

from .client import decode_frame
from .jobs import Job, JobStore


def spritesheet(frames: list[np.ndarray]) -> np.ndarray:
    """Frames [H, W, 3] uint8 tiled row by row, ceil(sqrt(T)) columns (black where the grid has no frame)."""
    n = len(frames)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    h, w = frames[0].shape[:2]
    sheet = np.zeros((rows * h, cols * w, 3), np.uint8)
    for i, frame in enumerate(frames):
        r, c = divmod(i, cols)
        sheet[r * h:(r + 1) * h, c * w:(c + 1) * w] = frame
    return sheet


def job_assets(frame_events: list[dict], mp4: bytes) -> dict[str, bytes]:
    """The files of a finished job: the mp4, the first frame (thumbnail), the frames tiled (spritesheet)."""
    from ..media.images import encode_png   # no torch in the ingress

    rgb = [decode_frame(e) for e in frame_events]
    return {"video": mp4, "thumbnail": base64.b64decode(frame_events[0]["png"]),
            "spritesheet": encode_png(spritesheet(rgb))}


async def run_job(store: JobStore, job: Job, events: AsyncIterator[dict]) -> None:
    """Consume one request's events into ``job``; it ends completed or failed (cancelled: re-raised)."""
    frames: list[dict] = []
    try:
        async for event in events:
            kind = event.get("type")
            if kind == "frame":
                frames.append(event)
                job.progress = min(99, 100 * len(frames) // max(job.frames, 1))
            elif kind == "error":
                store.fail(job, event.get("message", "generation failed"))
                return
            elif kind == "done":
                if not frames or "mp4" not in event:
                    store.fail(job, "the generator finished without frames or an mp4")
                    return
                assets = await asyncio.to_thread(job_assets, frames, base64.b64decode(event["mp4"]))
                await asyncio.to_thread(store.complete, job, assets)
                return
        store.fail(job, "the stream ended without a result")
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - reported on the job
        store.fail(job, f"{type(exc).__name__}: {exc}")
