"""Benchmarks of the evaluation library against the baselines it replaces; each returns a dict.

    python -c "from jobs.benchmark_eval import retrieval_suite; print(retrieval_suite())"
    python -c "from jobs.benchmark_eval import tsne_suite; print(tsne_suite())"
    python -c "from jobs.benchmark_eval import embed_suite; print(embed_suite('DATA'))"

Both sides of every ratio are measured in the same run on the same data, interleaved round by round,
and medians are reported, so a busy machine slows both. CPU seconds (all threads of this process)
are reported next to wall seconds: on a shared machine they move less with other people's load.

- ``retrieval_suite``: mAP@5 for 10k queries against a 50k gallery (random unit vectors with
  10-class structure) at 128 and 2048 dimensions, computed by the project (``lib.retrieval.knn`` +
  ``map_at_k``), by a bare faiss flat search plus a one-line numpy mAP (goal: the project within
  1.2x of it), and by the per-query scikit-learn ``NearestNeighbors`` loop of reference CIFAR
  projects (goal: the project >= 100x faster at 2048-d). The loop is timed on a subset of the
  queries and extrapolated linearly to all of them; the output says so.
- ``tsne_suite``: ``lib.clustering.tsne_2d`` against scikit-learn's ``TSNE`` (defaults, seeded)
  on the same 10k x 128 data, with quality figures for both maps.
- ``embed_suite``: images/s of jobs.evaluate's embedding stage (``jobs.embed.stream_embeddings``:
  Ray Data reads every split of a prepared DATA and streams it through an actor pool of
  ``jobs.embed.EmbedBatches``) against a plain ``torch.inference_mode`` loop in this process that
  reads the same splits with pyarrow and embeds them with the same networks, batch size, precision
  and torch threads. Each round of either side builds the networks and reads the data, as a job run
  does; the Ray side also pays its actors' start-up.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lib.clustering import tsne_2d
from lib.retrieval import knn, l2_normalize, map_at_k

N_CLASSES = 10


def class_structured_unit_vectors(n: int, dim: int, seed: int, spread: float | None = None,
                                  centres: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, dim) float32 unit vectors around one random direction per class, labels (n,), centres (10, dim).

    ``spread`` is the noise norm relative to the unit class direction. The default, 3.3 * (dim / 128)
    ** 0.25, keeps the classes about as entangled at every dimension (mAP@5 of 10k queries against
    a 50k gallery near 0.7 at 128-d and 2048-d, like usable but imperfect embeddings), because the
    noise in a dot product of random directions shrinks like 1 / sqrt(dim).
    Pass the ``centres`` of one call to another to draw a second split of the same classes.
    """
    if spread is None:
        spread = 3.3 * (dim / 128) ** 0.25
    rng = np.random.default_rng(seed)
    if centres is None:
        centres = l2_normalize(rng.normal(size=(N_CLASSES, dim)))
    labels = rng.integers(0, N_CLASSES, n)
    noise = rng.normal(size=(n, dim)).astype(np.float32) * (spread / np.sqrt(dim))
    return l2_normalize(centres[labels] + noise), labels, centres


def blas_kernels() -> dict[str, str]:
    """Which kernel family each loaded BLAS uses (threadpoolctl), e.g. faiss's bundled OpenBLAS."""
    from threadpoolctl import threadpool_info

    return {Path(info["filepath"]).name: str(info.get("architecture"))
            for info in threadpool_info() if info.get("internal_api") == "openblas"}


def _timed(measure: Callable[[], object]) -> tuple[float, float, object]:
    """(wall seconds, process CPU seconds, result) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = measure()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def _interleave(sides: dict[str, Callable[[], object]], rounds: int
                ) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, object]]:
    """Run the sides in turn, ``rounds`` times; every wall and CPU time, and each side's last result."""
    wall: dict[str, list[float]] = {name: [] for name in sides}
    cpu: dict[str, list[float]] = {name: [] for name in sides}
    values: dict[str, object] = {}
    for _ in range(rounds):
        for name, measure in sides.items():
            seconds, cpu_seconds, values[name] = _timed(measure)
            wall[name].append(seconds)
            cpu[name].append(cpu_seconds)
    return wall, cpu, values


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def project_map_at_5(queries: np.ndarray, query_labels: np.ndarray, gallery: np.ndarray,
                     gallery_labels: np.ndarray) -> float:
    """The project's path: exact faiss search through :func:`lib.retrieval.knn`, then :func:`map_at_k`."""
    _, indices = knn(queries, gallery, 5, use_gpu=False)
    return map_at_k(gallery_labels[indices], query_labels, 5)


