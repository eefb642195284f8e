"""Exact nearest-neighbour search: the search layer of :mod:`lib.retrieval`.

:func:`knn` (or :func:`build_index` + :func:`search` for many query chunks against one gallery)
wraps a faiss flat inner-product index on the CPU, or on the GPU where this process's faiss build was
probed to search correctly on it (:mod:`lib.retrieval.faiss_gpu`); on any other CUDA GPU the same exact
search runs in torch (:mod:`lib.retrieval.torch_search`). Embeddings are float32 and L2-normalised
(:func:`l2_normalize`), so the inner product is the cosine similarity and the search is exact.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

import numpy as np

from lib import devices
from lib.devices import UseGpu
from lib.errors import UserError


def _openblas_core_for_this_cpu() -> str | None:
    """The OpenBLAS kernel family this x86-64 Linux CPU can run ("SkylakeX", "Haswell"), else None."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            flags = next((line.split(":", 1)[1].split() for line in handle if line.startswith("flags")), [])
    except OSError:
        return None
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= set(flags):
        return "SkylakeX"
    if {"avx2", "fma"} <= set(flags):
        return "Haswell"
    return None


# Wheels that each install the same top-level ``faiss`` package: with two of them, whichever pip installed
# last silently wins. The project's extras install exactly one (``cpu`` or ``gpu``).
FAISS_WHEELS = ("faiss-cpu", "faiss-gpu-cu12", "faiss-gpu-cu11", "faiss-gpu")
INSTALL_HINT = "pip install -e '.[cpu]' on a laptop, '.[gpu]' on a CUDA machine"


def faiss_wheels() -> list[str]:
    """The faiss wheels installed in this environment."""
    from importlib import metadata

    installed = []
    for name in FAISS_WHEELS:
        try:
            metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        installed.append(name)
    return installed


def check_faiss_install(installed: list[str]) -> None:
    """One line naming the fix when no faiss wheel, or more than one, is installed."""
    if len(installed) > 1:
        raise UserError(f"{' and '.join(installed)} are both installed and overwrite each other's faiss package: "
                        f"pip uninstall -y {' '.join(installed)}, then {INSTALL_HINT}")
    if not installed:
        raise UserError(f"faiss is not installed: {INSTALL_HINT}")


def _import_faiss() -> ModuleType:
    """Import faiss so that its bundled OpenBLAS uses this CPU's vector kernels.

    The faiss-cpu wheels bundle an OpenBLAS (0.3.15 in faiss-cpu 1.15) that does not recognise recent
    CPUs (Sapphire Rapids here) and falls back to its SSE3 "Prescott" kernels: measured here, a
    10k x 50k x 2048-d flat search took 7x longer than with the AVX-512 kernels. OpenBLAS reads
    ``OPENBLAS_CORETYPE`` once, when the library loads, so it is set only around this import and
    removed again (libraries loaded later detect their CPU as usual). A value the user set is kept.
    """
    if "faiss" in sys.modules:
        return sys.modules["faiss"]
    check_faiss_install(faiss_wheels())
    # faiss's loader logs every SIMD variant its wheel lacks; inside Ray workers those lines reach
    # the job's console on every start. Real import failures still raise.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    core = _openblas_core_for_this_cpu()
    if core is None or "OPENBLAS_CORETYPE" in os.environ:
        import faiss
        return faiss
    os.environ["OPENBLAS_CORETYPE"] = core
    try:
        import faiss
    finally:
        os.environ.pop("OPENBLAS_CORETYPE", None)
    return faiss


faiss = _import_faiss()

# faiss's GPU k-selection handles at most this many neighbours per query; larger searches
# (MAP@R against a big gallery) run on the CPU index instead.
GPU_MAX_K = 2048


