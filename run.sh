#!/usr/bin/env bash
# The two commands of the README:
#   ./run.sh bench [args]   set up, then run the benchmark suite (python -m svdkernels bench)
#   ./run.sh test  [args]   set up, then run the test suite (pytest)
# Set-up is idempotent: it installs torch==2.13.0 only when no torch is importable
# (a GPU user keeps their CUDA build), triton only when it is missing (CPU builds of
# torch do not ship it; the tests run its kernels through the interpreter), and
# this package in editable mode against the installed torch (--no-build-isolation).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

setup() {
    if ! "$PY" -c "import torch" 2>/dev/null; then
        "$PY" -m pip install -q "torch==2.13.0"
    fi
    if ! "$PY" -c "import triton" 2>/dev/null; then
        "$PY" -m pip install -q "triton==3.9.0"
    fi
    # Dependencies already satisfied are left alone (pip's only-if-needed
    # strategy), so this never replaces the torch found above.
    "$PY" -m pip install -q --disable-pip-version-check --no-build-isolation -e ".[test,bench]"
    # The optimiser peers (tests and bench), without their dependencies: their
    # requirements would let pip replace the installed torch. bitsandbytes is what
    # galore-torch's module imports.
    "$PY" -m pip install -q --disable-pip-version-check --no-deps \
        "galore-torch==1.0" "bitsandbytes==0.50.2" "q-galore-torch==1.0" "apollo-torch==1.0.3"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
    test)
        setup
        exec "$PY" -m pytest tests "$@"
        ;;
    bench)
        setup
        exec "$PY" -m svdkernels bench "$@"
        ;;
    setup)
        setup
        ;;
    *)
        echo "usage: ./run.sh {test|bench|setup} [args...]" >&2
        exit 2
        ;;
esac
