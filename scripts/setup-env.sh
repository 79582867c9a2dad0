#!/usr/bin/env bash
# Prepare a Python environment for fused-lora on a fresh machine and print the interpreter to use.
#
# - A machine whose python3 already has a CUDA build of PyTorch (a GPU image, often offline) uses that python3:
#   fused-lora is installed into it in editable mode, without touching its packages.
# - Otherwise a virtual environment .venv is created. CPU-only machines get PyTorch's CPU build, pinned
#   (torch==2.13.0; an unpinned torch would pull several GB of CUDA packages) and the Triton version the
#   ahead-of-time compile check is validated with. Machines with an NVIDIA GPU get the default (CUDA) build,
#   never pinned.
# Set FUSED_LORA_PYTHON to use a prepared interpreter instead.
set -euo pipefail
cd "$(dirname "$0")/.."

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
        "$PY" -m pip install --quiet -e ".[test,bench]" "triton==3.9.0; platform_system == 'Linux'" >&2
    fi
    touch "$stamp"
fi
echo "$PY"
