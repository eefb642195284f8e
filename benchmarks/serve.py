"""The serve suite: the run gallery's ``POST /search`` over HTTP from loopback, the way a person's browser or
script asks it: an uploaded 32 px PNG, decoded, embedded and searched against a 50,000-image gallery.

- warm latency: one client, one query at a time (after 20 unmeasured queries): p50 and p99 of the whole
  HTTP round trip (goal p50 <= 50 ms, p99 <= 200 ms), and the time the replica itself took (its ``ms``);
- throughput: 8 clients, each sending its next query as soon as the last is answered: queries/s (goal >= 50),
  latency under that load and the mean ``@serve.batch`` size.

Both loops are bounded in count and time and talk to 127.0.0.1 only. The gallery is ``--serve-run RUN``
(an evaluated run, searched with its saved index) or, by default, a synthetic run: a real network
(``--backbone``, untrained, 32 px, 128-d, as ``jobs.evaluate`` stores it) over a 50,000-row exact
inner-product index of class-structured random unit vectors; an exact flat search costs the same for
any vectors of that count and size.
"""

from __future__ import annotations

import http.client
import io
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks.common import BenchmarkConfig, class_structured_unit_vectors
from lib.parquet import write_parquet

WARMUP_QUERIES = 20
LATENCY_QUERIES = 300
THROUGHPUT_SECONDS = 15.0
THROUGHPUT_MAX_QUERIES = 3000
BOUNDARY = "cifar-embeddings-benchmark"


def upload_body(png: bytes, k: int) -> bytes:
    """A multipart/form-data body with the PNG as field ``image`` and ``k``, built once and sent every query."""
    lines = [f"--{BOUNDARY}", 'Content-Disposition: form-data; name="k"', "", str(k),
             f"--{BOUNDARY}", 'Content-Disposition: form-data; name="image"; filename="query.png"',
             "Content-Type: image/png", ""]
    return "\r\n".join(lines).encode() + b"\r\n" + png + f"\r\n--{BOUNDARY}--\r\n".encode()


class Client:
    """One keep-alive HTTP connection to the gallery on 127.0.0.1, timing each query."""

    def __init__(self, port: int, body: bytes):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.body = body
        self.headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}

    def query(self) -> tuple[float, float, int]:
        """(round-trip ms, replica ms, batch size) of one search."""
        import json

        started = time.perf_counter()
        self.connection.request("POST", "/search", body=self.body, headers=self.headers)
        response = self.connection.getresponse()
        payload = response.read()
        elapsed = 1000 * (time.perf_counter() - started)
        if response.status != 200:
            raise RuntimeError(f"POST /search answered {response.status}: {payload[:200]!r}")
        answer = json.loads(payload)
        return elapsed, answer["ms"], answer["batch"]


def percentile(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 2)


def synthetic_run(work: Path, rows: int, backbone: str, dim: int = 128) -> Path:
    """A RUN whose saved index holds ``rows`` synthetic unit vectors, searched with ``backbone``'s untrained
    network (seed 0, 32 px): a tiny prepared DATA (which only the query ids and image lookups read), the
    model's ``source.json`` and test embeddings, and ``RUN/eval/index.*`` as ``jobs.evaluate`` writes them."""
    import faiss
    import pyarrow as pa
    from PIL import Image

    from lib.data.reader import PreparedData
    from lib.embedding import ModelSource, write_split
    from lib.io import write_json
    from lib.paths import RunPaths
    from lib.prepare import PrepareConfig
    from onray.prepare import prepare_data

    run = RunPaths.of(work / f"serve-run-{backbone}-{rows}")
    if (run.eval / "index.json").is_file():
        return run.root
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("test", 2)):
        for label in range(10):
            folder = work / "serve-images" / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    data = PreparedData.open(prepare_data(PrepareConfig(source=f"imagefolder:{work / 'serve-images'}",
                                                        data_dir=str(work / "serve-data"))))
    model = f"{backbone}-untrained"
    source = ModelSource(model, backbone, "none", dim, 32)
    run.embeddings(model).mkdir(parents=True, exist_ok=True)
    write_json(run.embeddings(model) / "source.json", source.identity(data.fingerprint()))
    test_ids, test_labels = data.ids_and_labels("test")
    vectors, labels, centres = class_structured_unit_vectors(rows, dim, seed=1)
    test_vectors, _, _ = class_structured_unit_vectors(len(test_ids), dim, seed=2, centres=centres)
    write_split(run.embeddings(model) / "test.parquet", test_ids, test_labels, test_vectors)
    index = faiss.IndexFlatIP(dim)
    index.add(vectors)
    run.eval.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(run.eval / "index.faiss"))
    write_parquet(pa.table({"id": [f"train/synthetic/{i:05d}" for i in range(rows)],
                             "label": pa.array(labels, pa.int64())}), run.eval / "index_rows.parquet")
    write_json(run.eval / "index.json", {"model": model, "rows": rows, "dim": dim, "split": "train",
                                         "synthetic": True, "data_dir": str(data.root), "classes": data.classes,
                                         "image_shape": list(data.image_shape),
                                         "source": source.identity(data.fingerprint())})
    return run.root


