#!/usr/bin/env bash
# The one-command GPU check of this project, for one machine with an NVIDIA GPU (sized for one H200: 9 minutes).
#
#     tools/gpu_check.sh                 # everything: install, prepare, train, evaluate, benchmarks, summary
#     tools/gpu_check.sh --probe-only    # only: is there a GPU this machine's torch can use?
#
# Steps, each under `timeout` clipped to what is left of BUDGET seconds (a step that would not fit is skipped):
#   probe     nvidia-smi must list a GPU (else one "no CUDA" line and exit 3, before anything is installed)
#   install   offline, when $BUNDLE (default .gpu-bundle, made by tools/gpu_bundle.sh where pip works) holds a
#             bundle: its install tree is extracted under $WORK and put on PYTHONPATH over $IMAGE_PYTHON's own
#             packages (python3: the image's torch is reused), and its CIFAR-10 subset is the data. Without a
#             bundle: $VENV (default .venv) with `pip install -e ".[gpu,dev]"`, or ".[cpu,dev]" when the gpu
#             extra cannot be installed; a driver older than 580 cannot run PyPI's CUDA 13 torch, so torch comes
#             from PyTorch's cu128 index first. Either way every package the jobs import must then import, and
#             torch must see the GPU (else "no CUDA", exit 3).
#   gpu       GPU name, compute capability, driver, torch and its CUDA, bf16, and whether faiss or torch does the
#             exact search on this GPU (lib.retrieval.faiss_gpu's probe) -> $OUT/probe.txt
#   prepare   jobs.prepare of the bundle's subset, else of the CIFAR-10 image folder $CIFAR10_DIR
#             (default ../shared/datasets/cifar10)
#   train     jobs.train of densenet121, resnet50 and vgg16 from scratch (--weights none) at 224 px, the full preset
#             on TRAIN_PER_CLASS images per class (the bundle holds 1000, 900 after val) for EPOCHS epochs of batches of 128 (about
#             280 steps each), all three at once on the GPU in fractional shares
#   evaluate  jobs.evaluate on the GPU (embeddings of every split, retrieval, stacking)
#   bench     jobs.benchmark --suites train (ResNet50 at 224 px: jobs.train vs the plain GPU loop) and
#             --suites embed (the three networks at 224 px)
#   summary   $OUT/SUMMARY.md (printed too): images/s of each stage against the plain GPU loop, GPU utilisation,
#             peak memory, val and test mAP@5 (tools/gpu_check_summary.py)
# $OUT holds at most 8 files: SUMMARY.md, steps.txt, probe.txt, bench-train.json, bench-embed.json, metrics.json and
# logs.tar.gz (every step's log and the nvidia-smi samples).
# Environment: OUT (default gpu-check-out), WORK (default /tmp/cifar-gpu-check), BUDGET (540), BUNDLE, IMAGE_PYTHON,
# VENV, CIFAR10_DIR, TRAIN_PER_CLASS (1000), EPOCHS (4). Exit codes: 0 done, 3 no usable CUDA, 1 a step failed
# (see $OUT/steps.txt).
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 1
START=$(date +%s)
BUDGET=${BUDGET:-540}
OUT=${OUT:-$REPO/gpu-check-out}
WORK=${WORK:-/tmp/cifar-gpu-check}
VENV=${VENV:-$REPO/.venv}
BUNDLE=${BUNDLE:-$REPO/.gpu-bundle}
IMAGE_PYTHON=${IMAGE_PYTHON:-python3}
CIFAR10_DIR=${CIFAR10_DIR:-}
TRAIN_PER_CLASS=${TRAIN_PER_CLASS:-1000}
EPOCHS=${EPOCHS:-4}
PROBE_ONLY=0
for arg in "$@"; do
  case $arg in
    --probe-only) PROBE_ONLY=1 ;;
    -h|--help) sed -n '2,32p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done

no_cuda() { echo "no CUDA: $* - this check needs an NVIDIA GPU that torch can use" >&2; exit 3; }

# ------------------------------------------------------------------------------------------ probe
if ! command -v nvidia-smi > /dev/null 2>&1; then
  no_cuda "nvidia-smi is not installed on $(uname -n)"
