"""A damaged or foreign saved index (RUN/eval/index.faiss, index_rows.parquet, index.json) stops jobs.search
and jobs.serve with one line and exit 2, before any search and before Ray: the index is checked against its
rows file and the model (kind, count, dimension, labels) when it is loaded."""

import contextlib
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lib.paths import RunPaths
from lib.retrieval.index import faiss, l2_normalize
from lib.search import check_saved_gallery

ROWS, DIM, CLASSES = 6, 4, ["cat", "dog", "frog"]


def write_index(path, vectors, kind=faiss.IndexFlatIP):
    index = kind(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    faiss.write_index(index, str(path))


def write_rows(path, rows=ROWS, labels=None):
    labels = [i % len(CLASSES) for i in range(rows)] if labels is None else labels
    pq.write_table(pa.table({"id": [f"train/x/{i}.png" for i in range(rows)], "label": pa.array(labels, pa.int64())}),
                   path)


@pytest.fixture
def run(tmp_path):
    """A run folder holding what jobs.evaluate saves for a search: the index, its rows, index.json, and the
    model's stored test embeddings (whose dimension the index must match)."""
    paths = RunPaths.of(tmp_path / "run")
    paths.eval.mkdir(parents=True)
    vectors = l2_normalize(np.random.default_rng(0).normal(size=(ROWS, DIM)))
    write_index(paths.eval / "index.faiss", vectors)
    write_rows(paths.eval / "index_rows.parquet")
    (paths.eval / "index.json").write_text(json.dumps({
        "model": "resnet50", "rows": ROWS, "dim": DIM, "data_dir": str(tmp_path / "data"), "classes": CLASSES,
        "image_shape": [32, 32, 3]}))
    paths.embeddings("resnet50").mkdir(parents=True)
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors[:2].ravel()), DIM)
    pq.write_table(pa.table({"id": ["test/a", "test/b"], "label": pa.array([0, 1], pa.int64()),
                             "embedding": embedding}), paths.embeddings("resnet50") / "test.parquet")
    return paths


def damage(run, variant):
    """Apply one damage; returns the file the error line must name."""
    index, rows, info = run.eval / "index.faiss", run.eval / "index_rows.parquet", run.eval / "index.json"
    rng = np.random.default_rng(1)
    if variant == "random bytes":
        index.write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    elif variant == "truncated":
        index.write_bytes(index.read_bytes()[:-7])
    elif variant == "empty":
        index.write_bytes(b"")
    elif variant == "padded":
        index.write_bytes(index.read_bytes() + b"\0" * 16)
    elif variant == "another dimension":
        write_index(index, l2_normalize(rng.normal(size=(ROWS, 8))))
    elif variant == "more rows than the rows file":
        write_index(index, l2_normalize(rng.normal(size=(ROWS + 3, DIM))))
    elif variant == "a foreign 2-vector index":
        write_index(index, l2_normalize(rng.normal(size=(2, DIM))))
    elif variant == "an L2 index":
        write_index(index, l2_normalize(rng.normal(size=(ROWS, DIM))), faiss.IndexFlatL2)
    elif variant == "NaN vectors":
        write_index(index, np.full((ROWS, DIM), np.nan, np.float32))
    elif variant == "labels out of range":
        write_rows(rows, labels=[0, 1, 2, 3, 0, 1])
    elif variant == "negative labels":
        write_rows(rows, labels=[0, 1, 2, -1, 0, 1])
    elif variant == "a missing column":
        pq.write_table(pa.table({"id": [str(i) for i in range(ROWS)]}), rows)
    elif variant == "fewer rows in the rows file":
        write_rows(rows, rows=ROWS - 1)
    elif variant == "rows file of random bytes":
        rows.write_bytes(rng.integers(0, 256, 300, dtype=np.uint8).tobytes())
    elif variant == "rows file truncated":
        rows.write_bytes(rows.read_bytes()[:40])
    elif variant == "index.json of another dimension":
        info.write_text(info.read_text().replace(f'"dim": {DIM}', '"dim": 8'))
        return info
    elif variant == "index.json without classes":
        info.write_text(json.dumps({k: v for k, v in json.loads(info.read_text()).items() if k != "classes"}))
        return info
    else:
        raise AssertionError(variant)
    return rows if variant in ROWS_FILE_VARIANTS else index


