"""The video job store: job state, finished files, retention, recovery after a restart (no Ray, no torch).

Layout under the server-owned root (created by the store)::

    ROOT/video_<24 hex>/job.json          the job (written by stage + rename at each status change)
    ROOT/video_<24 hex>/video.mp4         assets, each written by stage + rename before job.json
    ROOT/video_<24 hex>/thumbnail.png     says "completed", so a completed job has all three
    ROOT/video_<24 hex>/spritesheet.png

Only directories named like a job id and holding a ``job.json`` are ever removed; anything else
under the root is left alone. After a restart a job that had not completed is reported failed
(``server_restarted``), a completed job missing an asset likewise, and stage files are removed; a job
whose record cannot be written as UTF-8 JSON (a string with a lone surrogate) is repaired in place
("?" for what cannot be encoded) and logged. A job is indexed only once its Video object can be
written (:meth:`JobStore.add` after :meth:`JobStore.draft`).

Retention: a completed video is kept ``max_age_s`` after it finished unless the completed ones hold
more than ``max_bytes``; then the oldest downloaded ones go first, then the oldest. Failed jobs never
evict completed ones: beyond ``max_count`` failed jobs the oldest failed go, and they expire as well.
Queued and running jobs are never removed.
"""

from __future__ import annotations

import json
import logging
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
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Retention:
    """How many failed jobs the store keeps, how many bytes the completed ones may hold, for how long each is
    kept (a completed video at least that long while the bytes allow)."""

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
    downloaded: float = 0.0              # time.time() of its last video download (0: never); goes first when full

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "object": "video", "created_at": self.created_at, "status": self.status,
                "model": self.model, "progress": self.progress, "seconds": self.seconds, "size": self.size,
                "prompt": self.prompt, "error": self.error, "completed_at": self.completed_at,
                "expires_at": self.expires_at, "remixed_from_video_id": None, "frames": self.frames,
                "request_id": self.request_id}

    def encoded(self) -> bytes:
        """The Video object as the UTF-8 JSON an answer carries; ``UnicodeEncodeError`` for a lone surrogate."""
        return json.dumps(self.to_openai(), ensure_ascii=False).encode("utf-8")


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
    @staticmethod
    def draft(*, model: str, prompt: str, seconds: str, size: str, frames: int) -> Job:
        """A new job, not yet stored: :meth:`add` it once its answer has been written."""
        now = time.time()
        return Job(id=f"video_{secrets.token_hex(12)}", created_at=int(now), created=now, model=model,
                   prompt=prompt, seconds=seconds, size=size, frames=frames)

    def add(self, job: Job) -> Job:
        self._dir(job.id).mkdir()
        try:
            self.save(job)
        except BaseException:
            shutil.rmtree(self._dir(job.id), ignore_errors=True)
            raise
        self.jobs[job.id] = job
        return job

    def new(self, **fields: Any) -> Job:
        """:meth:`draft` + :meth:`add` (``model``, ``prompt``, ``seconds``, ``size``, ``frames``)."""
        return self.add(self.draft(**fields))

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
        """The job, or None (also for one whose Video object cannot be written: logged, never a 500)."""
        self.prune()
        job = self.jobs.get(job_id)
        return job if job is not None and self._writable(job) else None

    def downloaded(self, job: Job) -> None:
        """Its video was fetched: under byte pressure it goes before the videos nobody has fetched yet."""
        job.downloaded = time.time()
        if self._dir(job.id).exists():
            self.save(job)

    def take(self, job_id: str) -> Optional[Job]:
        """Remove ``job_id`` from the index (its files stay until :meth:`remove_files`): of several
        concurrent deletes exactly one gets the job."""
        return self.jobs.pop(job_id, None)

    def delete(self, job_id: str) -> bool:
        if self.take(job_id) is None:
            return False
        self.remove_files(job_id)
        return True

    def page(self, after: Optional[str] = None, limit: int = 20, order: str = "desc") -> dict[str, Any]:
        """OpenAI's cursor page: jobs by creation time, those after the job ``after``; a job whose Video
        object cannot be written is left out (and logged), never failing the page."""
        self.prune()
        jobs = sorted((j for j in self.jobs.values() if self._writable(j)), key=lambda j: (j.created, j.id),
                      reverse=order == "desc")
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
        """Remove expired finished jobs, failed ones beyond the count, then completed ones beyond the byte cap
        (downloaded first, oldest first); see the module docstring."""
        now = time.time() if now is None else now
        r = self.retention
        finished = sorted((j for j in self.jobs.values() if j.status in FINISHED), key=lambda j: j.finished)
        drop = [j for j in finished if j.finished + r.max_age_s <= now]
        failed = [j for j in finished if j.status == "failed" and j not in drop]
        drop += failed[:max(len(failed) - r.max_count, 0)]
        completed = [j for j in finished if j.status == "completed" and j not in drop]
        total = sum(j.bytes for j in completed)
        for j in sorted(completed, key=lambda j: (not j.downloaded, j.finished)):
            if total <= r.max_bytes:
                break
            drop.append(j)
            total -= j.bytes
        for j in drop:
            self.delete(j.id)
        return [j.id for j in drop]

    @staticmethod
    def _writable(job: Job) -> bool:
        try:
            job.encoded()
        except (UnicodeEncodeError, TypeError, ValueError) as exc:
            log.warning("video job %s cannot be written as JSON (%s); left out of the answer", job.id, exc)
            return False
        return True

    def remove_files(self, job_id: str) -> None:
        d = self._dir(job_id)
        if JOB_ID.match(job_id) and (d / "job.json").is_file():
            shutil.rmtree(d, ignore_errors=True)   # a cancelled job's last write may still be landing

    def _recover(self) -> None:
        for d in sorted(self._job_dirs()):
            try:
                job = Job(**json.loads((d / "job.json").read_text()))
            except (OSError, ValueError, TypeError) as exc:
                log.warning("skipped %s: its job.json cannot be read (%s); the directory is left alone", d, exc)
                continue
            for stale in d.glob(".*"):         # stage files of a write the restart interrupted
                if stale.is_file():
                    stale.unlink()
            self.jobs[job.id] = job
            if not self._writable(job):
                self._repair(job)
            if job.status not in FINISHED:
                self.fail(job, "the server restarted before the job finished; create it again", "server_restarted")
            elif job.status == "completed" and not all(self.asset_path(job, v).is_file() for v in ASSETS):
                self.fail(job, "the job's files are missing after a restart; create it again", "server_restarted")

    def _repair(self, job: Job) -> None:
        """Rewrite the job's strings as valid UTF-8 ("?" for a lone surrogate), so its answers can be written."""
        def fix(value: Any) -> Any:
            if isinstance(value, str):
                return value.encode("utf-8", "replace").decode("utf-8")
            if isinstance(value, dict):
                return {fix(k): fix(v) for k, v in value.items()}
            return value

        for name, value in asdict(job).items():
            setattr(job, name, fix(value))
        self.save(job)
        log.warning("video job %s held text that is not valid UTF-8; repaired its record", job.id)

    def _job_dirs(self) -> Iterable[Path]:
        for d in self.root.iterdir():
            if JOB_ID.match(d.name) and d.is_dir() and (d / "job.json").is_file():
                yield d