def query_png(seed: int = 3) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def measure(run_dir: str, clients: int = 8, k: int = 5) -> dict:
    from ray import serve

    from onray.runtime import free_local_port, init_ray
    from onray.serve import GallerySettings, start_gallery

    init_ray()
    port = free_local_port()
    started = time.perf_counter()
    start_gallery(GallerySettings(run_dir), "127.0.0.1", port, name="benchmark-gallery")
    results: dict = {"run": run_dir, "startup_s": round(time.perf_counter() - started, 1), "clients": clients, "k": k}
    body = upload_body(query_png(), k)
    try:
        single = Client(port, body)
        for _ in range(WARMUP_QUERIES):
            single.query()
        timed, deadline = [], time.perf_counter() + 60
        while len(timed) < LATENCY_QUERIES and time.perf_counter() < deadline:
            timed.append(single.query())
        round_trips, replica = [t[0] for t in timed], [t[1] for t in timed]
        results["latency"] = {"queries": len(timed), "p50_ms": percentile(round_trips, 50),
                              "p99_ms": percentile(round_trips, 99), "mean_ms": round(statistics.mean(round_trips), 2),
                              "replica_p50_ms": percentile(replica, 50)}
        results["throughput"] = _throughput(port, body, clients)
    finally:
        serve.delete("benchmark-gallery")
    results["goals_met"] = (results["latency"]["p50_ms"] <= 50 and results["latency"]["p99_ms"] <= 200
                            and results["throughput"]["queries_per_s"] >= 50)
    return results


def _throughput(port: int, body: bytes, clients: int) -> dict:
    """``clients`` threads, each with its own connection, querying back to back until the time or count bound."""
    lock, timed = threading.Lock(), []
    for client in (connections := [Client(port, body) for _ in range(clients)]):
        client.query()  # each connection opened and warm before the clock starts
    stop_at = time.perf_counter() + THROUGHPUT_SECONDS

    def loop(client: Client) -> None:
        while time.perf_counter() < stop_at:
            answer = client.query()
            with lock:
                timed.append(answer)
                if len(timed) >= THROUGHPUT_MAX_QUERIES:
                    return

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(loop, connections))
    elapsed = time.perf_counter() - started
    round_trips = [t[0] for t in timed]
    return {"queries": len(timed), "seconds": round(elapsed, 2), "queries_per_s": round(len(timed) / elapsed, 1),
            "p50_ms": percentile(round_trips, 50), "p99_ms": percentile(round_trips, 99),
            "mean_batch": round(statistics.mean(t[2] for t in timed), 2)}


def run(cfg: BenchmarkConfig, work: Path) -> dict:
    run_dir = cfg.serve_run or str(synthetic_run(work, cfg.serve_gallery, cfg.backbone))
    return measure(run_dir, clients=cfg.serve_clients)


def summary(r: dict) -> str:
    latency, load = r["latency"], r["throughput"]
    return (f"warm query p50 {latency['p50_ms']} ms, p99 {latency['p99_ms']} ms (replica p50 "
            f"{latency['replica_p50_ms']} ms); {r['clients']} clients {load['queries_per_s']} queries/s "
            f"(p50 {load['p50_ms']} ms, mean batch {load['mean_batch']}); goals "
            f"{'met' if r['goals_met'] else 'NOT met'}")