ROWS_FILE_VARIANTS = {"labels out of range", "negative labels", "a missing column", "fewer rows in the rows file",
                      "rows file of random bytes", "rows file truncated"}


VARIANTS = ["random bytes", "truncated", "empty", "padded", "another dimension", "more rows than the rows file",
            "a foreign 2-vector index", "an L2 index", "NaN vectors", "labels out of range", "negative labels",
            "a missing column", "fewer rows in the rows file", "rows file of random bytes", "rows file truncated",
            "index.json of another dimension", "index.json without classes"]


def run_job(cli, *argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli(list(argv))
    return code, out.getvalue(), [line for line in err.getvalue().splitlines() if not line.startswith("[")]


def test_the_index_jobs_evaluate_saves_passes_the_checks(run):
    check_saved_gallery(run)


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_damaged_or_foreign_index_stops_jobs_search_with_one_line_naming_the_file(run, variant):
    from jobs import search

    named = damage(run, variant)
    code, out, errors = run_job(search.cli, "--run-dir", str(run.root), "--test-ids", "test/a")
    assert code == 2 and out == "" and len(errors) == 1, (code, out, errors)
    assert errors[0].startswith(f"jobs.search: error: {named} is not the index jobs.evaluate saved ("), errors
    assert "run jobs.evaluate on this run again" in errors[0]


@pytest.mark.parametrize("variant", ["random bytes", "a foreign 2-vector index", "labels out of range",
                                     "another dimension", "a missing column"])
def test_jobs_serve_refuses_to_start_on_a_damaged_index_before_ray(run, variant):
    from jobs import serve

    named = damage(run, variant)
    code, _, errors = run_job(serve.cli, "--run-dir", str(run.root), "--port", "1")  # port 1: never reached
    assert code == 2 and len(errors) == 1 and errors[0].startswith(f"jobs.serve: error: {named} is not the index")


def test_jobs_serve_checks_the_index_without_importing_ray(run):
    import subprocess
    import sys

    damage(run, "random bytes")
    probe = ("import sys; from jobs import serve; code = serve.cli(['--run-dir', sys.argv[1]]); "
             "assert 'ray' not in sys.modules, 'ray imported'; sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", probe, str(run.root)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [f"jobs.serve: error: {run.eval / 'index.faiss'} is not the index jobs.evaluate "
                                        f"saved (not a faiss exact inner-product index): run jobs.evaluate on this "
                                        f"run again"]


def test_a_query_image_of_100_megapixels_is_refused_from_its_header_without_a_warning(tmp_path, recwarn):
    from PIL import Image

    from lib.errors import UserError
    from lib.search import check_image_pixels

    Image.new("1", (10_000, 10_000)).save(tmp_path / "huge.png")  # 100 Mpx, a few kB: only the header is read
    with pytest.raises(UserError, match=r"huge.png is 10000x10000 pixels, more than the 40000000 a search decodes"):
        check_image_pixels(str(tmp_path / "huge.png"))
    Image.new("RGB", (40, 30)).save(tmp_path / "small.png")
    check_image_pixels(str(tmp_path / "small.png"))
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def save_as(run, kind):
    """Replace the run's saved index with one of ``kind`` (built as jobs.evaluate builds it), tuned to recall 1
    on the gallery itself, and describe it in index.json."""
    from lib.retrieval.approximate import build_tuned_index

    vectors = l2_normalize(np.random.default_rng(0).normal(size=(ROWS, DIM)))
    built = build_tuned_index(vectors, kind, vectors, vectors, target=1.0)
    faiss.write_index(built.index, str(run.eval / "index.faiss"))
    info = json.loads((run.eval / "index.json").read_text())
    (run.eval / "index.json").write_text(json.dumps({**info, "type": kind, "parameters": built.parameters,
                                                     "recall@5": built.recall}))
    return vectors


def hnsw_links_offset(path):
    """Where the links of a saved HNSW index begin (lib.retrieval.index_file's layout)."""
    data, at = path.read_bytes(), 4 + 33
    for item in (8, 4, 4, 8):  # level probabilities, neighbours per level, levels, offsets
        at += 8 + item * int(np.frombuffer(data, np.uint64, 1, at)[0])
    return at + 8


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_jobs_search_answers_from_an_approximate_index_like_exact_search_where_its_recall_is_1(run, kind):
    from lib.retrieval.approximate import search_full
    from lib.search import load_gallery, saved_index_info

    vectors = save_as(run, kind)
    info = saved_index_info(run)
    assert info["type"] == kind and info["recall@5"] == 1.0
    gallery = load_gallery(run, info, "resnet50")
    assert gallery.kind == kind and gallery.index.ntotal == ROWS
    found = search_full(gallery.index, kind, vectors, 3)[1]
    assert np.array_equal(found, knn_rows(vectors, 3))
    assert np.allclose(gallery.index.reconstruct(2), vectors[2])  # a train id's query vector


def knn_rows(vectors, k):
    from lib.retrieval.index import knn

    return knn(vectors, vectors, k, use_gpu=False)[1]


def damage_approximate(run, kind, variant):
    index, info_path = run.eval / "index.faiss", run.eval / "index.json"
    data = index.read_bytes()
    info = json.loads(info_path.read_text())
    if variant == "truncated":
        index.write_bytes(data[:-5])
    elif variant == "padded":
        index.write_bytes(data + b"\0" * 8)
    elif variant == "random bytes after the tag":
        index.write_bytes(data[:4] + np.random.default_rng(2).integers(0, 256, 400, dtype=np.uint8).tobytes())
    elif variant == "index.json names the other kind":
        other = {"ivf": ("hnsw", {"efSearch": 16}), "hnsw": ("ivf", {"nlist": 1, "nprobe": 1})}[kind]
        info_path.write_text(json.dumps({**info, "type": other[0], "parameters": other[1]}))
        return index
    elif variant == "a row listed twice":  # ivf: the file ends with the last cell's row ids
        index.write_bytes(data[:-8] + np.int64(0).tobytes())
    elif variant == "a link outside the gallery":  # hnsw
        at = hnsw_links_offset(index)
        index.write_bytes(data[:at] + np.int32(ROWS + 5).tobytes() + data[at + 4:])
    elif variant == "index.json without the search parameter":
        info_path.write_text(json.dumps({**info, "parameters": {}}))
        return info_path
    else:
        raise AssertionError(variant)
    return index


APPROXIMATE_DAMAGE = [(kind, variant) for kind in ("ivf", "hnsw")
                      for variant in ("truncated", "padded", "random bytes after the tag",
                                      "index.json names the other kind", "index.json without the search parameter")]
APPROXIMATE_DAMAGE += [("ivf", "a row listed twice"), ("hnsw", "a link outside the gallery")]


@pytest.mark.parametrize(("kind", "variant"), APPROXIMATE_DAMAGE)
def test_a_damaged_approximate_index_stops_jobs_search_with_one_line_naming_the_file(run, kind, variant):
    from jobs import search

    save_as(run, kind)
    named = damage_approximate(run, kind, variant)
    code, out, errors = run_job(search.cli, "--run-dir", str(run.root), "--test-ids", "test/a")
    assert code == 2 and out == "" and len(errors) == 1, (code, out, errors)
    assert errors[0].startswith(f"jobs.search: error: {named} is not the index jobs.evaluate saved ("), errors
