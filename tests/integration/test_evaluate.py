"""jobs.evaluate end to end on a local Ray: untrained networks embedded on Ray Data, every report file."""

import contextlib
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from jobs import evaluate, prepare
from lib.backbones import build_model
from lib.config import to_dict
from lib.data.reader import SPLITS, PreparedData, read_manifest
from lib.devices import available_cpus
from lib.embedding import model_sources
from lib.errors import UserError
from lib.io import write_json
from lib.planning import MAX_CPU_ACTORS_PER_NODE, cpu_actors_per_node
from lib.training import TrainConfig
from onray.plan import actor_plan
from tests.conftest import CLASSES, make_image_folder

pytestmark = pytest.mark.usefixtures("ray_session")

BACKBONES = "resnet50,vgg16"
MODELS = ("resnet50-untrained", "vgg16-untrained", "stacked")
_SHARED: dict = {}
PLANTED = 3  # test images of the first class that are copies of its train images 0-2


def run_evaluate(*argv):
    """(exit code, stderr lines that are not progress lines, stderr + stdout) of ``jobs.evaluate``."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = evaluate.cli(list(argv))
    lines = err.getvalue().splitlines()
    return code, [line for line in lines if line and not line.startswith("[")], err.getvalue() + out.getvalue()


def evaluated_run(tmp_path_factory):
    """Tiny data prepared by the real jobs.prepare, evaluated once per session with untrained resnet50 and vgg16
    (shared with test_search.py): returns (DATA, RUN, stderr of the run)."""
    if not _SHARED:
        root = tmp_path_factory.mktemp("evaluate")
        folder = make_image_folder(root / "images", train_per_class=12, test_per_class=8)
        for i in range(PLANTED):  # test images that are train images, brightened: near-duplicates across splits
            pixels = np.asarray(Image.open(folder / "train" / CLASSES[0] / f"{i:04d}.png"), dtype=np.int16)
            Image.fromarray(np.clip(pixels + 20, 0, 255).astype(np.uint8)).save(
                folder / "test" / CLASSES[0] / f"{i:04d}.png")
        data = prepare.main(prepare.PrepareConfig(source=f"imagefolder:{folder}", data_dir=str(root / "data")))
        code, errors, log = run_evaluate("--data-dir", str(data), "--run-dir", str(root / "run"),
                                         "--backbones", BACKBONES, "--weights", "none", "--tsne-points", "20",
                                         "--grid-queries", "4", "--grid-k", "5")
        assert code == 0 and errors == [], log
        _SHARED.update(data=data, run=root / "run", log=log)
    return _SHARED["data"], _SHARED["run"], _SHARED["log"]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    return evaluated_run(tmp_path_factory)


def distinct_colours(path) -> int:
    return len(Image.open(path).convert("RGB").getcolors(maxcolors=1 << 22) or [])


def test_every_output_file_and_metric_key(evaluated):
    data, run, log = evaluated
    out = run / "eval"
    for name in evaluate.OUTPUTS + ("metrics.json",):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not list(out.glob(".*"))  # no temporary file left behind
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"models", "clusters", "config"}
    assert list(metrics["models"]) == list(MODELS) and list(metrics["clusters"]) == list(MODELS)
    for name in MODELS:
        entry = metrics["models"][name]
        for protocol in ("L", "G"):
            for key in ("map@5", "p@5", "p@1", "map@r", "recall@5", "knn_acc"):
                assert 0.0 <= entry[protocol][key] <= 1.0, (name, protocol, key)
        for key in ("train_acc", "test_acc", "knn_acc"):
            assert 0.0 <= entry[key] <= 1.0
        assert entry["knn_acc"] == entry["G"]["knn_acc"]
        assert set(metrics["clusters"][name]) == {"nmi", "ari", "purity"}
        assert 1 / len(CLASSES) <= metrics["clusters"][name]["purity"] <= 1.0
    # the classes are solid colours plus noise: even untrained networks separate them well above chance
    assert metrics["models"]["resnet50-untrained"]["G"]["p@5"] > 0.6
    stacking = metrics["models"]["stacked"]["stacking_classifier"]
    assert 0.0 <= stacking["train_acc"] <= 1.0 and 0.0 <= stacking["test_acc"] <= 1.0
    assert metrics["models"]["stacked"]["stacked_from"] == ["resnet50-untrained", "vgg16-untrained"]
    assert metrics["config"]["backbones"] == ["resnet50", "vgg16"] and metrics["config"]["weights"] == "none"
    assert set(metrics["config"]["sources"]) == {"resnet50-untrained", "vgg16-untrained"}

    table = (out / "results.md").read_text()
    for name in MODELS:
        assert sum(line.startswith(f"| {name} |") for line in table.splitlines()) == 1
    assert "leave-one-out" in table and "weights none" in table and "Stacking classifier" in table
    assert "| resnet50-untrained |" in log and "nothing to do" not in log  # the table is printed too

    for png, least in (("tsne.png", 5), ("clusters.png", 8), ("retrieval_grid.png", 50)):
        assert distinct_colours(out / png) >= least, png
    grid = Image.open(out / "retrieval_grid.png")
    assert grid.size[0] > 400 and grid.size[1] > 300

    header, *rows = (out / "embeddings.csv").read_text().splitlines()
    assert header.split(",")[:4] == ["id", "label", "model", "e0"] and header.split(",")[-1] == "e127"
    test_rows = read_manifest(data)["totals"]["test"]
    assert len(rows) == 3 * test_rows and {row.split(",")[2] for row in rows} == set(MODELS)

    index = json.loads((out / "index.json").read_text())
    assert index["model"] in MODELS[:2] and index["rows"] == read_manifest(data)["totals"]["train"]
    assert pq.read_table(out / "index_rows.parquet").num_rows == index["rows"]


def test_embeddings_parquet_schema_rows_and_ids_line_up(evaluated):
    data, run, _ = evaluated
    totals = read_manifest(data)["totals"]
    ids = {}
    for name in MODELS:
        for split in SPLITS:
            table = pq.read_table(run / "embeddings" / name / f"{split}.parquet")
            assert table.schema.field("id").type == pa.string()
            assert table.schema.field("label").type == pa.int64()
            vector_type = table.schema.field("embedding").type
            assert pa.types.is_fixed_size_list(vector_type) and vector_type.value_type == pa.float32()
            assert vector_type.list_size == (128 if name != "stacked" else len(CLASSES) - 1)
            assert table.num_rows == totals[split]
            row_ids = table.column("id").to_pylist()
            assert row_ids == sorted(row_ids)
            ids.setdefault(split, row_ids)
            assert row_ids == ids[split], (name, split)
            vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
            assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert all(i.startswith("test/") for i in ids["test"])
    source = json.loads((run / "embeddings" / "vgg16-untrained" / "source.json").read_text())["model"]
    assert source["weights"] == "none" and source["backbone"] == "vgg16" and source["image_size"] == 32


def test_untrained_embeddings_are_reproducible(evaluated):
    """``--weights none`` is a seeded network: the same seed gives the stored embeddings again."""
    data, run, _ = evaluated
    from lib.data.reader import PreparedData
    from lib.embedding import ModelSource, embed_loop, load_embedding_model, read_embeddings

    stored = read_embeddings(run, "vgg16-untrained", "test")
    ids = stored.ids
    source = ModelSource("vgg16-untrained", "vgg16", "none", 128, 32, seed=0)
    again = embed_loop(source, load_embedding_model(source), PreparedData.open(data).images_by_id("test", list(ids[:4])),
                       batch_size=4)
    assert np.allclose(again, stored.vectors[:4], atol=1e-5)


def test_rerun_does_no_work_and_a_changed_flag_reuses_the_embeddings(evaluated):
    data, run, _ = evaluated
    args = ["--data-dir", str(data), "--run-dir", str(run), "--backbones", BACKBONES, "--weights", "none",
            "--tsne-points", "20", "--grid-queries", "4", "--grid-k", "5"]
    def files():  # folders are left out: the writability check touches RUN/eval's mtime
        return {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}

    before = files()
    code, errors, log = run_evaluate(*args)
    assert code == 0 and errors == [] and "nothing to do" in log and "| stacked |" in log
    assert files() == before

    code, errors, log = run_evaluate(*args, "--csv-rows", "5")
    assert code == 0 and errors == [], log
    assert "resnet50-untrained: embeddings up to date" in log and "vgg16-untrained: embeddings up to date" in log
    for name in ("resnet50-untrained", "vgg16-untrained"):
        for split in SPLITS:
            path = run / "embeddings" / name / f"{split}.parquet"
            assert path.stat().st_mtime_ns == before[path]
    assert len((run / "eval" / "embeddings.csv").read_text().splitlines()) == 1 + 5 * len(MODELS)
    assert json.loads((run / "eval" / "metrics.json").read_text())["config"]["csv_rows"] == 5


def test_bad_inputs_end_with_one_line_and_exit_2(evaluated, tmp_path):
    data, _, _ = evaluated
    code, errors, _ = run_evaluate("--data-dir", str(data), "--run-dir", str(tmp_path / "empty"))
    assert code == 2 and len(errors) == 1
    assert "no trained models in" in errors[0] and "--backbones" in errors[0]
    code, errors, _ = run_evaluate("--data-dir", str(data), "--run-dir", str(tmp_path / "x"), "--backbones", "alexnet")
    assert code == 2 and len(errors) == 1 and "unknown backbone(s) alexnet" in errors[0]
    code, errors, _ = run_evaluate("--data-dir", str(tmp_path / "nodata"), "--run-dir", str(tmp_path / "x"),
                                   "--backbones", "vgg16")
    assert code == 2 and len(errors) == 1 and "not a prepared data set" in errors[0]
    assert not (tmp_path / "x" / "eval" / "metrics.json").exists()


def test_trained_models_are_found_with_their_config_and_untrained_companions(tmp_path):
    """RUN/models/<b>/ with summary.json: the trained model.pt, its config's size, and ``-untrained`` on request."""
    folder = tmp_path / "run" / "models" / "vgg16"
    folder.mkdir(parents=True)
    torch.manual_seed(1)
    torch.save(build_model("vgg16", "none", 16).state_dict(), folder / "model.pt")
    write_json(folder / "config.json", to_dict(TrainConfig(data_dir="DATA", run_dir=str(tmp_path / "run"),
                                                           backbones=("vgg16",), weights="none", embedding_dim=16,
                                                           image_size=48, seed=3)))
    (tmp_path / "run" / "models" / "resnet50").mkdir()  # unfinished: no summary.json
    with pytest.raises(UserError, match="no trained models"):  # no summary.json yet: not complete
        model_sources(tmp_path / "run", (), False, "none", 128, 32, 0)
    write_json(folder / "summary.json", {"backbone": "vgg16"})
    sources = model_sources(tmp_path / "run", (), True, "none", 128, 32, 0)
    assert [(s.name, s.trained, s.baseline) for s in sources] == [("vgg16", True, False),
                                                                   ("vgg16-untrained", False, True)]
    trained, untrained = sources
    assert trained.weights == str(folder / "model.pt") and len(trained.checkpoint_sha256) == 64
    assert (trained.embedding_dim, trained.image_size) == (16, 48) and untrained.seed == 3
    assert untrained.weights == "none" and untrained.image_size == 48
    mixed = model_sources(tmp_path / "run", ("vgg16", "resnet50"), False, "none", 128, 32, 0)
    assert [(s.name, s.trained) for s in mixed] == [("vgg16", True), ("resnet50-untrained", False)]


