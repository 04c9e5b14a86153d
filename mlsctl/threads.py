"""The threads of torch and faiss, chosen together, in this one place (docs/performance.md).

torch and faiss-cpu each load their own OpenMP runtime (two copies of libgomp, each with its own
pool of threads). After every parallel region a libgomp thread spins for a while, waiting for the
next one. Where the two pools take turns (``eval knn-seg``: torch prepares a batch of patches,
faiss searches it, torch turns the neighbours into labels) or other processes want the same cores,
the spinning threads of one runtime hold the cores the other needs (measured in
docs/performance.md: with one busy process beside it on 2 cores, ``eval knn-seg`` took 1.26x the
time of its bare faiss search, 1.01x with ``OMP_WAIT_POLICY=PASSIVE``, and 30% less time). So:

* :func:`prepare_environment` sets ``OMP_WAIT_POLICY=PASSIVE`` (an idle thread sleeps at once)
  before either runtime is loaded — every ``mlsctl`` command calls it first — unless the
  environment has the variable already: ``OMP_WAIT_POLICY=ACTIVE mlsctl ...`` spins,
  ``OMP_WAIT_POLICY= mlsctl ...`` (empty) keeps libgomp's own default (spin a while, then sleep).
  The runtimes read it when they load, so a program that imports mlsctl as a library and wants it
  calls this (or sets the variable) before it imports torch or faiss.
* :func:`faiss` is how mlsctl imports faiss and is called again right before each search: it
  gives faiss's runtime, in the calling thread (an OpenMP thread count belongs to the thread that
  sets it), as many threads as torch uses (``torch.get_num_threads()``: ``OMP_NUM_THREADS`` when
  set, else one per physical core; faiss's runtime would take one per logical CPU).

``OMP_NUM_THREADS=N`` sets the thread count of both (and of MKL); in a program,
``torch.set_num_threads(N)`` sets faiss's too, from its next search on.

This module imports nothing heavy: the CLI imports it before torch.
"""

from __future__ import annotations

import os

WAIT_POLICY = "OMP_WAIT_POLICY"


def prepare_environment() -> None:
    """``OMP_WAIT_POLICY=PASSIVE`` unless the environment has the variable, even empty (read when an
    OpenMP runtime loads: call before importing torch or faiss; child processes inherit it)."""
    if WAIT_POLICY not in os.environ:
        os.environ[WAIT_POLICY] = "PASSIVE"


def faiss():
    """The faiss module, with as many OpenMP threads in the calling thread as torch uses. Raises
    ImportError when faiss is not installed (the caller says what needs it)."""
    import faiss as module
    import torch

    module.omp_set_num_threads(torch.get_num_threads())
    return module


def describe() -> dict:
    """What this process runs with (recorded by benchmarks): the wait policy, torch's threads and,
    when faiss is imported, faiss's in this thread."""
    import sys

    import torch

    out = {"omp_wait_policy": os.environ.get(WAIT_POLICY), "torch_threads": torch.get_num_threads(),
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    if "faiss" in sys.modules:
        out["faiss_threads"] = sys.modules["faiss"].omp_get_max_threads()
    return out
