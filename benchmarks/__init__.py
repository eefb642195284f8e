"""Benchmarks: the project's Ray paths and evaluation library against the plain baselines they replace.

One module per suite, each with ``run(cfg, work) -> dict`` and ``summary(result) -> str``; the job
``python -m jobs.benchmark`` runs the chosen ones. :mod:`benchmarks.common` holds what they share.

- :mod:`benchmarks.prepare`: ``python -m jobs.prepare`` (Ray Data decode + write) vs a plain PIL loop.
- :mod:`benchmarks.inputs`: the Ray Data input pipeline (:mod:`onray.data`) vs a PyTorch DataLoader.
- :mod:`benchmarks.train`: Ray Data + Ray Train (:mod:`onray.trainer`) vs a plain PyTorch loop, both
  stepping with :func:`lib.training.train_epoch`.
- :mod:`benchmarks.retrieval`: :mod:`lib.retrieval` vs bare faiss vs a per-query scikit-learn loop.
- :mod:`benchmarks.tsne`: :func:`lib.clustering.tsne_2d` vs scikit-learn's ``TSNE``.
- :mod:`benchmarks.embed`: the Ray Data actor pool (:mod:`onray.embed`) vs a plain inference loop.
- :mod:`benchmarks.serve`: the run gallery's ``POST /search`` on Ray Serve (:mod:`onray.serve`): warm
  latency and throughput over HTTP from loopback, against the goals it names (no baseline of its own).
- :mod:`benchmarks.scale`: the saved-index kinds (exact, IVF, HNSW) over 100k-5M-row synthetic galleries:
  build time, one-query latency, recall@5 against exact search and memory.

Both sides of every ratio are measured in the same run on the same machine and data, interleaved
round by round (:func:`benchmarks.common.interleave`), and medians are reported, so a busy or drifting
machine moves both. Timings are reported, never asserted: there are no timing assertions in tests.
Imports :mod:`lib`, :mod:`onray` and :mod:`tuning` only (never ``jobs``).
"""
