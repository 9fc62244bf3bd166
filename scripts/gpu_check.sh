#!/usr/bin/env bash
# The GPU check: scripts/gpu_check.sh OUT_DIR [--dry-run] [--stages ...] [--budget STAGE=SECONDS ...]
#
# Runs `python -m svdkernels gpucheck --out OUT_DIR` from this working tree with the
# machine's own python, torch and triton: nothing is installed or downloaded (the
# package is found through PYTHONPATH). Exit status 0 when every stage passed.
# PYTHON overrides the interpreter (default: python3, else python). Where the machine
# lacks pure-Python test tools (pytest, pytest-xdist), put them in .gpucheck-vendor/
# of the working tree beforehand (pip install --target .gpucheck-vendor pytest
# pytest-xdist on a machine with a registry): it goes on PYTHONPATH after the tree.
set -euo pipefail

if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: $0 OUT_DIR [--dry-run] [--stages STAGE ...] [--budget STAGE=SECONDS ...]" >&2
    exit 2
fi
out="$1"
shift
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$(command -v python3 || command -v python)}"
cd "$repo"
vendor=""
if [[ -d "$repo/.gpucheck-vendor" ]]; then
    vendor=":$repo/.gpucheck-vendor"
fi
export PYTHONPATH="$repo$vendor${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m svdkernels gpucheck --out "$out" "$@"
