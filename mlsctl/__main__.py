"""`python -m mlsctl ...`, the entry point `accelerate launch -m mlsctl ...` uses."""

from mlsctl.dist import relaunch_for_accelerate_on_cpu

relaunch_for_accelerate_on_cpu()

from mlsctl.cli import main  # noqa: E402

main()
