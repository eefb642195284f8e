"""tools/gpu_check_summary.py on the outputs a GPU check leaves behind, recorded here as files: the summary
names the failed steps and carries each figure of the steps that did finish."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "gpu_check_summary.py"

STEPS = """\
[+0s] GPU NVIDIA H200, driver 575.57; budget 540s
[+0s] RUN  install (timeout 330s)
[+41s] DONE install: exit 0 in 41s
[+41s] torch sees NVIDIA H200
[+41s] RUN  prepare (timeout 150s)
[+70s] DONE prepare: exit 0 in 29s
[+70s] RUN  train (timeout 200s)
[+270s] DONE train: exit 124 in 200s (timed out)
[+270s] RUN  evaluate (timeout 150s)
[+300s] DONE evaluate: exit 1 in 30s
[+300s] RUN  bench-train (timeout 150s)
[+420s] DONE bench-train: exit 0 in 120s
[+530s] SKIP bench-embed: 10s of the 540s budget left
"""


def summarise(out: Path, work: Path) -> str:
    done = subprocess.run([sys.executable, str(SCRIPT), str(out), str(work), "NVIDIA H200"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_the_summary_names_failed_steps_and_the_figures(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    (out / "steps.txt").write_text(STEPS)
    (out / "gpu-train.csv").write_text("90, 40960\n70, 81920\nnot a sample\n")
    (out / "bench-train.json").write_text(json.dumps({"train": {
        "plain_median": 2100.0, "ray_median": 1890.0, "ratio": 0.9, "precision": "bf16", "batch_size": 256,
        "image_size": 224, "plain_peak_gpu_memory_gb": 12.5, "ray_data_median": 900.0, "ratio_ray_data": 0.43,
        "worker_median": 2050.0, "ratio_worker_alone": 0.98, "gpu_utilisation_percent": {"plain": 97}}}))
    model = work / "run" / "models" / "resnet50"
    write_jsonl(model / "metrics.jsonl", [
        {"epoch": 0, "images_per_s": 1.0},  # the untrained evaluation: not a training rate
        {"epoch": 1, "images_per_s": 500.0, "gpu_peak_memory_gb": 20.25},
        {"epoch": 2, "images_per_s": 1500.0, "gpu_peak_memory_gb": 21.5}])
    (model / "summary.json").write_text(json.dumps({"untrained": {"val_map@5": 0.21}, "best": {"val_map@5": 0.456}}))
    write_jsonl(work / "run" / "models" / "vgg16" / "metrics.jsonl", [{"epoch": 1, "images_per_s": 300.0}])

    text = summarise(out, work)
    assert text.startswith("# GPU check: NVIDIA H200\n")
    assert ("**Failed steps: train (timed out), evaluate (exit 1), bench-embed (skipped)** "
            f"(their logs: {out / 'logs'})") in text
    assert "DONE bench-train: exit 0 in 120s" in text  # the steps themselves, verbatim
    # training: the median rate after the first trained epoch, peak memory, val mAP@5 before and after
    assert "| resnet50 | 1500 | 21.5 | 0.210 -> 0.456 |" in text
    assert "| vgg16 | 300 | 0.0 | unfinished |" in text
    assert "utilisation mean 80 %, median 80 % over 2 s; memory used at most 80.0 GiB" in text
    assert "plain PyTorch loop on the GPU: 2100.0 images/s (bf16, batch 256, 224 px" in text
    assert "jobs.train (augmentation on the GPU): 1890.0 images/s -> 0.9x" in text
    assert "not sampled" in text and "no metrics.json (see steps)" in text  # evaluate failed: nothing recorded


def test_a_finished_check_has_no_failed_steps_and_reports_evaluation(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    (out / "steps.txt").write_text("[+0s] RUN  prepare (timeout 150s)\n[+29s] DONE prepare: exit 0 in 29s\n")
    (out / "bench-embed.json").write_text(json.dumps({"embed": {
        "images": 60000, "backbones": ["densenet121", "resnet50", "vgg16"], "image_size": 224,
        "ray_actor_pool": {"embeddings_per_s": 5400.0, "wall_s": 33.3},
        "plain_torch": {"embeddings_per_s": 6000.0, "wall_s": 30.0}, "ratio_ray_over_plain": 0.9}}))
    (work / "run" / "eval").mkdir(parents=True)
    (work / "run" / "eval" / "metrics.json").write_text(json.dumps({"models": {
        "resnet50": {"L": {"map@5": 0.5, "p@5": 0.45}, "G": {"map@5": 0.55}, "test_acc": 0.61}}}))
    text = summarise(out, work)
    assert "Every step that ran finished with exit 0." in text and "Failed steps" not in text
    assert ("embedding 60000 images x 3 networks at 224 px: Ray Data actor pool 5400.0 embeddings/s (33.3 s) vs "
            "plain loop 6000.0 (30.0 s) -> 0.9x") in text
    assert "| resnet50 | 0.500 | 0.450 | 0.550 | 0.610 |" in text
    assert "## jobs.train against the plain GPU loop" in text and "not measured (see steps)" in text


def test_nothing_recorded_still_makes_a_page(tmp_path):
    text = summarise(tmp_path / "out", tmp_path / "work")
    assert "(no steps ran)" in text and "Failed steps" not in text and "no metrics.json" in text
