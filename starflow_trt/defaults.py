"""Option defaults the API, the CLI and the server share: one value per option, stated here once.

No imports: the torch-free layers (:mod:`starflow_trt.request`, the server's ingress) and the
sampling core read the same values.
"""

#: ORT CPU thread pools (``THREAD_POOLS``): one per session. ``"shared"``, ORT's process-wide pool, is
#: faster end to end but, once on, binds every later ORT session of the process (ORT's quantization
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
#: Jacobi chunk length in tokens (``4·block`` after frame 0): ``JacobiConfig``, ``JacobiOptions``,
#: ``generate --jacobi-block``, the server's ``jacobi.block_size``
DEFAULT_JACOBI_BLOCK = 16
#: Jacobi sweeps per chunk at most
DEFAULT_JACOBI_ITERS = 32
#: Jacobi stopping bound on the relative update (0: run every sweep, exact)
DEFAULT_JACOBI_THRESHOLD = 1e-3
