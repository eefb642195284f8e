#!/usr/bin/env bash
# The offline bundle for tools/gpu_check.sh (run where pip reaches the package index):
#     tools/gpu_bundle.sh .gpu-bundle                          # for the lent GPU machine's Python 3.12
#     tools/gpu_bundle.sh DIR --python-version 3.11 --xz-level 0   # for this machine (the offline rehearsal)
# See tools/gpu_bundle.py --help and docs/gpu.md.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
exec "${PYTHON:-python3}" "$REPO/tools/gpu_bundle.py" "$@"
