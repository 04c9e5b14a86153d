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
