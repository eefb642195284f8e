"""Exact nearest-neighbour search in torch: the GPU path wherever faiss has no kernels for the device.

faiss's GPU wheels carry code for some GPU architectures only; on the others (Hopper and Blackwell for
``faiss-gpu-cu12``) the first search aborts the process. A flat inner-product search is one matrix product
and a top-k, which torch runs on any device it supports, so that is what the project uses there (and what a
Ray Train worker uses for its per-epoch validation, so no worker ever creates faiss GPU resources).

The gallery is scanned in query chunks so that the (chunk, N) similarity block stays bounded: memory is
``chunk x N x 4`` bytes however many queries there are.
"""

from __future__ import annotations

import numpy as np
import torch

# Similarity block budget: 256 MiB of float32 per chunk of queries against the whole gallery.
BLOCK_BYTES = 256 * 2 ** 20


def query_chunk(gallery_size: int, block_bytes: int = BLOCK_BYTES) -> int:
    """Queries per chunk so that a (chunk, ``gallery_size``) float32 block fits ``block_bytes`` (at least 1)."""
    return max(1, block_bytes // (4 * max(1, gallery_size)))


@torch.no_grad()
def torch_knn(queries: torch.Tensor | np.ndarray, gallery: torch.Tensor | np.ndarray, k: int,
              exclude_self: bool = False, device: torch.device | str | None = None,
              block_bytes: int = BLOCK_BYTES, self_rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours of (Q, D) ``queries`` in (N, D) ``gallery`` by inner product.

    The same contract as :func:`lib.retrieval.index.knn`: inputs L2-normalised float32; ``exclude_self=True``
    means the queries are the gallery (row i is query i) and each query's own row is left out; ``self_rows`` (Q,)
names each query's own gallery row instead, for a chunk of queries searched against a whole gallery. Tensors already
    on a device are searched there (``device`` overrides). Returns ``similarities`` (Q, k) float32, descending,
    and ``indices`` (Q, k) int64, as numpy arrays.

    Exclusion masks the query's own row before the top-k (its similarity becomes -inf), so the result is the
    k best other rows; faiss searches k + 1 and drops the own row, which gives the same rows except where
    similarities tie exactly.
    """
    queries_t = torch.as_tensor(queries)
    gallery_t = torch.as_tensor(gallery)
    target = torch.device(device) if device is not None else gallery_t.device
    queries_t = queries_t.to(target, torch.float32)
    gallery_t = gallery_t.to(target, torch.float32)
    if queries_t.ndim != 2 or gallery_t.ndim != 2 or queries_t.shape[1] != gallery_t.shape[1]:
        raise ValueError(f"expected (Q, D) queries and (N, D) gallery, got {tuple(queries_t.shape)} and "
                         f"{tuple(gallery_t.shape)}")
    if exclude_self and queries_t.shape != gallery_t.shape:
        raise ValueError("exclude_self=True needs the queries to be the gallery (same shape)")
    if exclude_self:
        self_rows = np.arange(len(queries_t))
    own = None if self_rows is None else torch.as_tensor(np.asarray(self_rows), dtype=torch.long).to(target)
    if own is not None and len(own) != len(queries_t):
        raise ValueError(f"self_rows has {len(own)} entries for {len(queries_t)} queries")
    available = len(gallery_t) - int(own is not None)
    if not 1 <= k <= available:
        raise ValueError(f"cannot retrieve k={k} neighbours from a gallery of {len(gallery_t)} items")
    chunk = query_chunk(len(gallery_t), block_bytes)
    similarities, indices = [], []
    for start in range(0, len(queries_t), chunk):
        block = queries_t[start:start + chunk] @ gallery_t.T
        if own is not None:
            block[torch.arange(len(block), device=target), own[start:start + len(block)]] = float("-inf")
        top = torch.topk(block, k, dim=1, largest=True, sorted=True)
        similarities.append(top.values)
        indices.append(top.indices)
    # the one host copy of the search: the caller's label tables are numpy
    return (torch.cat(similarities).cpu().numpy().astype(np.float32, copy=False),
            torch.cat(indices).cpu().numpy().astype(np.int64, copy=False))
