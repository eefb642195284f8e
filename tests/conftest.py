"""Shared fixtures: tiny generated image folders and CIFAR-10 batches, and one Ray for the session.

Tests under tests/integration/ share one local Ray (started on first use, with more logical CPUs than
cores: on 2 cores, two Train workers on ``num_cpus=2`` starve Ray Data and hang); tests under tests/unit/
never start Ray.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.pop("RAY_ADDRESS", None)  # never attach the test run to someone's cluster
# Tests talk to servers they start on loopback (HTTP download tests, Ray's dashboard, a Ray head):
# a proxy from the environment must never sit in between.
_LOCAL = "127.0.0.1,localhost"
for _var in ("no_proxy", "NO_PROXY"):
    os.environ[_var] = ",".join(filter(None, (os.environ.get(_var), _LOCAL)))

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("cat", "dog", "frog")
# A distinct base colour per class, so a decoded image can be traced back to its class.
CLASS_COLOURS = {"cat": (200, 40, 40), "dog": (40, 200, 40), "frog": (40, 40, 200)}


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = Path(str(item.fspath)).parts
        if "integration" in parts:
            item.add_marker(pytest.mark.integration)
        if "realdata" in parts:
            item.add_marker(pytest.mark.realdata)


def image_array(class_name: str, index: int, size: tuple[int, int] = (32, 32)) -> np.ndarray:
    """A deterministic RGB test image: the class colour plus an index-seeded pattern."""
    rng = np.random.default_rng(index * 7919 + sum(map(ord, class_name)))
    base = np.array(CLASS_COLOURS[class_name], dtype=np.int16)
    noise = rng.integers(-30, 30, size=(size[1], size[0], 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def make_image_folder(root: Path, train_per_class: int = 10, test_per_class: int = 4,
                      classes: tuple[str, ...] = CLASSES, fmt: str = "png") -> Path:
    """``root/{train,test}/<class>/NNNN.<fmt>`` with :func:`image_array` pixels (PNG is lossless)."""
    from PIL import Image

    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(image_array(name, i + (1000 if split == "test" else 0))).save(
                    folder / f"{i:04d}.{fmt}")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "images")


def make_cifar_batches(root: Path, per_batch: int = 20, n_classes: int = 10) -> Path:
    """A miniature ``cifar-10-batches-py`` in the official pickle format (5 train batches + test)."""
    batches = root / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"class{i}" for i in range(n_classes)]
    with open(batches / "batches.meta", "wb") as handle:
        pickle.dump({b"label_names": [n.encode() for n in names], b"num_vis": 3072}, handle)
    for name in (*[f"data_batch_{i}" for i in range(1, 6)], "test_batch"):
        labels = [i % n_classes for i in range(per_batch)]
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        with open(batches / name, "wb") as handle:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, handle)
    return batches


@pytest.fixture
def cifar_batches(tmp_path) -> Path:
    return make_cifar_batches(tmp_path / "cifar")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for all integration tests (num_cpus=4 so Data and Train never starve)."""
    import ray

    from onray.runtime import init_ray

    init_ray(num_cpus=4, include_dashboard=False, object_store_memory=512 * 1024 * 1024,
             log_to_driver=False)
    yield ray
    ray.shutdown()


def cifar10_dir() -> Path:
    """$CIFAR10_DIR, else the shared copy beside the checkout, else the workplace's shared copy."""
    if "CIFAR10_DIR" in os.environ:
        return Path(os.environ["CIFAR10_DIR"])
    for candidate in (REPO.parent / "shared" / "datasets" / "cifar10", Path("/work/shared/datasets/cifar10")):
        if candidate.is_dir():
            return candidate
    return REPO.parent / "shared" / "datasets" / "cifar10"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1 (SQLite backend, artefacts served from a temporary folder),
    started once per session: yields ``{"uri", "log"}``, ``log`` being the server's output, one line per request."""
    import subprocess
    import sys
    import time
    import urllib.request

    pytest.importorskip("mlflow")
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"http://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    log_path = root / "server.log"
    with open(log_path, "wb") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
             "--port", uri.rsplit(":", 1)[1], "--workers", "1"],
            cwd=root, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180  # its database migrations take ~25 s on 2 busy cores
        while True:
            assert server.poll() is None, f"mlflow server exited:\n{log_path.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"mlflow server did not answer:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.5)
        yield {"uri": uri, "log": log_path}
    finally:
        import signal

        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)  # the server and the workers it started, nothing else
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
