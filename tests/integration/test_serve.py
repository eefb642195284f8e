"""The run gallery on Ray Serve (jobs.serve): HTTP search against jobs.search's answers, bad requests, batching,
and the page in real headless Chromium. One Serve app on the session Ray for the whole module."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from PIL import Image

from jobs import search
from jobs import serve as serve_job
from tests.browser import Chromium, chromium_path
from tests.conftest import REPO, image_array
from tests.integration.test_evaluate import evaluated_run

pytestmark = pytest.mark.usefixtures("ray_session")
MAX_UPLOAD = 100_000  # bytes: small, so "too large" is cheap to send
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    from ray import serve

    from onray.runtime import free_local_port
    from onray.serve import GallerySettings, start_gallery

    _, run, _ = evaluated_run(tmp_path_factory)
    port = free_local_port()
    url = start_gallery(GallerySettings(str(run), max_upload_bytes=MAX_UPLOAD), "127.0.0.1", port)
    yield url, run, port
    serve.shutdown()


@pytest.fixture(scope="module")
def cat_file(tmp_path_factory) -> Path:
    """A new image of another size, in a folder named after its class (as test_search.py makes it)."""
    folder = tmp_path_factory.mktemp("upload") / "cat"
    folder.mkdir()
    Image.fromarray(image_array("cat", 77, size=(45, 40))).save(folder / "new.png")
    return folder / "new.png"


def post(url: str, k: int = 4, image: Path | bytes | None = None, field: str = "image", **fields) -> requests.Response:
    files = None
    if image is not None:
        content = image.read_bytes() if isinstance(image, Path) else image
        files = {field: ("query.png", content, "image/png")}
    return requests.post(url + "search", data={"k": str(k), **fields}, files=files, timeout=60)


def jobs_search_neighbours(*argv: str) -> list[list[tuple[str, str, float]]]:
    """(id, label, similarity) per neighbour per query, as jobs.search prints them."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert search.cli([*argv, "--out", os.devnull]) == 0
    queries: list[list[tuple[str, str, float]]] = []
    for line in out.getvalue().splitlines():
        if line.startswith("query "):
            queries.append([])
        else:
            _, row_id, label, _, similarity = line.split()
            queries[-1].append((row_id, label, float(similarity)))
    return queries


def answered(response: requests.Response) -> list[tuple[str, str, float]]:
    assert response.status_code == 200, response.text
    return [(n["id"], n["label"], n["similarity"]) for n in response.json()["neighbours"]]


def assert_same_neighbours(served, printed):
    assert [(i, label) for i, label, _ in served] == [(i, label) for i, label, _ in printed]
    assert all(abs(a - b) <= 1e-4 for (_, _, a), (_, _, b) in zip(served, printed, strict=True))


def test_http_answers_equal_jobs_search(service, cat_file):
    url, run, _ = service
    ids = ["test/dog/0001.png", "test/frog/0002.png"]
    printed = jobs_search_neighbours("--run-dir", str(run), "--test-ids", ",".join(ids), "--k", "4")
    for test_id, expected in zip(ids, printed, strict=True):
        response = post(url, id=test_id)
        assert_same_neighbours(answered(response), expected)
        assert response.json()["query"] == {"id": test_id, "label": test_id.split("/")[1]}
    # an uploaded file is decoded, resized and embedded like jobs.search --images does it, with another model
    printed = jobs_search_neighbours("--run-dir", str(run), "--images", str(cat_file), "--k", "4",
                                     "--model", "vgg16-untrained")
    response = post(url, image=cat_file, model="vgg16-untrained")
    assert_same_neighbours(answered(response), printed[0])
    assert response.json()["model"] == "vgg16-untrained" and response.json()["query"]["label"] is None
    assert [label for _, label, _ in printed[0]] == ["cat"] * 4


def test_a_train_image_is_searched_without_itself(service):
    url, _, _ = service
    train_id = answered(post(url, k=1, id="test/frog/0002.png"))[0][0]
    neighbours = answered(post(url, k=3, id=train_id))
    assert len(neighbours) == 3 and train_id not in [i for i, _, _ in neighbours]
    assert [label for _, label, _ in neighbours] == ["frog"] * 3


