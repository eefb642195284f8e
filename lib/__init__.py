"""Library code for CIFAR-10 embeddings: plain Python, NumPy and PyTorch, never Ray.

Everything that can be tested without a cluster lives here; :mod:`onray` runs it on Ray.
"""
