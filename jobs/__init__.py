"""Command-line entry points, one per stage; each wires :mod:`lib` into Ray.

Run one with ``python -m jobs.<stage>`` or ``cifar-embed <stage>``.
"""
