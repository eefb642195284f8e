"""The Ray side of each stage, between :mod:`lib` (plain Python + PyTorch) and the command-line jobs.

- ``runtime`` starts or attaches to Ray; ``plan`` sizes workers and actors from the cluster's resources;
- ``data`` holds the Ray Data inputs; ``train_loop`` is the Ray Train worker loop, ``trainer`` its driver
  side and ``progress`` the trainers' live bars on the driver;
- ``embed`` is the embedding actor pool; ``prepare`` and ``evaluate`` run those stages;
- ``serve`` is the run gallery on Ray Serve (``jobs.serve``), with its page in ``page/``;
- ``ray_lines`` knows Ray's log-line formats (which lines the console keeps for the log file);
- ``ray_internals`` holds every private Ray API the project relies on, so an upgrade has one file to read.

Imports :mod:`lib` only (never ``tuning`` or ``jobs``).
"""
