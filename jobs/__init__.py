"""Command-line entry points, one per stage: a config, a ``main`` that calls one function of :mod:`onray` or
:mod:`tuning`, and what to print. Run one with ``python -m jobs.<stage>`` or ``cifar-embed <stage>``.
"""