def bare_faiss_map_at_5(queries: np.ndarray, query_labels: np.ndarray, gallery: np.ndarray,
                        gallery_labels: np.ndarray) -> float:
    """The floor: a bare ``IndexFlatIP`` search and the shortest numpy mAP@5 over its result."""
    import faiss

    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(gallery)
    _, indices = index.search(queries, 5)
    relevant = gallery_labels[indices] == query_labels[:, None]
    return float((np.cumsum(relevant, axis=1) / np.arange(1, 6) * relevant).sum(axis=1).mean() / 5)


def sklearn_loop_map_at_5(queries: np.ndarray, query_labels: np.ndarray, gallery: np.ndarray,
                          gallery_labels: np.ndarray) -> float:
    """The reference-project way: ``NearestNeighbors`` fitted on the gallery, one ``kneighbors`` call
    and one Python-level AP per query."""
    from sklearn.neighbors import NearestNeighbors

    model = NearestNeighbors(n_neighbors=5).fit(gallery)
    scores = []
    for query, label in zip(queries, query_labels, strict=True):
        _, neighbours = model.kneighbors(query[None, :])
        hits, total = 0, 0.0
        for rank, row in enumerate(neighbours[0], start=1):
            if gallery_labels[row] == label:
                hits += 1
                total += hits / rank
        scores.append(total / 5)
    return float(np.mean(scores))


def retrieval_suite(rounds: int = 3, n_queries: int = 10_000, n_gallery: int = 50_000,
                    dims: tuple[int, ...] = (128, 2048), sklearn_queries: int = 200) -> dict:
    """mAP@5 of ``n_queries`` against ``n_gallery`` at each of ``dims``: project vs bare faiss vs sklearn loop.

    Per dimension: median wall and CPU seconds over ``rounds`` interleaved rounds, the ratios
    project / bare faiss (goal <= 1.2) and sklearn loop / project (goal >= 100 at 2048-d), and the
    mAP@5 each side computed (they must agree). The sklearn loop runs on the first ``sklearn_queries``
    queries each round; its time is scaled by ``n_queries / sklearn_queries``.
    """
    results: dict = {"n_queries": n_queries, "n_gallery": n_gallery, "rounds": rounds, "blas": blas_kernels(),
                     "sklearn_note": f"sklearn loop timed on {sklearn_queries} queries per round, "
                                     f"extrapolated linearly x{n_queries / sklearn_queries:g} to {n_queries}"}
    for dim in dims:
        results[f"dim_{dim}"] = _retrieval_at(dim, rounds, n_queries, n_gallery, sklearn_queries)
    return results


def _retrieval_at(dim: int, rounds: int, n_queries: int, n_gallery: int, sklearn_queries: int) -> dict:
    gallery, gallery_labels, centres = class_structured_unit_vectors(n_gallery, dim, seed=1)
    queries, query_labels, _ = class_structured_unit_vectors(n_queries, dim, seed=2, centres=centres)
    subset = slice(0, sklearn_queries)
    sides: dict[str, Callable[[], object]] = {
        "project": lambda: project_map_at_5(queries, query_labels, gallery, gallery_labels),
        "bare_faiss": lambda: bare_faiss_map_at_5(queries, query_labels, gallery, gallery_labels),
        "sklearn_loop_subset": lambda: sklearn_loop_map_at_5(queries[subset], query_labels[subset],
                                                             gallery, gallery_labels),
    }
    wall, cpu, values = _interleave(sides, rounds)
    scale = n_queries / sklearn_queries
    project_subset = project_map_at_5(queries[subset], query_labels[subset], gallery, gallery_labels)
    row = {
        "project_s": _median(wall["project"]), "project_cpu_s": _median(cpu["project"]),
        "bare_faiss_s": _median(wall["bare_faiss"]), "bare_faiss_cpu_s": _median(cpu["bare_faiss"]),
        "sklearn_loop_s_extrapolated": _median([s * scale for s in wall["sklearn_loop_subset"]]),
        "sklearn_loop_cpu_s_extrapolated": _median([s * scale for s in cpu["sklearn_loop_subset"]]),
        "map@5_project": round(float(values["project"]), 5),
        "map@5_bare_faiss": round(float(values["bare_faiss"]), 5),
        "map@5_sklearn_subset": round(float(values["sklearn_loop_subset"]), 5),
        "map@5_project_same_subset": round(project_subset, 5),
    }
    row["ratio_project_over_bare_faiss"] = round(row["project_s"] / row["bare_faiss_s"], 3)
    row["ratio_project_over_bare_faiss_cpu"] = round(row["project_cpu_s"] / row["bare_faiss_cpu_s"], 3)
    row["ratio_sklearn_loop_over_project"] = round(row["sklearn_loop_s_extrapolated"] / row["project_s"], 1)
    return row


