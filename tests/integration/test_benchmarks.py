"""The benchmark suites that need Ray (prepare, inputs, embed, serve), run through ``jobs.benchmark``'s real
``main`` on a tiny image folder: every side runs, each suite prints its JSON and its summary line, the result
rows have the schema the summaries and tools/gpu_check_summary.py read, and every time and ratio is a finite
positive number. Timings are never asserted against a threshold."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.common import BenchmarkConfig
from jobs import benchmark
from tests.conftest import make_image_folder

pytestmark = pytest.mark.usefixtures("ray_session")


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def printed_results(out: str, names: tuple[str, ...]) -> tuple[dict, dict]:
    """Each suite's JSON line (``name: {...}``) and its summary line (``name: text``), as the job prints them."""
    results, summaries = {}, {}
    for line in out.splitlines():
        name, _, rest = line.partition(": ")
        if name in names:
            if rest.startswith("{"):
                results[name] = json.loads(rest)
            else:
                summaries[name] = rest
    return results, summaries


def test_prepare_inputs_and_embed_suites_on_a_tiny_folder(tmp_path, capsys):
    folder = make_image_folder(tmp_path / "images", train_per_class=8, test_per_class=3)
    names = ("prepare", "inputs", "embed")
    cfg = BenchmarkConfig(suites=names, source=f"imagefolder:{folder}", work_dir=str(tmp_path / "work"), rounds=1,
                          batch_size=4, embed_backbones=("resnet50",), embed_actors=1,
                          output=str(tmp_path / "bench.json"))
    returned = benchmark.main(cfg)
    printed, summaries = printed_results(capsys.readouterr().out, names)
    assert printed == {name: returned[name] for name in names}
    assert json.loads((tmp_path / "bench.json").read_text()) == json.loads(json.dumps(returned))
    assert set(summaries) == set(names) and returned["machine"]["cpus"] >= 1

    prepared = returned["prepare"]
    assert prepared["images"] == 3 * (8 + 3)
    for key in ("plain_pil_seconds", "plain_pil_images_per_s", "prepare_wall_seconds", "prepare_images_per_s_wall",
                "prepare_decode_write_seconds", "prepare_images_per_s_decode_write", "ratio_wall",
                "ratio_decode_write"):
        assert positive(prepared[key]), (key, prepared[key])
    assert summaries["prepare"].startswith(f"33 images in {prepared['prepare_wall_seconds']} s wall")

    inputs = returned["inputs"]
    assert inputs["batch_size"] == 4 and len(inputs["torch_batches_per_s"]) == len(inputs["ray_batches_per_s"]) == 1
    assert positive(inputs["torch_median"]) and positive(inputs["ray_median"]) and positive(inputs["ratio"])
    assert summaries["inputs"].endswith(f"-> {inputs['ratio']}x")

    embed = returned["embed"]
    assert embed["images"] == 33 and embed["backbones"] == ["resnet50"] and embed["actors"] == 1
    assert embed["device"] == "CPU" and embed["image_size"] == 32
    assert embed["max_abs_diff"] < 0.05  # the same networks embed the same rows on both sides
    for side in ("ray_actor_pool", "plain_torch"):
        assert positive(embed[side]["wall_s"]) and positive(embed[side]["embeddings_per_s"])
    assert positive(embed["ratio_ray_over_plain"])
    assert summaries["embed"].endswith(f"-> {embed['ratio_ray_over_plain']}x")


def test_the_serve_suite_on_a_small_synthetic_gallery(tmp_path, monkeypatch, capsys):
    from ray import serve

    from benchmarks import serve as serve_suite

    # the suite's own loops, bounded smaller: a handful of queries, one second of load
    monkeypatch.setattr(serve_suite, "WARMUP_QUERIES", 2)
    monkeypatch.setattr(serve_suite, "LATENCY_QUERIES", 10)
    monkeypatch.setattr(serve_suite, "THROUGHPUT_SECONDS", 1.0)
    cfg = BenchmarkConfig(suites=("serve",), work_dir=str(tmp_path), backbone="resnet50", serve_gallery=500,
                          serve_clients=2)
    try:
        returned = benchmark.main(cfg)["serve"]
    finally:
        serve.shutdown()  # the next Serve app of this Ray session (test_serve.py's) gets a proxy of its own
    printed, summaries = printed_results(capsys.readouterr().out, ("serve",))
    assert printed["serve"] == returned
    assert returned["clients"] == 2 and returned["k"] == 5 and positive(returned["startup_s"])
    latency, load = returned["latency"], returned["throughput"]
    assert latency["queries"] == 10
    for key in ("p50_ms", "p99_ms", "mean_ms", "replica_p50_ms"):
        assert positive(latency[key]), (key, latency[key])
    assert latency["p50_ms"] <= latency["p99_ms"]
    assert load["queries"] >= 2 and positive(load["queries_per_s"]) and positive(load["seconds"])
    assert 1 <= load["mean_batch"] <= 2  # two clients: a batch holds one or both of their queries
    assert isinstance(returned["goals_met"], bool)
    assert summaries["serve"].startswith(f"warm query p50 {latency['p50_ms']} ms")
