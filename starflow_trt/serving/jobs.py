"""The video job store: job state, finished files, retention, recovery after a restart (no Ray, no torch).

Layout under the server-owned root (created by the store)::

    ROOT/video_<24 hex>/job.json          the job (written by stage + rename at each status change)
    ROOT/video_<24 hex>/video.mp4         assets, each written by stage + rename before job.json
    ROOT/video_<24 hex>/thumbnail.png     says "completed", so a completed job has all three
    ROOT/video_<24 hex>/spritesheet.png

Only directories named like a job id and holding a ``job.json`` are ever removed; anything else
under the root is left alone. After a restart a job that had not completed is reported failed
(``server_restarted``), a completed job missing an asset likewise, and stage files are removed.
Retention (``max_count``, ``max_bytes``, ``max_age_s``) removes the oldest finished jobs first.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from ..errors import InputError
from ..staging import temp_file_beside, write_json_atomic

JOB_ID = re.compile(r"^video_[0-9a-f]{24}$")
#: variant → (file name, media type)
ASSETS = {"video": ("video.mp4", "video/mp4"), "thumbnail": ("thumbnail.png", "image/png"),
          "spritesheet": ("spritesheet.png", "image/png")}
FINISHED = ("completed", "failed")


@dataclass(frozen=True)
class Retention:
    """How many finished jobs the store keeps, how many bytes they may hold, for how long."""

    max_count: int = 100
    max_bytes: int = 2 << 30
    max_age_s: float = 24 * 3600.0

    def __post_init__(self) -> None:
        if self.max_count < 1 or self.max_bytes < 1 or self.max_age_s <= 0:
            raise InputError(f"video retention needs count >= 1, bytes >= 1, age > 0 s, got {self}")


@dataclass
class Job:
    """One video job; :meth:`to_openai` is OpenAI's Video object."""

    id: str
    created_at: int
    model: str
    prompt: str
    seconds: str
    size: str
    frames: int
    status: str = "queued"
    progress: int = 0
    error: Optional[dict] = None
    completed_at: Optional[int] = None
    expires_at: Optional[int] = None
    request_id: Optional[str] = None     # the streaming request's id (X-Starflow-Request)
    bytes: int = 0
    created: float = 0.0                 # time.time() at creation (list order; created_at is whole seconds)
    finished: float = 0.0                # time.time() when it completed or failed (retention order, age)

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "object": "video", "created_at": self.created_at, "status": self.status,
                "model": self.model, "progress": self.progress, "seconds": self.seconds, "size": self.size,
                "prompt": self.prompt, "error": self.error, "completed_at": self.completed_at,
                "expires_at": self.expires_at, "remixed_from_video_id": None, "frames": self.frames,
                "request_id": self.request_id}


