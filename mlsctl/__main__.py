"""`python -m mlsctl ...`, the entry point `accelerate launch -m mlsctl ...` uses."""

import sys

from mlsctl.launch import relaunch_for_accelerate_on_cpu, relaunched_argv
from mlsctl.threads import prepare_environment

prepare_environment()  # before anything loads an OpenMP runtime; the relaunched processes inherit it
relaunch_for_accelerate_on_cpu()
_argv = relaunched_argv()
if _argv is not None:
    sys.argv[1:] = _argv

from mlsctl.cli import run  # noqa: E402

run()
