"""The scale suite: the saved-index kinds ``jobs.search`` and ``jobs.serve`` can use (:mod:`lib.retrieval.approximate`)
over synthetic class-structured galleries of 100k, 1M and 5M x 128-d unit vectors (``--scale-sizes``).

For each size and each kind (exact, ivf, hnsw), built exactly as ``jobs.evaluate --index KIND`` builds it:

- build seconds (faiss build + the search-parameter tuning of ``jobs.evaluate``: the smallest ``nprobe`` or
  ``efSearch`` reaching recall@5 >= ``--scale-recall`` on 500 tuning queries);
- recall@5 against exact search on 1,000 other held-out queries of the same classes;
- one-query latency: ``--scale-queries`` searches of one query each, p50 and p99 in ms (the page's case);
- memory: the bytes of the saved file and the resident bytes the index adds to a fresh process that reads it
  (``/proc/self/statm`` before and after ``faiss.read_index``, Linux only).

Goals (issue 23): at 1M rows, some index answers one query in p50 <= 5 ms with recall@5 >= 0.95; at 5M, p50 <= 50
ms. An HNSW build whose time, extrapolated linearly from the previous size's measured build, would exceed
``--scale-build-budget-s`` is not run, and the result says so (never a guessed figure). The vectors are those of
:func:`benchmarks.common.class_structured_unit_vectors` (generated in chunks, float32 throughout).
"""

from __future__ import annotations

import gc
import json
import os
import time
from pathlib import Path

import numpy as np

from benchmarks.common import N_CLASSES, BenchmarkConfig, significant
from lib.retrieval.approximate import (
    INDEX_KINDS,
    RECALL_K,
    build_index,
    index_parameters,
    recall_at_k,
    search_full,
    set_search_parameter,
    tune_search,
)
from lib.retrieval.index import l2_normalize

DIM = 128
TUNE_QUERIES = 500
REPORT_QUERIES = 1000
GOALS = {"1000000": {"p50_ms": 5.0, "recall@5": 0.95}, "5000000": {"p50_ms": 50.0}}


def class_structured_gallery(n: int, dim: int, seed: int, centres: np.ndarray,
                             chunk: int = 250_000) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) float32 unit vectors and labels (n,) drawn like :func:`benchmarks.common.class_structured_unit_vectors`
    (same default spread) around ``centres`` (10, dim), in chunks so that 5M rows never need a float64 copy."""
    spread = 3.3 * (dim / 128) ** 0.25
    rng = np.random.default_rng(seed)
    vectors = np.empty((n, dim), np.float32)
    labels = rng.integers(0, N_CLASSES, n)
    for start in range(0, n, chunk):
        block = slice(start, min(n, start + chunk))
        noise = rng.standard_normal((block.stop - start, dim), dtype=np.float32) * np.float32(spread / np.sqrt(dim))
        vectors[block] = l2_normalize(centres[labels[block]] + noise)
    return vectors, labels


def resident_bytes() -> int | None:
    """This process's resident memory in bytes (Linux ``/proc/self/statm``), else None."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def one_query_latencies(indexes: dict[str, object], queries: np.ndarray) -> dict[str, np.ndarray]:
    """Wall milliseconds of each single-query search, per kind: query i is searched with every index in turn before
    query i + 1, so a machine that slows down moves every kind alike (after 5 unmeasured queries each)."""
    for query in queries[:5]:
        for kind, index in indexes.items():
            search_full(index, kind, query[None, :], RECALL_K)
    times: dict[str, list[float]] = {kind: [] for kind in indexes}
    for query in queries:
        for kind, index in indexes.items():
            started = time.perf_counter()
            search_full(index, kind, query[None, :], RECALL_K)
            times[kind].append(1000 * (time.perf_counter() - started))
    return {kind: np.asarray(values) for kind, values in times.items()}


def build_and_save(kind: str, gallery: np.ndarray, tune: np.ndarray, exact_tune: np.ndarray, target: float,
                   path: Path) -> dict:
    """Build and tune one index kind over ``gallery`` as ``jobs.evaluate`` does, and save it to ``path``."""
    from lib.retrieval.index import faiss

    started = time.perf_counter()
    index = build_index(gallery, kind)
    built_s = time.perf_counter() - started
    tried = []
    if kind != "exact":
        _, tried = tune_search(index, kind, tune, exact_tune, target)
    result = {"parameters": index_parameters(index, kind), "build_s": significant(time.perf_counter() - started, 4),
              "faiss_build_s": significant(built_s, 4)}
    faiss.write_index(index, str(path))
    result["file_bytes"] = path.stat().st_size
    if tried:
        result["tuning"] = tried
    return result


# Run in a fresh interpreter: the growth of its resident memory while faiss reads the file. In the benchmark's own
# process, memory freed by the previous index is reused and the growth reads anywhere from 0 to the full size.
_RESIDENT_PROBE = """
import os, sys
from lib.retrieval.index import faiss
def rss():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
before = rss()
index = faiss.read_index(sys.argv[1])
print(rss() - before)
"""


def resident_bytes_of(path: Path) -> int | None:
    """The resident bytes a fresh process grows by when it reads the index at ``path`` (Linux), else None."""
    import subprocess
    import sys

    if resident_bytes() is None:
        return None
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", _RESIDENT_PROBE, str(path)], capture_output=True, text=True,
                          env=env, timeout=600)
    return int(done.stdout.split()[-1]) if done.returncode == 0 and done.stdout.split() else None


def load_saved(kind: str, parameters: dict, path: Path) -> tuple[object, int | None]:
    """(the saved index, read back with its search parameter set; the resident bytes reading it adds to a fresh
    process)."""
    from lib.retrieval.index import faiss

    index = faiss.read_index(str(path))
    for name in ("nprobe", "efSearch"):
        if name in parameters:
            set_search_parameter(index, kind, parameters[name])
    return index, resident_bytes_of(path)