def neighbour_preservation(high: np.ndarray, low: np.ndarray, k: int = 10) -> float:
    """Mean share of each point's k nearest neighbours in ``high`` (N, D) kept among its k nearest in ``low`` (N, 2)."""
    import faiss

    def neighbours(points: np.ndarray) -> np.ndarray:
        points = np.ascontiguousarray(points, dtype=np.float32)
        index = faiss.IndexFlatL2(points.shape[1])
        index.add(points)
        _, rows = index.search(points, k + 1)
        return rows[:, 1:]  # column 0 is the point itself (no duplicates in this data)

    high_rows, low_rows = neighbours(high), neighbours(low)
    shared = (high_rows[:, :, None] == low_rows[:, None, :]).any(axis=2).sum(axis=1)
    return float(shared.mean() / k)


def map_quality(high: np.ndarray, low: np.ndarray, labels: np.ndarray, subsample: int = 2000, seed: int = 0) -> dict:
    """Quality of a 2-D map ``low`` (N, 2) of ``high`` (N, D) with class ``labels`` (N,).

    ``knn_preservation@10`` (all points), ``trustworthiness@10`` (scikit-learn, on a seeded subsample,
    being quadratic), ``class_knn_acc_2d`` (leave-one-out 5-NN class accuracy in the map).
    """
    import faiss
    from sklearn.manifold import trustworthiness

    from lib.retrieval import knn_accuracy

    rows = np.random.default_rng(seed).choice(len(high), min(subsample, len(high)), replace=False)
    low32 = np.ascontiguousarray(low, dtype=np.float32)
    index = faiss.IndexFlatL2(2)
    index.add(low32)
    _, nearest = index.search(low32, 6)
    return {"knn_preservation@10": round(neighbour_preservation(high, low), 4),
            "trustworthiness@10": round(float(trustworthiness(high[rows], low[rows], n_neighbors=10)), 4),
            "class_knn_acc_2d": round(knn_accuracy(labels[nearest[:, 1:]], labels, 5), 4)}


def tsne_suite(rounds: int = 1, n: int = 10_000, dim: int = 128, spread: float | None = None) -> dict:
    """``lib.clustering.tsne_2d`` vs scikit-learn's ``TSNE`` (defaults, ``random_state=0``) on the same data.

    Interleaved ``rounds``; median wall and CPU seconds, the speed ratio, and :func:`map_quality`
    of each side's last map (plus the high-dimensional 5-NN class accuracy, the ceiling for the maps').
    """
    from sklearn.manifold import TSNE

    from lib.retrieval import knn_accuracy

    points, labels, _ = class_structured_unit_vectors(n, dim, seed=3, spread=spread)
    sides: dict[str, Callable[[], object]] = {
        "project": lambda: tsne_2d(points, seed=0),
        "sklearn": lambda: TSNE(n_components=2, random_state=0).fit_transform(points),
    }
    wall, cpu, maps = _interleave(sides, rounds)
    _, high_neighbours = knn(points, points, 5, exclude_self=True, use_gpu=False)
    results: dict = {"n": n, "dim": dim, "rounds": rounds,
                     "class_knn_acc_high_dim": round(knn_accuracy(labels[high_neighbours], labels, 5), 4)}
    for name in sides:
        results[name] = {"wall_s": _median(wall[name]), "cpu_s": _median(cpu[name]),
                         **map_quality(points, np.asarray(maps[name]), labels)}
    results["speedup_wall"] = round(results["sklearn"]["wall_s"] / results["project"]["wall_s"], 2)
    results["speedup_cpu"] = round(results["sklearn"]["cpu_s"] / results["project"]["cpu_s"], 2)
    return results


