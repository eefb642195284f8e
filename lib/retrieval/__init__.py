"""Retrieval: exact nearest neighbours with faiss, and retrieval metrics over neighbour label tables.

Two layers, kept apart so that every metric is a pure function that unit tests check against
hand-computed tables, without faiss or a search:

- :mod:`lib.retrieval.index` (search): a faiss flat inner-product index over float32,
  L2-normalised embeddings (so the inner product is the cosine similarity and the search is
  exact), on the GPU when faiss has GPU support and a GPU is visible.
- :mod:`lib.retrieval.metrics` (metrics): pure numpy functions over a *neighbour label table*,
  each docstring pinning its formula.
- :mod:`lib.retrieval.approximate`: the saved gallery index of ``jobs.search``/``jobs.serve`` (exact, IVF-Flat or
  HNSW, tuned to a recall against exact search), never used by the metrics; :mod:`lib.retrieval.index_file`
  checks such a file's layout before faiss reads it.
- :mod:`lib.retrieval.protocols` joins the two: ``evaluate_protocols`` runs protocols L (test
  against test, leave-one-out) and G (test against train) and returns every number;
  ``linear_probe`` is the logistic-regression accuracy on embeddings.

Import from the modules themselves; this package re-exports nothing.
"""
