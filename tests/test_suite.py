"""The suite's settings (tests/conftest.py): one intra-op thread for torch and every ORT session, children
included, unless a test asks for more by name; ``STARFLOW_TRT_THREADS``, the runtime's knob they go through."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from starflow_trt.defaults import THREADS_ENV, default_threads
from starflow_trt.errors import StarflowError

from .conftest import SUITE_THREADS


def test_every_test_runs_on_the_suites_threads():
    assert torch.get_num_threads() == SUITE_THREADS == 1
    assert os.environ[THREADS_ENV] == "1" and default_threads() == 1
    # a child (a CLI subprocess, a Ray worker) inherits them: torch through OpenMP's variable, ORT through ours
    code = "import os, torch; print(torch.get_num_threads(), os.environ['STARFLOW_TRT_THREADS'])"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split() == [
        "1", "1"]


@pytest.mark.threads(2)
def test_a_test_that_measures_threading_asks_for_its_threads():
    assert torch.get_num_threads() == 2 and default_threads() == 2


def test_the_ort_backend_takes_the_variables_threads(monkeypatch):
    pytest.importorskip("onnxruntime")
    from starflow_trt.runtime.backends.ort_backend import OrtBackend

    assert OrtBackend().threads == 1
    assert OrtBackend(threads=3).threads == 3   # an explicit count wins
    monkeypatch.delenv(THREADS_ENV)
    assert OrtBackend().threads is None          # unset: ORT's own default


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_a_bad_thread_count_is_one_line_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv(THREADS_ENV, value)
    with pytest.raises(StarflowError, match=f"{THREADS_ENV}=.* is not a thread count") as info:
        default_threads()
    assert "\n" not in str(info.value)
    monkeypatch.setenv(THREADS_ENV, " ")
    assert default_threads() is None
