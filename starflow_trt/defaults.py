"""Option defaults the API, the CLI and the server share: one value per option, stated here once.

Nothing heavy is imported: the torch-free layers (:mod:`starflow_trt.request`, the server's ingress)
and the sampling core read the same values.
"""

import os
from typing import Optional

from .errors import StarflowError

#: ORT CPU thread pools (``THREAD_POOLS``): one per session, spinning only while its session runs.
#: ``"shared"``, ORT's process-wide pool, is 1 % faster with Jacobi and 3 % autoregressively (bench
#: config, 2 cores) but, once on, binds every later ORT session of the process (ORT's quantization
#: tools no longer run there), so a process turns it on by asking for it
DEFAULT_THREAD_POOL = "session"
#: fps of a request that names none (prompt template and video) when the config's ``vid_size`` names none;
#: otherwise the config's fps is the default (:attr:`~starflow_trt.summary.ModelSummary.default_fps`)
DEFAULT_FPS = 16
#: Jacobi schedules the sampling core implements (spec §10.2 "upstream"; "sliding", "predictive": see
#: :mod:`starflow_trt.sampling.jacobi`), named here so the torch-free request layer validates them too
SCHEDULES = ("upstream", "sliding", "predictive")
#: the schedule of a Jacobi request that names none (``"upstream"`` reproduces upstream exactly)
DEFAULT_SCHEDULE = "predictive"
#: Jacobi chunk length in tokens (``4·block`` after frame 0): ``JacobiConfig``,
#: ``generate --jacobi-block``, the server's ``jacobi.block_size``
DEFAULT_JACOBI_BLOCK = 16
#: Jacobi sweeps per chunk at most
DEFAULT_JACOBI_ITERS = 32
#: Jacobi stopping bound on the relative update (0: run every sweep, exact)
DEFAULT_JACOBI_THRESHOLD = 1e-3
#: long videos: latent frames re-encoded as context when the attention window slides (upstream's sampler
#: ``--context_length`` 16; a window of 16 frames or fewer keeps window - 1)
DEFAULT_CONTEXT_LENGTH = 16

#: environment variable naming the ORT intra-op threads of a session (or of the shared pool) when the
#: caller names none: a host running several processes (replicas, a test suite's workers) sets it so
#: their pools do not oversubscribe the cores. Unset: ORT's default, one thread per physical core
THREADS_ENV = "STARFLOW_TRT_THREADS"


def default_threads() -> Optional[int]:
    """ORT intra-op threads when none is given: ``$STARFLOW_TRT_THREADS``, else None (ORT's default)."""
    raw = os.environ.get(THREADS_ENV, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise StarflowError(f"{THREADS_ENV}={raw!r} is not a thread count: set a whole number >= 1 or unset it")
    return int(raw)