def test_bad_requests_get_a_4xx_with_one_line_and_the_replica_keeps_answering(service, cat_file):
    url, _, _ = service
    good = answered(post(url, id="test/cat/0000.png"))
    cases = [
        (post(url, image=b"this is not an image"), 400, "not an image"),
        (post(url, image=b"\x89PNG\r\n\x1a\n" + b"\0" * (MAX_UPLOAD + 10)), 413, "more than the limit"),
        (post(url, image=cat_file, field="picture"), 400, "unknown form field 'picture'"),
        (post(url, k=0, id="test/cat/0000.png"), 400, "k must be between 1 and 100"),
        (post(url, k="many", id="test/cat/0000.png"), 400, "k must be a whole number"),
        (post(url), 400, "send one of the form fields image"),
        (post(url, image=cat_file, id="test/cat/0000.png"), 400, "send one of the form fields image"),
        (post(url, id="test/cat/9999.png"), 400, "unknown test id"),
        (post(url, id="test/cat/0000.png", model="nope"), 400, "unknown model 'nope'"),
        (post(url, image=cat_file, model="stacked"), 400, "cannot embed new images"),
        (requests.get(url + "image/train/cat/9999.png", timeout=30), 404, "no image with id"),
        (requests.get(url + "figure/index.faiss", timeout=30), 404, "no figure"),
        (requests.post(url + "api/map", timeout=30), 405, "POST /api/map is not served"),
        (requests.get(url + "figure/..%2Fmetrics.json", timeout=30), 404, "no figure"),  # no way out of RUN/eval
        (requests.get(url + "search", timeout=30), 404, "nothing at /search"),
        (requests.get(url + "docs", timeout=30), 404, "nothing at /docs"),  # only the URLs of onray.serve's doc
        (requests.put(url + "search", timeout=30), 405, "PUT /search is not served"),
        (requests.post(url + "image/train/cat/0000.png", timeout=30), 405, "POST /image/train/cat/0000.png is not"),
    ]
    for response, status, reason in cases:
        assert response.status_code == status, (reason, response.status_code, response.text)
        error = response.json()["error"]
        assert reason in error and "\n" not in error, (reason, error)
    assert answered(post(url, id="test/cat/0000.png")) == good
    assert requests.head(url + "api/run", timeout=30).status_code == 200  # HEAD wherever GET is


def test_concurrent_queries_share_batches_and_get_their_own_answers(service):
    url, run, _ = service
    ids = [f"test/{name}/{i:04d}.png" for name in ("cat", "dog", "frog") for i in range(8)]
    alone = {test_id: answered(post(url, k=3, id=test_id)) for test_id in ids}
    with ThreadPoolExecutor(len(ids)) as pool:
        responses = list(pool.map(lambda test_id: post(url, k=3, id=test_id), ids))
    for test_id, response in zip(ids, responses, strict=True):
        assert_same_neighbours(answered(response), alone[test_id])
    assert max(r.json()["batch"] for r in responses) > 1


def test_stored_images_figures_and_run_overview(service):
    url, run, _ = service
    png = requests.get(url + "image/train/dog/0002.png", timeout=30)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size == (32, 32)
    overview = requests.get(url + "api/run", timeout=30).json()
    assert overview["default_model"] == json.loads((run / "eval" / "index.json").read_text())["model"]
    assert overview["models"] == {"resnet50-untrained": True, "stacked": False, "vgg16-untrained": True}
    assert set(overview["figures"]) == {"tsne.png", "clusters.png", "retrieval_grid.png"}
    assert len(overview["queries"]) == 12 and all(q.startswith("test/") for q in overview["queries"])
    figure = requests.get(url + "figure/tsne.png", timeout=30)
    assert figure.content == (run / "eval" / "tsne.png").read_bytes()
    page = requests.get(url, timeout=30)
    assert page.status_code == 200 and "/page/app.js" in page.text
    for name in ("index.html", "app.js", "map.js", "style.css"):  # self-contained: nothing fetched from elsewhere
        text = (Path(__file__).parents[2] / "onray" / "page" / name).read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, name


def test_listens_on_loopback_only(service):
    import psutil

    _, _, port = service
    listening = {c.laddr.ip for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port}
    assert listening == {"127.0.0.1"}


def test_serve_job_bad_input_is_one_line_and_exit_2(service, tmp_path, capsys):
    _, run, port = service
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        cases = [
            (["--run-dir", str(tmp_path)], "no saved index"),
            (["--run-dir", str(run), "--port", "70000"], "--port must be between 1 and 65535"),
            (["--run-dir", str(run), "--port", str(taken.getsockname()[1])], "pick another --port"),
        ]
        for argv, message in cases:
            assert serve_job.cli(argv) == 2
            err = capsys.readouterr().err
            assert message in err and err.count("\n") == 1, err


