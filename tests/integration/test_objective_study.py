"""tools/objective_study.py on tiny data with the smoke preset: a run is trained, evaluated and tabled, and a
rerun reuses it."""

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import make_image_folder

REPO = Path(__file__).resolve().parents[2]


def test_a_study_run_is_trained_evaluated_tabled_and_reused(tmp_path):
    from jobs import prepare

    folder = make_image_folder(tmp_path / "images", train_per_class=12, test_per_class=6)
    data = prepare.main(prepare.PrepareConfig(source=f"imagefolder:{folder}", data_dir=str(tmp_path / "data")))
    command = [sys.executable, str(REPO / "tools" / "objective_study.py"), "--data-dir", str(data), "--work-dir",
               str(tmp_path / "study"), "--losses", "supcon", "--seeds", "0", "--backbone", "resnet50",
               "--preset", "smoke"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = json.loads((tmp_path / "study" / "study.json").read_text())
    assert [(r["loss"], r["seed"]) for r in rows] == [("supcon", 0)]
    assert all(0 <= r["p@5"] <= 1 and 0 <= r["map@5"] <= 1 for r in rows)
    table = (tmp_path / "study" / "study.md").read_text()
    assert table.startswith("| objective (resnet50, smoke) |") and "| supcon | 1 |" in table
    stamp = (tmp_path / "study" / "supcon-seed0" / "eval" / "metrics.json").stat().st_mtime_ns
    again = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert again.returncode == 0
    assert (tmp_path / "study" / "supcon-seed0" / "eval" / "metrics.json").stat().st_mtime_ns == stamp
