"""The objectives side by side: train one backbone with each ``--loss`` for a few seeds, evaluate each run, and
print test P@5 and mAP@5 (protocol L) as mean ± sample standard deviation, with the training minutes.

    python tools/objective_study.py --data-dir DATA --work-dir WORK [--losses triplet,multi_similarity,...]
        [--seeds 0,1,2] [--backbone densenet121] [--preset quick] [-- extra jobs.train flags]

Every run is ``python -m jobs.train`` then ``python -m jobs.evaluate`` in its own ``WORK/<loss>-seed<S>/`` (one
at a time: each starts its own local Ray), so a rerun skips the runs that finished. The table goes to stdout and
``WORK/study.md``; every run's figures to ``WORK/study.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_job(args: list[str], log: Path) -> None:
    with log.open("a") as handle:
        done = subprocess.run([sys.executable, "-m", *args], cwd=REPO, stdout=handle, stderr=subprocess.STDOUT,
                              check=False)
    if done.returncode != 0:
        sys.exit(f"objective_study: {' '.join(args[:1])} failed (exit {done.returncode}); see {log}")


def one_run(data: Path, run: Path, loss: str, seed: int, backbone: str, preset: str, extra: list[str]) -> dict:
    metrics_file = run / "eval" / "metrics.json"
    if not metrics_file.is_file():
        run.mkdir(parents=True, exist_ok=True)
        log = run / "study.log"
        run_job(["jobs.train", "--data-dir", str(data), "--run-dir", str(run), "--backbones", backbone,
                 "--preset", preset, "--loss", loss, "--seed", str(seed), *extra], log)
        run_job(["jobs.evaluate", "--data-dir", str(data), "--run-dir", str(run), "--backbones", backbone,
                 "--tsne-points", "2000", "--seed", str(seed)], log)
    model = json.loads(metrics_file.read_text())["models"][backbone]
    summary = json.loads((run / "models" / backbone / "summary.json").read_text())
    return {"loss": loss, "seed": seed, "p@5": model["L"]["p@5"], "map@5": model["L"]["map@5"],
            "epochs": summary["epochs_run"], "train_minutes": summary["train_seconds"] / 60}


def spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{mean:.3f}"


def table(rows: list[dict], backbone: str, preset: str) -> str:
    lines = [f"| objective ({backbone}, {preset}) | seeds | test P@5 (L) | test mAP@5 (L) | epochs | train min |",
             "|---|---|---|---|---|---|"]
    for loss in dict.fromkeys(row["loss"] for row in rows):
        mine = [row for row in rows if row["loss"] == loss]
        lines.append(f"| {loss} | {len(mine)} | {spread([r['p@5'] for r in mine])} | "
                     f"{spread([r['map@5'] for r in mine])} | {spread([r['epochs'] for r in mine])} | "
                     f"{spread([r['train_minutes'] for r in mine])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="tools/objective_study.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--losses", default="triplet,multi_similarity,proxy_anchor,supcon")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--backbone", default="densenet121")
    parser.add_argument("--preset", default="quick")
    args = parser.parse_args(argv)
    rows = []
    started = time.perf_counter()
    for loss in args.losses.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            rows.append(one_run(args.data_dir, args.work_dir / f"{loss}-seed{seed}", loss, seed, args.backbone,
                                args.preset, extra))
            print(f"[{(time.perf_counter() - started) / 60:.1f} min] {loss} seed {seed}: test P@5 (L) "
                  f"{rows[-1]['p@5']:.3f}, mAP@5 (L) {rows[-1]['map@5']:.3f}", flush=True)
    text = table(rows, args.backbone, args.preset)
    (args.work_dir / "study.md").write_text(text + "\n")
    (args.work_dir / "study.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
