"""The Ray side of each stage, between :mod:`lib` (plain Python + PyTorch) and the command-line jobs.

``runtime`` starts or attaches to Ray; ``plan`` sizes workers and actors from the cluster's resources;
``data`` holds the Ray Data inputs; ``train_loop`` is the Ray Train worker loop and ``trainer`` its
driver side; ``embed`` is the embedding actor pool; ``prepare`` and ``evaluate`` run those stages.
Imports :mod:`lib` only (never ``tuning`` or ``jobs``).
"""
