"""A `cpo-data train` killed outright (SIGKILL) leaves no process behind: the Prefect server
it started gets a parent-death signal. (The build's kill test is in test_build_flow.py; the
signal itself is tested in test_leftovers.py.)"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from cpo_data import leftovers, store
from cpo_data.testing import build_tiny_causal_lm, sample_triplets
from pipelines.demo import REPO_ROOT
from tests.conftest import processes_with_env


def test_prefects_server_command_is_put_behind_dying_with_parent():
    """Prefect starts its server as `subprocess.Popen(args=[...], env=...)`: by name."""
    from pipelines.cli import _DyingWithParent

    calls = []

    class Subprocess:
        DEVNULL = subprocess.DEVNULL

        def Popen(self, *args, **kwargs):  # noqa: N802 - subprocess's name
            calls.append((args, kwargs))
            return "started"

    shim = _DyingWithParent(Subprocess())
    command = [sys.executable, "-m", "uvicorn", "--port", "1234"]
    assert shim.Popen(args=command, env={"A": "1"}) == "started"
    assert calls[-1] == ((leftovers.dying_with_parent(command),), {"env": {"A": "1"}})
    shim.Popen(command)
    assert calls[-1] == ((leftovers.dying_with_parent(command),), {})
    shim.Popen("echo hi", shell=True)  # a shell line cannot be wrapped: left as it is
    assert calls[-1] == (("echo hi",), {"shell": True})
    assert shim.DEVNULL == subprocess.DEVNULL  # the rest of subprocess, unchanged


@pytest.mark.slow
def test_a_killed_train_leaves_no_process(tmp_path):
    model = build_tiny_causal_lm(tmp_path / "llama")
    store.publish_triplets(sample_triplets(rows_per_pair=5), str(tmp_path / "store"), "mt")
    config = tmp_path / "config.yaml"
    config.write_text(f"publish:\n  uri: store\n  name: mt\ntrain:\n  model: {model}\n"
                      f"  output_dir: runs\n  finetune: full\n  schedule:\n"
                      f"    max_steps: 100000\n  batch_size: 2\n")
    exe = shutil.which("cpo-data") or str(REPO_ROOT / ".venv/bin/cpo-data")
    home = f"PREFECT_HOME={tmp_path / 'prefect-home'}"
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-home"))
    env.pop("PREFECT_API_URL", None)
    train = subprocess.Popen([exe, "train", str(config)], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 180
    try:
        # Training has started (its metrics file exists), so the server is up and in use.
        while not list((tmp_path / "runs").rglob("metrics.jsonl")):
            assert train.poll() is None, "the training ended before it could be killed"
            assert time.monotonic() < deadline, "training did not start within 180 s"
            time.sleep(0.1)
        assert len(processes_with_env(home)) >= 2  # the command and its server
        os.kill(train.pid, signal.SIGKILL)  # the command only: no cleanup runs
        train.wait()
        left = processes_with_env(home)
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = processes_with_env(home)
        assert left == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(train.pid, signal.SIGKILL)
        train.wait()
