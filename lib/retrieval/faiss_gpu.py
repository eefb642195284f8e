"""Whether this process may search with faiss on the GPU: decided once, by a probe that cannot take it down.

A faiss GPU wheel without kernels for the device (``faiss-gpu-cu12`` on Hopper or Blackwell: sm_70/sm_80 code
only, no PTX) still reports the GPU in ``faiss.get_num_gpus()``; its first search then fails with CUDA error 209
and faiss calls ``abort()``, which no Python handler can catch. So the decision is made by running a tiny GPU
search in a child process: only when the child finishes with the right neighbours does this process use faiss on
the GPU. Elsewhere GPU search goes through torch (:mod:`lib.retrieval.torch_search`).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from dataclasses import dataclass

# A 16-vector identity gallery searched on GPU 0: every vector's nearest neighbour is itself.
PROBE_CODE = (
    "import numpy as np, faiss\n"
    "resources = faiss.StandardGpuResources()\n"
    "index = faiss.GpuIndexFlatIP(resources, 16)\n"
    "vectors = np.eye(16, dtype='float32')\n"
    "index.add(vectors)\n"
    "_, rows = index.search(vectors, 1)\n"
    "assert (rows[:, 0] == np.arange(16)).all(), rows\n"
    "print('faiss-gpu-search-ok', faiss.__version__)\n"
)
PROBE_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class ProbeResult:
    """``usable``: faiss searched correctly on the GPU in a child process; ``reason`` says why not, in one line."""

    usable: bool
    reason: str


def run_probe(code: str = PROBE_CODE, timeout_s: float = PROBE_TIMEOUT_S) -> ProbeResult:
    """Run ``code`` in a child Python and read its verdict: an abort, a crash, a timeout or wrong neighbours
    all mean "not usable", with the cause."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    try:
        child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s,
                               env=env, check=False)
    except subprocess.TimeoutExpired:
        return ProbeResult(False, f"the faiss GPU probe did not finish in {timeout_s:.0f} s")
    if child.returncode == 0 and "faiss-gpu-search-ok" in child.stdout:
        return ProbeResult(True, child.stdout.strip())
    last = (child.stderr.strip().splitlines() or ["no output"])[-1]
    if child.returncode < 0:
        return ProbeResult(False, f"the faiss GPU probe died with signal {-child.returncode} ({last})")
    return ProbeResult(False, f"the faiss GPU probe exited with {child.returncode} ({last})")


@functools.lru_cache(maxsize=1)
def probe() -> ProbeResult:
    """:func:`run_probe`, once per process. ``CIFAR_EMBED_FAISS_GPU=0`` skips it and says no; ``=1`` skips it
    and says yes (a machine whose wheel is known to match its GPUs)."""
    forced = os.environ.get("CIFAR_EMBED_FAISS_GPU", "").strip()
    if forced == "0":
        return ProbeResult(False, "CIFAR_EMBED_FAISS_GPU=0")
    if forced == "1":
        return ProbeResult(True, "CIFAR_EMBED_FAISS_GPU=1")
    return run_probe()