fi
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2> /dev/null | head -n 1)
[ -n "$GPU_NAME" ] || no_cuda "nvidia-smi lists no GPU on $(uname -n)"
DRIVER=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2> /dev/null | head -n 1)

torch_cuda() {  # $1: a python; prints the GPU torch sees, or fails with why not
  "$1" - <<'EOF'
import sys
try:
    import torch
except ImportError:
    sys.exit("torch is not installed")
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} (CUDA build {torch.version.cuda}) cannot use the GPU")
print(torch.cuda.get_device_name(0))
EOF
}

if [ "$PROBE_ONLY" = 1 ]; then
  for python in "$VENV/bin/python" "$IMAGE_PYTHON"; do
    command -v "$python" > /dev/null 2>&1 || continue
    if seen=$(torch_cuda "$python" 2>&1); then
      echo "CUDA: $GPU_NAME, driver $DRIVER, torch sees $seen"; exit 0
    fi
    [ "$seen" = "torch is not installed" ] || no_cuda "$seen (driver ${DRIVER:-unknown})"
  done
  echo "CUDA: $GPU_NAME, driver $DRIVER (no torch installed yet to ask)"; exit 0
fi

mkdir -p "$OUT" "$WORK/logs"
: > "$OUT/steps.txt"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 RAY_USAGE_STATS_ENABLED=0 RAY_DATA_DISABLE_PROGRESS_BARS=1
FAILED=0
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
note() { echo "[+$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/steps.txt"; }

# step NAME CAP MIN cmd...: cmd under timeout min(CAP, time left - 15 s); skipped when that is under MIN seconds.
step() {
  local name=$1 cap=$2 min=$3 l t s rc; shift 3
  l=$(left); t=$(( cap < l - 15 ? cap : l - 15 ))
  if (( t < min )); then note "SKIP $name: ${l}s of the ${BUDGET}s budget left"; FAILED=1; return 99; fi
  note "RUN  $name (timeout ${t}s)"
  s=$(date +%s)
  timeout --kill-after=10 "$t" "$@" > "$WORK/logs/$name.log" 2>&1; rc=$?
  note "DONE $name: exit $rc in $(( $(date +%s) - s ))s$( ((rc == 124 || rc == 137)) && echo ' (timed out)')"
  (( rc == 0 )) || { FAILED=1; tail -n 5 "$WORK/logs/$name.log" | sed "s/^/  [$name] /"; }
  return $rc
}

SAMPLER=""
sample_gpu() {  # one nvidia-smi line a second into $WORK/logs/gpu-$1.csv while a step runs
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -l 1 > "$WORK/logs/gpu-$1.csv" 2> /dev/null &
  SAMPLER=$!
}
stop_sampling() { [ -n "$SAMPLER" ] && kill "$SAMPLER" 2> /dev/null; wait "$SAMPLER" 2> /dev/null; SAMPLER=""; }

finish() {
  stop_sampling
  [ -f "$WORK/run/eval/metrics.json" ] && cp "$WORK/run/eval/metrics.json" "$OUT/metrics.json"
  tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs 2> /dev/null
  "${PYTHON:-$IMAGE_PYTHON}" "$REPO/tools/gpu_check_summary.py" "$OUT" "$WORK" "$GPU_NAME" > "$OUT/SUMMARY.md" 2>> "$OUT/steps.txt"
  note "summary: $OUT/SUMMARY.md"
  cat "$OUT/SUMMARY.md"
}
trap finish EXIT
note "GPU $GPU_NAME, driver $DRIVER; budget ${BUDGET}s"

# ------------------------------------------------------------------------------------------ install
if [ -f "$BUNDLE/bundle.json" ]; then
  # offline: the bundle's tree over the image's own packages (its torch), the project from this tree
  step install 120 20 "$IMAGE_PYTHON" "$REPO/tools/gpu_bundle.py" "$BUNDLE" --install "$WORK/offline" || exit 1
  export PYTHONPATH="$WORK/offline/site:$REPO${PYTHONPATH:+:$PYTHONPATH}"
  PYTHON=$IMAGE_PYTHON
  [ -n "$CIFAR10_DIR" ] || CIFAR10_DIR=$WORK/offline/cifar10
else
  cat > "$WORK/install.sh" <<EOF
set -e
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import jobs, ray, torch, torchvision, faiss" 2> /dev/null; then
  echo "reusing $VENV"; exit 0
