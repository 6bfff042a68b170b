#!/usr/bin/env bash
# Install torch for kawhi's engine -- only when none is installed.
#
#     PYTHON=python3 bash scripts/install_torch.sh      (scripts/setup.sh runs it first)
#
# A torch that is already installed (a CUDA build, a newer release) is kept: the
# engine extra asks only for "torch>=2.4", so pip leaves it alone afterwards.
#
# When there is none, this installs torch==2.13.0.  Left to resolve "torch" alone,
# pip would pick the default PyPI wheel for Linux, which is the CUDA build and
# drags in several GB of nvidia-* wheels.  On the project's machines a CPU-only
# wheel of 2.13.0 (torch-2.13.0+cpu) sits in pip's find-links; "==2.13.0" matches
# it (a local version label like +cpu is ignored by ==, and +cpu sorts above the
# plain 2.13.0), so pip takes the small CPU wheel.  Elsewhere, install the torch
# you want before running this, e.g. the CPU wheel from PyTorch's own index:
#
#     pip install torch --index-url https://download.pytorch.org/whl/cpu
#
# The check reads the installed distribution's metadata (it does not import torch).
set -euo pipefail

PYTHON="${PYTHON:-python3}"
log() { printf '[setup] %s\n' "$*"; }

if installed_torch="$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null)"; then
    log "keeping the installed torch $installed_torch"
else
    log "no torch installed; installing torch==2.13.0 (the CPU wheel from pip's find-links)"
    "$PYTHON" -m pip install "torch==2.13.0"
fi
