"""The one-page summary of tools/gpu_check.sh, from what its steps left behind (standard library only: it runs
even when the install failed).

    python tools/gpu_check_summary.py OUT WORK GPU_NAME > OUT/SUMMARY.md
"""

from __future__ import annotations

import csv
import json
import re
import statistics
import sys
from pathlib import Path

# steps.txt lines of tools/gpu_check.sh's step(): "[+12s] DONE train: exit 1 in 30s" and "[+12s] SKIP bench: ..."
STEP_DONE = re.compile(r"DONE (\S+): exit (\d+) in \d+s( \(timed out\))?")
STEP_SKIPPED = re.compile(r"SKIP (\S+): ")


def load_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def gpu_samples(path: Path) -> tuple[list[float], list[float]]:
    """Utilisation % and memory MiB of each nvidia-smi sample in ``path``."""
    utilisation, memory = [], []
    try:
        rows = list(csv.reader(path.read_text().splitlines()))
    except OSError:
        return [], []
    for row in rows:
        try:
            utilisation.append(float(row[0]))
            memory.append(float(row[1]))
        except (IndexError, ValueError):
            continue
    return utilisation, memory


def busy_share(utilisation: list[float]) -> str:
    if not utilisation:
        return "not sampled"
    return (f"mean {statistics.mean(utilisation):.0f} %, median {statistics.median(utilisation):.0f} % over "
            f"{len(utilisation)} s")


def samples_file(out: Path, work: Path, stage: str) -> Path:
    """Where the nvidia-smi samples of ``stage`` are: ``WORK/logs/`` (packed into OUT/logs.tar.gz), else OUT."""
    in_work = work / "logs" / f"gpu-{stage}.csv"
    return in_work if in_work.exists() else out / f"gpu-{stage}.csv"


def failed_steps(steps: str) -> list[str]:
    """Each step of ``steps.txt`` that did not finish with exit 0, with why: ``train (exit 1)``,
    ``evaluate (timed out)``, ``bench-embed (skipped)``."""
    failed = []
    for line in steps.splitlines():
        if done := STEP_DONE.search(line):
            name, code, timed_out = done.groups()
            if code != "0":
                failed.append(f"{name} ({'timed out' if timed_out else f'exit {code}'})")
        elif skipped := STEP_SKIPPED.search(line):
            failed.append(f"{skipped.group(1)} (skipped)")
    return failed


def main(out: Path, work: Path, gpu: str) -> None:
    print(f"# GPU check: {gpu}\n")
    if (out / "probe.txt").exists():
        print("\n".join(f"- {line}" for line in (out / "probe.txt").read_text().splitlines() if line.strip()) + "\n")
    steps = (out / "steps.txt").read_text() if (out / "steps.txt").exists() else "(no steps ran)\n"
    failed = failed_steps(steps)
    if failed:
        print(f"**Failed steps: {', '.join(failed)}** (their logs: {out / 'logs'})\n")
    elif (out / "steps.txt").exists():
        print("Every step that ran finished with exit 0.\n")
    print("```\n" + steps.rstrip() + "\n```\n")

    bench = (load_json(out / "bench-train.json") or {}).get("train") or {}
    plain = bench.get("plain_median")
    print("## Training (jobs.train: three backbones from scratch at 224 px, sharing the GPU)\n")
    print("| backbone | images/s (epochs after the first) | peak GPU memory GiB | val mAP@5 untrained -> best |")
    print("|---|---|---|---|")
    for model in sorted((work / "run" / "models").glob("*/metrics.jsonl")):
        rows = [json.loads(line) for line in model.read_text().splitlines() if line.strip()]
        trained = [row for row in rows if row.get("epoch", 0) >= 1]
        rates = [row["images_per_s"] for row in trained]
        rate = f"{statistics.median(rates[1:] or rates):.0f}" if rates else "-"
        peak = max((row.get("gpu_peak_memory_gb", 0.0) for row in trained), default=0.0)
        summary = load_json(model.parent / "summary.json") or {}
        val = (f"{summary['untrained']['val_map@5']:.3f} -> {summary['best']['val_map@5']:.3f}"
               if "best" in summary else "unfinished")
        print(f"| {model.parent.name} | {rate} | {peak:.1f} | {val} |")
    utilisation, memory = gpu_samples(samples_file(out, work, "train"))
    print(f"\nGPU during jobs.train: utilisation {busy_share(utilisation)}; memory used at most "
          f"{max(memory, default=0) / 1024:.1f} GiB (nvidia-smi, all processes).\n")

    print("## jobs.train against the plain GPU loop (benchmark suite `train`, ResNet50 alone)\n")
    if bench:
        print(f"- plain PyTorch loop on the GPU: {plain} images/s ({bench.get('precision')}, batch "
              f"{bench.get('batch_size')}, {bench.get('image_size')} px, augmentation on the GPU); peak memory "
              f"{bench.get('plain_peak_gpu_memory_gb')} GiB")
        print(f"- jobs.train (augmentation on the GPU): {bench.get('ray_median')} images/s -> {bench.get('ratio')}x")
        print(f"- jobs.train --augment-on data (Ray Data on CPUs): {bench.get('ray_data_median')} images/s -> "
              f"{bench.get('ratio_ray_data')}x")
        print(f"- the plain loop inside a Ray Train worker: {bench.get('worker_median')} images/s -> "
              f"{bench.get('ratio_worker_alone')}x")
        print(f"- GPU utilisation % while each side trained: {bench.get('gpu_utilisation_percent')}\n")
    else:
        print("not measured (see steps)\n")

    print("## Evaluation (jobs.evaluate on the GPU)\n")
    embed = (load_json(out / "bench-embed.json") or {}).get("embed") or {}
    if embed:
        ray, baseline = embed["ray_actor_pool"], embed["plain_torch"]
        print(f"- embedding {embed['images']} images x {len(embed['backbones'])} networks at {embed['image_size']} px: "
              f"Ray Data actor pool {ray['embeddings_per_s']} embeddings/s ({ray['wall_s']} s) vs plain loop "
              f"{baseline['embeddings_per_s']} ({baseline['wall_s']} s) -> {embed['ratio_ray_over_plain']}x")
    utilisation, _ = gpu_samples(samples_file(out, work, "evaluate"))
    print(f"- GPU during jobs.evaluate: utilisation {busy_share(utilisation)}\n")
    metrics = load_json(work / "run" / "eval" / "metrics.json") or {}
    if metrics.get("models"):
        print("| model | test mAP@5 (L) | test P@5 (L) | test mAP@5 (G) | probe test acc |")
        print("|---|---|---|---|---|")
        for name, entry in sorted(metrics["models"].items()):
            print(f"| {name} | {entry['L']['map@5']:.3f} | {entry['L']['p@5']:.3f} | {entry['G']['map@5']:.3f} | "
                  f"{entry['test_acc']:.3f} |")
    else:
        print("no metrics.json (see steps)")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "unknown GPU")