def measure_size(n: int, target: float, latency_queries: int, work: Path, skip: dict[str, str]) -> dict:
    """Every kind over an ``n``-row gallery; kinds in ``skip`` are reported as not run, with the reason given.

    Each kind is built, tuned and saved in turn (one build at a time); then the gallery is freed, every saved index
    is read back (its resident bytes), its recall@5 measured, and all are timed together, query by query."""
    from lib.retrieval.index import knn

    started = time.perf_counter()
    centres = l2_normalize(np.random.default_rng(0).normal(size=(N_CLASSES, DIM)))
    gallery, _ = class_structured_gallery(n, DIM, seed=1, centres=centres)
    queries, _ = class_structured_gallery(TUNE_QUERIES + REPORT_QUERIES, DIM, seed=2, centres=centres)
    tune, report = queries[:TUNE_QUERIES], queries[TUNE_QUERIES:]
    generated_s = time.perf_counter() - started
    _, exact_rows = knn(queries, gallery, RECALL_K, use_gpu=False)
    exact_tune, exact_report = exact_rows[:TUNE_QUERIES], exact_rows[TUNE_QUERIES:]
    result: dict = {"rows": n, "dim": DIM, "generate_s": significant(generated_s, 3),
                    "exact_ground_truth_s": significant(time.perf_counter() - started - generated_s, 3)}
    measured = [kind for kind in INDEX_KINDS if kind not in skip]
    for kind in INDEX_KINDS:
        if kind in skip:
            result[kind] = {"not_run": skip[kind]}
        else:
            result[kind] = build_and_save(kind, gallery, tune, exact_tune, target, work / f"scale-{kind}.faiss")
            print(f"scale {n}: built {kind} {result[kind]}", flush=True)
    del gallery
    indexes = {}
    for kind in measured:
        indexes[kind], result[kind]["resident_bytes"] = load_saved(kind, result[kind]["parameters"],
                                                                   work / f"scale-{kind}.faiss")
        (work / f"scale-{kind}.faiss").unlink()
        result[kind]["recall@5"] = round(recall_at_k(search_full(indexes[kind], kind, report, RECALL_K)[1],
                                                     exact_report), 4)
    for kind, latencies in one_query_latencies(indexes, report[:latency_queries]).items():
        result[kind]["p50_ms"] = significant(float(np.percentile(latencies, 50)), 3)
        result[kind]["p99_ms"] = significant(float(np.percentile(latencies, 99)), 3)
    print(f"scale {n}: {json.dumps(result)}", flush=True)  # each size as it ends: a run cut short keeps them
    return result


def measure(sizes: tuple[int, ...] = (100_000, 1_000_000, 5_000_000), target: float = 0.95,
            latency_queries: int = 300, build_budget_s: float = 600.0, work: Path | None = None,
            kinds: tuple[str, ...] = INDEX_KINDS) -> dict:
    """The suite over each of ``sizes`` (ascending) and index ``kinds``; see the module docstring."""
    import tempfile

    from lib.retrieval.index import faiss

    results: dict = {"dim": DIM, "target_recall@5": target, "tune_queries": TUNE_QUERIES,
                     "report_queries": REPORT_QUERIES, "latency_queries": latency_queries,
                     "faiss": faiss.__version__, "faiss_threads": faiss.omp_get_max_threads(),
                     "build_budget_s": build_budget_s, "goals": GOALS}
    with tempfile.TemporaryDirectory(prefix="scale-", dir=work) as folder:
        previous: dict | None = None
        for n in sorted(sizes):
            skip = {kind: "not run: not in --scale-kinds" for kind in INDEX_KINDS if kind not in kinds}
            last = previous.get("hnsw", {}) if previous else {}
            if "hnsw" not in skip and "build_s" in last:
                if last["build_s"] * n / previous["rows"] > build_budget_s:
                    skip["hnsw"] = (f"not run: the {previous['rows']:,}-row build took {last['build_s']:.0f} s; "
                                    f"{n:,} rows would take more than the {build_budget_s:.0f} s budget")
            elif "hnsw" not in skip and "not_run" in last:
                skip["hnsw"] = f"not run: a smaller gallery's build was already over the {build_budget_s:.0f} s budget"
            results[str(n)] = previous = measure_size(n, target, latency_queries, Path(folder), skip)
            gc.collect()
    results["goals_met"] = goals_met(results)
    return results


def goals_met(results: dict) -> dict[str, bool | None]:
    """Per goal size: whether some measured index met it (None when that size was not measured)."""
    met: dict[str, bool | None] = {}
    for size, goal in GOALS.items():
        if size not in results:
            met[size] = None
            continue
        rows = [results[size][kind] for kind in INDEX_KINDS if "p50_ms" in results[size][kind]]
        met[size] = any(row["p50_ms"] <= goal["p50_ms"] and row["recall@5"] >= goal.get("recall@5", 0)
                        for row in rows)
    return met


def run(cfg: BenchmarkConfig, work: Path) -> dict:
    return measure(cfg.scale_sizes, cfg.scale_recall, cfg.scale_queries, cfg.scale_build_budget_s, work,
                   cfg.scale_kinds)


def summary(r: dict) -> str:
    parts = []
    for size in sorted((key for key in r if key.isdigit()), key=int):
        cells = []
        for kind in INDEX_KINDS:
            row = r[size][kind]
            cells.append(f"{kind} not run" if "not_run" in row else
                         f"{kind} p50 {row['p50_ms']} ms recall@5 {row['recall@5']}")
        parts.append(f"{int(size):,} rows: " + ", ".join(cells))
    return "; ".join(parts)
