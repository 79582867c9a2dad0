#!/usr/bin/env bash
# Prepare a Python environment for fused-lora on a fresh machine and print the interpreter to use.
#
# - A machine whose python3 already has a CUDA build of PyTorch (a GPU image, often offline) uses that python3:
#   fused-lora is installed into it in editable mode, without touching its packages.
# - Otherwise a virtual environment .venv is created. CPU-only machines get PyTorch's CPU build, pinned
#   (torch==2.13.0; an unpinned torch would pull several GB of CUDA packages) and the newest tested Triton
#   (TRITON_NEWEST), the version the ahead-of-time compile check is validated with. Machines with an NVIDIA GPU
#   get the default (CUDA) build, never pinned.
# - `scripts/setup-env.sh --triton-oldest` prepares .venv-triton-oldest instead, on any machine: the same CPU
#   build of PyTorch with the oldest supported Triton (TRITON_OLDEST) and numpy < 2.4 (Triton 3.6's interpreter
#   calls int() on one-element arrays, which numpy 2.4 rejects). `make test-oldest-triton` runs in it.
# Set FUSED_LORA_PYTHON to use a prepared interpreter instead (not for --triton-oldest).
set -euo pipefail
cd "$(dirname "$0")/.."

# The tested Triton range; benchmarks/aot.py TESTED_TRITON and pyproject.toml's lower bound say the same
# (tests/test_aot_compile.py checks that they agree).
TRITON_OLDEST=3.6.0
TRITON_NEWEST=3.9.0

case "${1:-}" in
    "") oldest=0 ;;
    --triton-oldest) oldest=1 ;;
    *) echo "usage: $0 [--triton-oldest]" >&2; exit 2 ;;
esac

if [ "$oldest" = 1 ]; then
    VENV=.venv-triton-oldest
    PY="$VENV/bin/python"
    [ -x "$PY" ] || python3 -m venv "$VENV" >&2
    stamp="$VENV/.fused-lora-installed"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "$0" -nt "$stamp" ]; then
        "$PY" -m pip install --quiet torch==2.13.0 "triton==$TRITON_OLDEST" "numpy<2.4" -e ".[test]" >&2
        touch "$stamp"
    fi
    echo "$PY"
    exit 0
fi

if [ -n "${FUSED_LORA_PYTHON:-}" ]; then
    echo "$FUSED_LORA_PYTHON"
    exit 0
fi

if python3 -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
    if ! python3 -c 'import fused_lora.kernels' >/dev/null 2>&1; then
        python3 -m pip install --quiet --no-deps --no-build-isolation -e . >&2
    fi
    echo python3
    exit 0
fi

VENV=.venv
PY="$VENV/bin/python"
[ -x "$PY" ] || python3 -m venv "$VENV" >&2
stamp="$VENV/.fused-lora-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "$0" -nt "$stamp" ]; then
    if nvidia-smi -L >/dev/null 2>&1; then
        "$PY" -m pip install --quiet torch >&2
        "$PY" -m pip install --quiet -e ".[test,bench]" >&2
    else
        "$PY" -m pip install --quiet torch==2.13.0 >&2
        "$PY" -m pip install --quiet -e ".[test,bench]" "triton==$TRITON_NEWEST; platform_system == 'Linux'" >&2
    fi
    touch "$stamp"
fi
echo "$PY"