class JobStore:
    def __init__(self, root: Union[str, os.PathLike], retention: Optional[Retention] = None):
        self.root = Path(root)
        self.retention = retention or Retention()
        self.root.mkdir(parents=True, exist_ok=True)
        self.jobs: dict[str, Job] = {}
        self._recover()
        self.prune()

    # ------------------------------------------------------------ paths, files
    def _dir(self, job_id: str) -> Path:
        return self.root / job_id

    def asset_path(self, job: Job, variant: str) -> Path:
        return self._dir(job.id) / ASSETS[variant][0]

    def save(self, job: Job) -> None:
        write_json_atomic(self._dir(job.id) / "job.json", asdict(job))

    def write_asset(self, job: Job, variant: str, data: bytes) -> None:
        """Stage ``data`` beside the asset and rename it into place."""
        path = self.asset_path(job, variant)
        tmp = temp_file_beside(path)
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # ------------------------------------------------------------ lifecycle
    def new(self, *, model: str, prompt: str, seconds: str, size: str, frames: int) -> Job:
        now = time.time()
        job = Job(id=f"video_{secrets.token_hex(12)}", created_at=int(now), created=now, model=model,
                  prompt=prompt, seconds=seconds, size=size, frames=frames)
        self._dir(job.id).mkdir()
        self.save(job)
        self.jobs[job.id] = job
        return job

    def start(self, job: Job, request_id: Optional[str]) -> None:
        job.status, job.request_id = "in_progress", request_id
        self.save(job)

    def complete(self, job: Job, assets: dict[str, bytes]) -> None:
        """Write every asset (stage + rename), then mark the job completed."""
        for variant in ASSETS:
            self.write_asset(job, variant, assets[variant])
        job.finished = now = time.time()
        job.status, job.progress, job.completed_at = "completed", 100, int(now)
        job.expires_at = int(now + self.retention.max_age_s)
        job.bytes = sum(len(b) for b in assets.values())
        self.save(job)
        self.prune()

    def fail(self, job: Job, message: str, code: str = "generation_failed") -> None:
        job.finished = now = time.time()
        job.status, job.completed_at = "failed", int(now)
        job.expires_at = int(now + self.retention.max_age_s)
        job.error = {"code": code, "message": " ".join(str(message).split())}
        if self._dir(job.id).exists():
            self.save(job)
        self.prune()

    def get(self, job_id: str) -> Optional[Job]:
        self.prune()
        return self.jobs.get(job_id)

    def delete(self, job_id: str) -> bool:
        job = self.jobs.pop(job_id, None)
        if job is None:
            return False
        self._remove(job_id)
        return True

    def page(self, after: Optional[str] = None, limit: int = 20, order: str = "desc") -> dict[str, Any]:
        """OpenAI's cursor page: jobs by creation time, those after the job ``after``."""
        self.prune()
        jobs = sorted(self.jobs.values(), key=lambda j: (j.created, j.id), reverse=order == "desc")
        if after is not None:
            ids = [j.id for j in jobs]
            if after not in ids:
                raise KeyError(after)
            jobs = jobs[ids.index(after) + 1:]
        data = [j.to_openai() for j in jobs[:limit]]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": len(jobs) > limit}

    # ------------------------------------------------------------ retention, recovery
    def prune(self, now: Optional[float] = None) -> list[str]:
        """Remove expired finished jobs, then the oldest finished ones beyond the count and byte limits."""
        now = time.time() if now is None else now
        r = self.retention
        finished = sorted((j for j in self.jobs.values() if j.status in FINISHED), key=lambda j: j.finished)
        drop = [j for j in finished if j.finished + r.max_age_s <= now]
        kept = [j for j in finished if j not in drop]
        count = len(self.jobs) - len(drop)
        total = sum(j.bytes for j in self.jobs.values() if j not in drop)
        for j in kept:
            if count <= r.max_count and total <= r.max_bytes:
                break
            drop.append(j)
            count, total = count - 1, total - j.bytes
        for j in drop:
            self.delete(j.id)
        return [j.id for j in drop]

    def _remove(self, job_id: str) -> None:
        d = self._dir(job_id)
        if JOB_ID.match(job_id) and (d / "job.json").is_file():
            shutil.rmtree(d)

    def _recover(self) -> None:
        for d in sorted(self._job_dirs()):
            try:
                job = Job(**json.loads((d / "job.json").read_text()))
            except (OSError, ValueError, TypeError):
                continue                       # not a job file of ours: leave the directory alone
            for stale in d.glob(".*"):         # stage files of a write the restart interrupted
                if stale.is_file():
                    stale.unlink()
            self.jobs[job.id] = job
            if job.status not in FINISHED:
                self.fail(job, "the server restarted before the job finished; create it again", "server_restarted")
            elif job.status == "completed" and not all(self.asset_path(job, v).is_file() for v in ASSETS):
                self.fail(job, "the job's files are missing after a restart; create it again", "server_restarted")

    def _job_dirs(self) -> Iterable[Path]:
        for d in self.root.iterdir():
            if JOB_ID.match(d.name) and d.is_dir() and (d / "job.json").is_file():
                yield d