@pytest.mark.parametrize(("node_cpus", "cores", "expected"), [
    (4, 2, 2),     # a local Ray on 2 cores advertises 4 logical CPUs: one actor per real core
    (2, None, 2),  # a cluster node, cores unknown: its Ray CPUs
    (4, 1, 1),
    (16, 16, MAX_CPU_ACTORS_PER_NODE),  # past the cap, actors share the cores as torch threads
    (64, None, MAX_CPU_ACTORS_PER_NODE),
    (0, 0, 1),     # a node always gets one
])
def test_one_cpu_embedding_actor_per_core_up_to_the_cap(node_cpus, cores, expected):
    assert cpu_actors_per_node(node_cpus, cores) == expected


def test_the_local_ray_embeds_with_one_single_threaded_actor_per_core():
    plan = actor_plan("auto")  # the session Ray: 4 logical CPUs on this machine, no GPU
    cores = available_cpus()
    assert plan.on_gpu is False and plan.gpus_per_actor == 0
    assert plan.actors == min(cores, 4, MAX_CPU_ACTORS_PER_NODE) == plan.actors_per_node
    with pytest.raises(UserError, match="no GPUs"):
        actor_plan("true")


def test_test_images_copied_from_train_are_found_and_protocol_g_is_also_scored_without_them(evaluated):
    data, run, log = evaluated
    out = run / "eval"
    pairs = pq.read_table(out / "near_duplicates.parquet").to_pylist()
    in_train = {str(i) for i in PreparedData.open(data).ids_and_labels("train")[0]}  # val holds some out
    planted = {f"test/{CLASSES[0]}/{i:04d}.png": f"train/{CLASSES[0]}/{i:04d}.png" for i in range(PLANTED)}
    assert pairs, "no near-duplicate found"
    for pair in pairs:  # only planted copies, each matched to its original (those not held out as val)
        assert planted[pair["test_id"]] == pair["train_id"] and pair["similarity"] >= 0.95
        assert pair["test_label"] == pair["train_label"] == 0
    assert len(pairs) == sum(t in in_train for t in planted.values())
    metrics = json.loads((out / "metrics.json").read_text())
    for name in MODELS:
        clean = metrics["models"][name]["G_without_near_duplicates"]
        assert set(clean) >= {"map@5", "p@5", "map@r"} and 0.0 <= clean["map@5"] <= 1.0
    assert f"Near-duplicates: {len(pairs)} of {8 * len(CLASSES)} test images" in (out / "results.md").read_text()
