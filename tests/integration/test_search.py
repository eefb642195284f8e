"""jobs.search on the index jobs.evaluate saved: test ids and image files, and bad input."""

import contextlib
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from jobs import search
from lib.embedding import read_embeddings
from lib.paths import RunPaths
from lib.retrieval.index import knn, l2_normalize
from lib.search import Searcher
from tests.conftest import image_array
from tests.integration.test_evaluate import BACKBONES, evaluated_run, run_evaluate

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    return evaluated_run(tmp_path_factory)


def run_search(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = search.cli(list(argv))
    return code, out.getvalue(), [line for line in err.getvalue().splitlines() if not line.startswith("[")]


def test_search_by_test_ids_and_by_image_file(evaluated, tmp_path):
    _, run, _ = evaluated
    code, out, errors = run_search("--run-dir", str(run), "--test-ids", "test/dog/0001.png,test/frog/0002.png",
                                   "--k", "3", "--out", str(tmp_path / "ids.png"))
    assert code == 0 and errors == []
    lines = out.splitlines()
    assert lines[0].startswith("query test/dog/0001.png (dog), model ") and len(lines) == 2 * 4
    neighbours = [line.split() for line in lines if line.startswith("  ")]
    assert all(row[1].startswith("train/") and row[3] == "similarity" for row in neighbours)
    assert [row[2] for row in neighbours[:3]] == ["dog"] * 3 and [row[2] for row in neighbours[3:]] == ["frog"] * 3
    assert Image.open(tmp_path / "ids.png").size[0] > 200

    # a new file of another size, in a folder named after its class: decoded, resized, embedded like training
    (tmp_path / "cat").mkdir()
    Image.fromarray(image_array("cat", 77, size=(45, 40))).save(tmp_path / "cat" / "new.png")
    code, out, errors = run_search("--run-dir", str(run), "--images", str(tmp_path / "cat" / "new.png"),
                                   "--k", "4", "--model", "vgg16-untrained", "--out", str(tmp_path / "img.png"))
    assert code == 0 and errors == []
    assert "(cat), model vgg16-untrained" in out.splitlines()[0]
    assert [line.split()[2] for line in out.splitlines()[1:]] == ["cat"] * 4
    assert (tmp_path / "img.png").is_file()


def test_bad_search_input_is_one_line_and_exit_2(evaluated, tmp_path):
    _, run, _ = evaluated
    (tmp_path / "broken.png").write_bytes(b"not an image")
    cases = [
        (["--run-dir", str(tmp_path), "--test-ids", "test/dog/0001.png"], "no saved index"),
        (["--run-dir", str(run), "--test-ids", "test/dog/9999.png"], "unknown test id 'test/dog/9999.png'"),
        (["--run-dir", str(run), "--images", str(tmp_path / "broken.png")], "cannot read image"),
        (["--run-dir", str(run), "--images", str(tmp_path / "missing.png")], "image file not found"),
        (["--run-dir", str(run), "--test-ids", "test/dog/0001.png", "--model", "nope"], "unknown model 'nope'"),
        (["--run-dir", str(run)], "give one of --images, --test-ids or --stdin"),
        (["--run-dir", str(run), "--stdin", "--test-ids", "test/dog/0001.png"], "give one of"),
    ]
    for argv, message in cases:
        code, _, errors = run_search(*argv)
        assert code == 2 and len(errors) == 1 and message in errors[0], (argv, errors)


def test_stdin_answers_query_after_query_with_the_model_kept_loaded(evaluated, tmp_path, monkeypatch):
    _, run, _ = evaluated
    (tmp_path / "frog").mkdir()
    Image.fromarray(image_array("frog", 5)).save(tmp_path / "frog" / "mine.png")
    lines = ["test/dog/0001.png", "test/dog/9999.png", "", str(tmp_path / "frog" / "mine.png"), "test/cat/0000.png"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = search.cli(["--run-dir", str(run), "--stdin", "--k", "2", "--model", "vgg16-untrained"])
    assert code == 0
    printed = out.getvalue().splitlines()
    queries = [line for line in printed if line.startswith("query ")]
    assert [q.split()[1] for q in queries] == ["test/dog/0001.png", str(tmp_path / "frog" / "mine.png"),
                                              "test/cat/0000.png"]
    assert [line for line in printed if line.startswith("error: ")] == [
        "error: unknown test id 'test/dog/9999.png' (ids look like 'test/cat/0000.png'; see embeddings.csv)"]
    assert len([line for line in printed if line.startswith("  ")]) == 3 * 2
    assert err.getvalue().count("answered ") == 3  # each with its time in ms


def test_an_hnsw_index_chosen_with_index_answers_every_test_query_like_exact_search(evaluated, tmp_path):
    data, run, _ = evaluated
    shutil.copytree(run, tmp_path / "run")  # the embeddings are reused: only the scoring and the index are redone
    run = tmp_path / "run"
    code, errors, log = run_evaluate("--data-dir", str(data), "--run-dir", str(run), "--backbones", BACKBONES,
                                     "--weights", "none", "--tsne-points", "20", "--grid-queries", "4",
                                     "--grid-k", "5", "--index", "hnsw")
    assert code == 0 and errors == [], log
    info = json.loads((run / "eval" / "index.json").read_text())
    assert (info["type"], info["chosen_by"], info["parameters"]["M"]) == ("hnsw", "hnsw", 32)
    assert info["bytes"] == (run / "eval" / "index.faiss").stat().st_size and info["build_s"] > 0
    assert info["recall@5"] == 1.0 and "test queries" in info["recall_queries"]  # a tiny gallery: the graph is exact
    assert Searcher(RunPaths.of(run)).gallery.kind == "hnsw"

    model = info["model"]
    train, test = read_embeddings(run, model, "train"), read_embeddings(run, model, "test")
    _, exact = knn(l2_normalize(test.vectors), l2_normalize(train.vectors), 5, use_gpu=False)
    code, out, errors = run_search("--run-dir", str(run), "--test-ids", ",".join(map(str, test.ids)), "--k", "5",
                                   "--out", str(tmp_path / "grid.png"))
    assert code == 0 and errors == []
    printed = [line.split()[1] for line in out.splitlines() if line.startswith("  ")]
    assert printed == [str(train.ids[row]) for row in np.ravel(exact)]