def test_the_job_starts_its_own_ray_serves_and_stops_on_sigterm(service, tmp_path):
    """``python -m jobs.serve`` as a person runs it: its own local Ray, the same answers, one line on ``kill``."""
    from onray.runtime import free_local_port

    url, run, _ = service
    port, log = free_local_port(), tmp_path / "serve.log"
    with open(log, "w") as output:  # a file, not a pipe: Ray's log lines must never fill a pipe and stall the job
        job = subprocess.Popen([sys.executable, "-m", "jobs.serve", "--run-dir", str(run), "--port", str(port)],
                               cwd=REPO, stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline, answer = time.monotonic() + 150, None
        while answer is None or answer.status_code != 200:
            assert job.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
            with contextlib.suppress(requests.ConnectionError):
                answer = post(f"http://127.0.0.1:{port}/", k=3, id="test/dog/0001.png")
        assert answered(answer) == answered(post(url, k=3, id="test/dog/0001.png"))
        listening = listening_sockets(job.pid)
        assert any("ServeReplica" in name for name, _, _ in listening), listening  # the replica was seen
        assert {"gcs_server", "raylet"} <= {name for name, _, _ in listening}, listening
        exposed = [entry for entry in listening if entry[1] not in LOOPBACK]
        assert not exposed, exposed  # Serve's proxy, its replica's gRPC server and all of Ray: 127.0.0.1 only
        job.send_signal(signal.SIGTERM)
        job.wait(timeout=60)
        assert job.returncode == 130 and "jobs.serve: interrupted" in log.read_text(), log.read_text()[-3000:]
        # the terminal shows the job's own lines only (Ray's and Serve's INFO lines go to its log file)
        stray = [line for line in log.read_text().splitlines() if line.strip() and not line.startswith("[")
                 and not line.startswith("jobs.serve: ")]
        assert not stray, stray
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()


def listening_sockets(pid: int) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket of ``pid`` and all its descendants: a job's
    local Ray (GCS, raylet, agents, workers, Serve's controller, proxy and replicas) descends from the job."""
    import psutil

    found = []
    parent = psutil.Process(pid)
    for proc in [parent, *parent.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            found += [(proc.name(), c.laddr.ip, c.laddr.port) for c in proc.net_connections(kind="inet")
                      if c.status == psutil.CONN_LISTEN]
    return found


def test_serve_run_builder_takes_the_run_and_refuses_unknown_arguments(service):
    from ray.serve import Application

    from lib.errors import UserError
    from onray.serve import build_app

    _, run, _ = service
    assert isinstance(build_app({"run_dir": str(run), "max_batch_size": "4"}), Application)
    with pytest.raises(UserError, match="got colour"):
        build_app({"run_dir": str(run), "colour": "red"})


@pytest.mark.skipif(chromium_path() is None and not os.environ.get("CI"),
                    reason="no chromium (apt-get install chromium; .ci/run installs it, and in CI this test runs)")
def test_the_page_in_headless_chromium_searches_from_a_clicked_image_a_map_point_and_an_upload(service, cat_file,
                                                                                             tmp_path):
    url, run, _ = service
    browser = Chromium(tmp_path / "profile", width=1400, height=1000)
    try:
        browser.open(url)
        browser.wait_for("document.body.dataset.ready === 'true'", timeout=60)
        assert browser.evaluate("[innerWidth, innerHeight]") == [1400, 1000]
        browser.wait_for("[...document.querySelectorAll('#figures img')].every(i => i.complete && i.naturalWidth > 100)")
        # at 1400 x 1000: two columns side by side, the results, map and pictures in view without scrolling
        left, right = browser.evaluate("[...document.querySelectorAll('main > .column')].map(c => {"
                                       "const r = c.getBoundingClientRect(); return [r.left, r.right, r.top]; })")
        assert left[1] <= right[0] and right[0] > 600 and abs(left[2] - right[2]) < 1, (left, right)
        for selector in ("#results table", "#map-box", "#figures img"):
            top, bottom = browser.evaluate(f"(r => [r.top, r.bottom])(document.querySelector('{selector}')"
                                           ".getBoundingClientRect())")
            assert 0 < top < 1000 and bottom > top, (selector, top, bottom)
        assert browser.evaluate("document.documentElement.scrollWidth") <= 1400  # nothing sticks out sideways
        assert browser.evaluate("[...document.querySelectorAll('#grid .result-row')]"
                                ".every(r => r.getBoundingClientRect().right <= r.parentNode.getBoundingClientRect().right + 1)")

        overview = requests.get(url + "api/run", timeout=30).json()
        rows = browser.evaluate("[...document.querySelectorAll('#grid .result-row')].map(r => r.dataset.query)")
        assert rows == overview["queries"]
        assert {row.split("/")[1] for row in rows} == set(overview["classes"])  # every class has a query row
        # every neighbour of the grid is marked by the API's own labels: wrong = another class than the query's
        first = answered(post(url, k=8, id=rows[0]))
        shown = browser.evaluate("[...document.querySelectorAll('#grid .result-row')[0].querySelectorAll("
                                 "'.neighbour img')].map(i => [i.dataset.id, i.parentNode.classList.contains('wrong')])")
        assert shown == [[i, label != rows[0].split("/")[1]] for i, label, _ in first]
        assert browser.evaluate("document.querySelectorAll('#results tbody tr').length") == 3

        # the map: every point of RUN/eval/map.json drawn; hovering one shows its image, clicking searches from it
        served_map = requests.get(url + "api/map", timeout=30).json()
        assert served_map == json.loads((run / "eval" / "map.json").read_text())
        assert browser.wait_for("document.getElementById('map-box').dataset.points") == str(len(served_map["id"])) == "20"
        spots = browser.evaluate("embeddingMap.data.id.map(id => mapPoint(id))")
        spacing = [min(math.dist((a["x"], a["y"]), (b["x"], b["y"])) for j, b in enumerate(spots) if j != i)
                   for i, a in enumerate(spots)]
        point = spacing.index(max(spacing))  # the point farthest from its neighbours: no other one is nearer
        point_id, spot = served_map["id"][point], spots[point]
        browser.mouse("move", spot["x"] + 2, spot["y"] - 1)
        tip = browser.wait_for(f"(t => !t.hidden && t.dataset.id === '{point_id}' && t.querySelector('img').naturalWidth"
                               " && [t.querySelector('img').naturalWidth, t.textContent])(document.getElementById('map-tip'))")
        label = served_map["classes"][served_map["label"][point]]
        assert tip == [32, f"{label}, cluster {served_map['cluster'][point]}"]
        browser.mouse("click", spot["x"] + 2, spot["y"] - 1)
        browser.wait_for(f"document.getElementById('search-result').dataset.query === '{point_id}'")
        found = browser.evaluate("[...document.querySelectorAll('#search-result .neighbour img')].map(i => i.dataset.id)")
        assert found == [i for i, _, _ in answered(post(url, k=8, id=point_id))]
        legend = "[...document.querySelectorAll('#map-legend .legend-entry')].map(e => e.textContent)"
        assert browser.evaluate(legend) == [f"{name} ({served_map['label'].count(c)})"
                                            for c, name in enumerate(served_map["classes"])]
        browser.evaluate("(s => { s.value = 'cluster'; s.dispatchEvent(new Event('change')); })"
                         "(document.getElementById('map-colour'))")
        assert browser.evaluate(legend) == [f"cluster {c} ({served_map['cluster'].count(c)})"
                                            for c in range(served_map["clusters"])]

        clicked = shown[2][0]  # a train image: search from it
        browser.evaluate(f"document.querySelector('#grid img[data-id=\"{clicked}\"]').click()")
        browser.wait_for(f"document.getElementById('search-result').dataset.query === '{clicked}'")
        found = browser.evaluate("[...document.querySelectorAll('#search-result .neighbour img')]"
                                 ".map(i => i.dataset.id)")
        assert found == [i for i, _, _ in answered(post(url, k=8, id=clicked))]

        browser.set_file("#upload", cat_file)
        browser.wait_for("document.getElementById('search-result').dataset.query === ''")
        labels = browser.evaluate("[...document.querySelectorAll('#search-result .neighbour .label')]"
                                  ".map(l => l.textContent)")
        assert labels == ["cat"] * 8
        shot = browser.screenshot(tmp_path / "gallery.png")
        assert Image.open(shot).size == (1400, 1000)
        if os.environ.get("GALLERY_SCREENSHOT"):
            shutil.copy(shot, os.environ["GALLERY_SCREENSHOT"])
    finally:
        browser.close()
