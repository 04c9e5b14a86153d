"""Threads of torch and faiss chosen together (mlsctl/threads.py, issue 24 item 7)."""

from __future__ import annotations

import subprocess
import sys

import torch

from mlsctl import threads

from conftest import cli_env

# Runs `mlsctl bank inspect MISSING` up to its import of torch, where it prints the wait policy the
# environment holds then, and stops (torch is never loaded).
AT_TORCH_IMPORT = """
import importlib.abc, os, sys
class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            print("policy at torch import:", os.environ.get("OMP_WAIT_POLICY"), flush=True)
            os._exit(0)
        return None
sys.meta_path.insert(0, Watch())
sys.argv = ["mlsctl", "bank", "inspect", "no-such-run"]
from mlsctl.cli import main
main()
"""


def _policy_at_torch_import(**env: str) -> str:
    environment = cli_env()
    environment.pop("OMP_WAIT_POLICY", None)
    environment.update(env)
    result = subprocess.run([sys.executable, "-c", AT_TORCH_IMPORT], capture_output=True, text=True, env=environment)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_commands_set_the_passive_wait_policy_before_torch_loads_unless_the_user_chose_one():
    assert _policy_at_torch_import() == "policy at torch import: PASSIVE"
    assert _policy_at_torch_import(OMP_WAIT_POLICY="ACTIVE") == "policy at torch import: ACTIVE"
    assert _policy_at_torch_import(OMP_WAIT_POLICY="") == "policy at torch import:"  # libgomp's own default


def test_prepare_environment_keeps_a_policy_set_by_the_user(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    threads.prepare_environment()
    assert threads.describe()["omp_wait_policy"] == "PASSIVE"
    for chosen in ("ACTIVE", ""):
        monkeypatch.setenv("OMP_WAIT_POLICY", chosen)
        threads.prepare_environment()
        assert threads.describe()["omp_wait_policy"] == chosen


def test_faiss_gets_as_many_threads_as_torch():
    before = torch.get_num_threads()
    try:
        for n in (2, 1):
            torch.set_num_threads(n)
            faiss = threads.faiss()
            assert faiss.omp_get_max_threads() == n == threads.describe()["faiss_threads"]
    finally:
        torch.set_num_threads(before)
        threads.faiss()


def test_more_loader_workers_than_cores_is_one_line_naming_the_option(caplog):
    """torch's multi-line UserWarning becomes one line of the mlsctl log, once per option and count."""
    import logging
    import warnings

    from mlsctl.data.loader import Loader, usable_cores

    workers = usable_cores() + 3
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING, logger="mlsctl"):
        warnings.simplefilter("always")
        for _ in range(2):
            Loader(list(range(4)), batch_size=2, num_workers=workers, workers_key="--workers")
        Loader(list(range(4)), batch_size=2, num_workers=usable_cores())
    assert not [w for w in caught if "worker" in str(w.message)]
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"--workers={workers} is more than the {usable_cores()} CPU core"
                     f"{'s' if usable_cores() != 1 else ''} this process may use: loading can slow down or stall; "
                     f"lower --workers to {usable_cores()} or less"]