def l2_normalize(embeddings: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """(N, D) -> (N, D) float32, C-contiguous, every row scaled to unit L2 norm.

    A zero row stays zero (``eps`` keeps the division finite) instead of becoming NaN.
    """
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2:
        raise ValueError(f"expected embeddings of shape (N, D), got {embeddings.shape}")
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return np.ascontiguousarray(embeddings / np.maximum(norms, eps), dtype=np.float32)


def gpu_available() -> bool:
    """True when exact search can run on a GPU here: with faiss (:func:`faiss_gpus`) or with torch."""
    return faiss_gpus() > 0 or torch_gpus() > 0


def faiss_gpus() -> int:
    """GPUs this faiss build can search on: 0 without GPU support, and 0 where the probe found that its kernels
    do not run on this device (:func:`lib.retrieval.faiss_gpu.probe`: an abort there cannot be caught here)."""
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        return 0
    from lib.retrieval.faiss_gpu import probe

    return faiss.get_num_gpus() if probe().usable else 0


def torch_gpus() -> int:
    """CUDA devices torch can use in this process (0 on a CPU build); never initialises CUDA when torch is absent
    from the process and unimportable."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def search_uses_gpu(use_gpu: UseGpu | bool) -> bool:
    """``"auto"`` -> a GPU if exact search can run on one here (:func:`gpu_available`: faiss where it was probed to
    work, else torch); ``True``/``"true"`` insist on one, ``False``/``"false"`` never
    (:func:`lib.devices.resolve_use_gpu`)."""
    gpus = max(faiss_gpus(), torch_gpus())
    return devices.resolve_use_gpu(use_gpu, gpus, "this process", "exact search needs a CUDA GPU for torch or faiss")


@dataclass
class GalleryIndex:
    """An exact inner-product index over a gallery of ``size`` (N, D) float32 embeddings.

    ``index`` is a faiss index, or for ``engine="torch"`` the gallery as a CUDA tensor. ``resources`` keeps
    faiss's GPU memory pool alive as long as the GPU index that uses it (one pool per process: see
    :func:`_gpu_resources`).
    """

    index: Any
    size: int
    dim: int
    on_gpu: bool
    resources: Any = None
    engine: Literal["faiss", "torch"] = "faiss"


@functools.lru_cache(maxsize=1)
def _gpu_resources() -> Any:
    """faiss's GPU memory pool (about 1.5 GiB outside torch's allocator): made once and shared by every GPU index
    of this process."""
    return faiss.StandardGpuResources()


def _as_search_array(embeddings: np.ndarray, name: str) -> np.ndarray:
    array = np.ascontiguousarray(embeddings, dtype=np.float32)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise UserError(f"{name} must be a non-empty (N, D) array of embeddings, got shape {array.shape}")
    return array


def build_index(gallery: np.ndarray, use_gpu: UseGpu | bool = "auto", max_k: int | None = None) -> GalleryIndex:
    """An exact ``IndexFlatIP`` over ``gallery`` (N, D), L2-normalised float32 expected.

    ``max_k`` is the largest k this index will be searched with; above :data:`GPU_MAX_K` the
    index stays on the CPU even when a GPU is available (faiss's GPU search cannot return more).
    """
    gallery = _as_search_array(gallery, "gallery")
    wants_gpu = search_uses_gpu(use_gpu)
    if wants_gpu and faiss_gpus() == 0:  # a GPU faiss has no kernels for (or a faiss without GPUs): torch
        import torch

        return GalleryIndex(index=torch.from_numpy(gallery).to("cuda"), size=gallery.shape[0], dim=gallery.shape[1],
                            on_gpu=True, engine="torch")
    on_gpu = wants_gpu and (max_k is None or max_k <= GPU_MAX_K)
    index = faiss.IndexFlatIP(gallery.shape[1])
    resources = None
    if on_gpu:
        resources = _gpu_resources()
        index = faiss.index_cpu_to_gpu(resources, 0, index)
    index.add(gallery)
    return GalleryIndex(index=index, size=gallery.shape[0], dim=gallery.shape[1], on_gpu=on_gpu,
                        resources=resources)


def drop_self_matches(similarities: np.ndarray, indices: np.ndarray,
                      self_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Q, k+1) search results -> (Q, k) with each query's own gallery row ``self_rows`` (Q,) removed.

    The query's own row is removed wherever it ranks, not simply the first column: with duplicate
    images or tied similarities another item can come first. When the own row is not among the k+1
    (possible only with such ties), the last column is dropped so that every row keeps k neighbours.
    """
    is_self = indices == np.asarray(self_rows)[:, None]
    missing = ~is_self.any(axis=1)
    is_self[missing, -1] = True
    # faiss returns each gallery row at most once per query, so exactly one entry per row is dropped
    keep = ~is_self
    k = indices.shape[1] - 1
    return similarities[keep].reshape(-1, k), indices[keep].reshape(-1, k)


def search(index: GalleryIndex, queries: np.ndarray, k: int,
           self_rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most similar gallery items of each query, most similar first.

    ``queries`` (Q, D) float32. ``self_rows`` (Q,), when given, is each query's own row in the
    gallery (leave-one-out): k+1 are searched and that row is removed (:func:`drop_self_matches`).
    Returns ``similarities`` (Q, k) float32 and ``indices`` (Q, k) int64 gallery rows.
    """
    queries = _as_search_array(queries, "queries")
    if queries.shape[1] != index.dim:
        raise UserError(f"queries have {queries.shape[1]} dimensions but the gallery has {index.dim}")
    available = index.size - (1 if self_rows is not None else 0)
    if not 1 <= k <= available:
        raise UserError(f"cannot retrieve k={k} neighbours from a gallery of {index.size} items"
                        + (" (the query itself excluded)" if self_rows is not None else ""))
    if index.engine == "torch":
        from lib.retrieval.torch_search import torch_knn

        return torch_knn(queries, index.index, k, self_rows=self_rows)
    extra = 1 if self_rows is not None else 0
    if index.on_gpu and k + extra > GPU_MAX_K:
        raise ValueError(f"k={k + extra} exceeds the GPU limit {GPU_MAX_K}; build the index with max_k")
    similarities, indices = index.index.search(queries, k + extra)
    if self_rows is not None:
        similarities, indices = drop_self_matches(similarities, indices, self_rows)
    return similarities, indices.astype(np.int64, copy=False)


def knn(queries: np.ndarray, gallery: np.ndarray, k: int, exclude_self: bool = False,
        use_gpu: UseGpu | bool = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours by inner product (cosine on L2-normalised inputs).

    ``queries`` (Q, D) and ``gallery`` (N, D), float32, L2-normalised (see :func:`l2_normalize`).
    ``exclude_self=True`` is protocol L: the queries *are* the gallery (Q == N, row i is query i),
    and each query's own row is removed from its list (:func:`drop_self_matches`).
    Returns ``similarities`` (Q, k) float32, descending, and ``indices`` (Q, k) int64 gallery rows.
    """
    queries = _as_search_array(queries, "queries")
    gallery = _as_search_array(gallery, "gallery")
    self_rows = None
    if exclude_self:
        if queries.shape != gallery.shape:
            raise ValueError("exclude_self=True needs the queries to be the gallery (same shape)")
        self_rows = np.arange(len(queries))
    index = build_index(gallery, use_gpu, max_k=k + exclude_self)
    return search(index, queries, k, self_rows)