fi
python3 -m venv "$VENV" || { python3 -m pip install -q virtualenv && python3 -m virtualenv "$VENV"; }
"$VENV/bin/python" -m pip install -q --upgrade pip
if [ "${DRIVER%%.*}" -lt 580 ] 2> /dev/null; then
  echo "driver $DRIVER < 580: PyPI's torch is a CUDA 13 build; torch from PyTorch's cu128 index first"
  "$VENV/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cu128
fi
"$VENV/bin/python" -m pip install -q -e ".[gpu,dev]" || {
  echo "the gpu extra did not install: faiss on the CPU instead"; "$VENV/bin/python" -m pip install -q -e ".[cpu,dev]"; }
EOF
  step install 330 60 bash "$WORK/install.sh" || exit 1
  PYTHON=$VENV/bin/python
fi
# every package the jobs import, from where this check will run them
step imports 90 10 "$PYTHON" -c "import ray, faiss, pytorch_metric_learning, openTSNE, torch, torchvision
import jobs.prepare, jobs.train, jobs.evaluate, jobs.benchmark
print('ray', ray.__version__, 'faiss', faiss.__version__, 'torch', torch.__version__)" || exit 1
why=$(torch_cuda "$PYTHON" 2>&1) || no_cuda "$why (driver $DRIVER; see docs/gpu.md)"
note "torch sees $why"

# ------------------------------------------------------------------------------------------ gpu
"$PYTHON" - > "$OUT/probe.txt" 2>&1 <<'EOF'
import torch
from lib.retrieval import faiss_gpu
from lib.retrieval.index import faiss_gpus

name, (major, minor) = torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0)
print(f"gpu: {name}, compute capability {major}.{minor}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, bf16 {torch.cuda.is_bf16_supported()}")
verdict = faiss_gpu.probe()
print(f"faiss GPU search: {'yes' if verdict.usable else 'no'} ({verdict.reason}); "
      f"exact search runs on {'faiss' if faiss_gpus() else 'torch'} on this GPU")
EOF
note "$(tr '\n' ' ' < "$OUT/probe.txt")"

# ------------------------------------------------------------------------------------------ prepare
CIFAR10_DIR=${CIFAR10_DIR:-$REPO/../shared/datasets/cifar10}
[ -d "$CIFAR10_DIR/train" ] || { note "no CIFAR-10 image folder at $CIFAR10_DIR (set CIFAR10_DIR)"; exit 1; }
CIFAR10_DIR=$(cd "$CIFAR10_DIR" && pwd)
step prepare 150 20 "$PYTHON" -m jobs.prepare --source "imagefolder:$CIFAR10_DIR" --data-dir "$WORK/data" || exit 1

# ------------------------------------------------------------------------------------------ train + evaluate
rm -rf "$WORK/run"  # a finished earlier run would be skipped, not measured
sample_gpu train
step train 200 60 "$PYTHON" -m jobs.train --data-dir "$WORK/data" --run-dir "$WORK/run" \
  --backbones densenet121,resnet50,vgg16 --preset full --weights none --image-size 224 \
  --train-per-class "$TRAIN_PER_CLASS" --val-per-class 50 --epochs "$EPOCHS" --batch-size 128 --patience 0 --use-gpu true \
  --max-failures 0
stop_sampling
sample_gpu evaluate
step evaluate 150 45 "$PYTHON" -m jobs.evaluate --data-dir "$WORK/data" --run-dir "$WORK/run" --use-gpu true \
  --tsne-points 2000
stop_sampling

# ------------------------------------------------------------------------------------------ benchmarks
mkdir -p "$WORK/bench" && ln -sfn "$WORK/data" "$WORK/bench/prepared"  # the suites reuse the prepared DATA
step bench-train 150 60 "$PYTHON" -m jobs.benchmark --suites train --backbone resnet50 --image-size 224 \
  --batch-size 256 --train-images 5000 --epochs 2 --rounds 1 --work-dir "$WORK/bench" --output "$OUT/bench-train.json"
step bench-embed 100 40 "$PYTHON" -m jobs.benchmark --suites embed --embed-backbones densenet121,resnet50,vgg16 \
  --image-size 224 --rounds 1 --work-dir "$WORK/bench" --output "$OUT/bench-embed.json"
exit $FAILED