def embed_suite(data_dir: str | Path, rounds: int = 3, backbones: tuple[str, ...] = ("resnet50",),
                image_size: int = 32, batch_size: int = 256, embedding_dim: int = 128, num_actors: int = 0) -> dict:
    """Embedding throughput of a whole prepared DATA (every split): the job's Ray Data actor-pool pass vs a
    plain PyTorch loop, interleaved ``rounds``, each side once per round.

    Both sides embed every image with every network in ``backbones`` (seeded random weights, the same
    on both sides), on the GPU when Ray's actors get one, else on the CPU with ``os.cpu_count()`` torch
    threads (the Ray side's actors split the cores; ``num_actors`` 0 is jobs.evaluate's choice). Reports
    median wall seconds, embeddings/s (images x networks), the ratio Ray / plain, and the largest difference
    between the two sides' vectors for the same ids (same function; bf16 sums in another order differ a little).
    """
    import os

    import ray
    import torch

    from jobs.embed import ModelSource, actor_plan, embed_loop, load_embedding_model, stream_embeddings
    from jobs.runtime import init_ray
    from lib.dataset import SPLITS, read_split

    init_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False
    sources = [ModelSource(f"benchmark-{b}", b, "none", embedding_dim, image_size) for b in backbones]
    plan = actor_plan("auto", num_actors)  # 0: jobs.evaluate's choice
    device = torch.device("cuda" if plan["on_gpu"] else "cpu")

    def through_ray() -> dict[str, dict[str, np.ndarray]]:
        return stream_embeddings(data_dir, sources, plan, batch_size)

    def plain_loop() -> dict[str, dict[str, np.ndarray]]:
        models = [load_embedding_model(source, device) for source in sources]
        out = {}
        for split in SPLITS:
            arrays = read_split(data_dir, split)
            out[split] = {"id": arrays.ids, "label": arrays.labels}
            for i, (source, model) in enumerate(zip(sources, models, strict=True)):
                out[split][f"embedding_{i}"] = embed_loop(source, model, arrays.images, batch_size, device)
        return out

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    try:
        wall, cpu, values = _interleave({"ray_actor_pool": through_ray, "plain_torch": plain_loop}, rounds)
    finally:
        torch.set_num_threads(threads)
    ray_out, plain_out = values["ray_actor_pool"], values["plain_torch"]
    images = sum(len(plain_out[split]["id"]) for split in SPLITS)
    diff = 0.0
    for split in SPLITS:
        ray_order = np.argsort(ray_out[split]["id"].astype(str))
        plain_order = np.argsort(plain_out[split]["id"].astype(str))
        if not np.array_equal(ray_out[split]["id"][ray_order], plain_out[split]["id"][plain_order]):
            raise RuntimeError(f"the two sides embedded different rows of split {split}")
        for i in range(len(sources)):
            key = f"embedding_{i}"
            diff = max(diff, float(np.abs(ray_out[split][key][ray_order] - plain_out[split][key][plain_order]).max()))
    results: dict = {"images": images, "backbones": list(backbones), "image_size": image_size,
                     "batch_size": batch_size, "rounds": rounds, "actors": plan["actors"],
                     "device": "GPU" if plan["on_gpu"] else "CPU", "torch_threads": os.cpu_count(),
                     "max_abs_diff": round(diff, 6)}
    for name in ("ray_actor_pool", "plain_torch"):
        results[name] = {"wall_s": _median(wall[name]), "cpu_s_driver": _median(cpu[name]),
                         "embeddings_per_s": round(images * len(sources) / statistics.median(wall[name]), 1)}
    results["ratio_ray_over_plain"] = round(
        results["ray_actor_pool"]["embeddings_per_s"] / results["plain_torch"]["embeddings_per_s"], 3)
    return results
