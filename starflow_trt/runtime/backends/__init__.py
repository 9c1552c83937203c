"""Backends: load the graphs a manifest names and run them on preallocated tensors (see :mod:`.base`).

``make_backend(name, manifest, ...)`` builds one from the registry (:mod:`.registry`).
"""

from .base import Backend, CallStats, GraphRunner
from .registry import THREAD_POOLS, BackendOptions, backend_names, backend_status, make_backend, register_backend

__all__ = ["Backend", "GraphRunner", "CallStats", "make_backend", "register_backend", "backend_names",
           "backend_status", "BackendOptions", "THREAD_POOLS"]
