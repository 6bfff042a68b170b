#!/usr/bin/env bash
# CI stage (called by .ci/run after the test suite): build the CPU image from the
# Dockerfile with podman and smoke-test it (its own `kawhi serve` answers a
# reweight).  Bounded by IMAGE_STAGE_TIMEOUT_S (default 900 s) for build + smoke.
# Layers stay in podman's storage between runs: an unchanged tree rebuilds from
# cache in about a minute, a code change in about three (the dependencies are a
# layer of their own), the cold build takes about six.
#
# It installs podman and debootstrap from Debian when they are missing.  It skips,
# loudly and with exit status 0, only where podman cannot be installed (no root,
# no sudo, no apt).  Everything else that goes wrong fails the stage.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
log() { printf '[ci-image] %s\n' "$*"; }
skip() {
    printf '[ci-image] !!! IMAGE STAGE SKIPPED: %s !!!\n' "$*" >&2
    printf '[ci-image] !!! the container image was NOT built or smoke-tested in this run !!!\n' >&2
    exit 0
}

TIMEOUT_S="${IMAGE_STAGE_TIMEOUT_S:-900}"
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    # the smoke test mounts the image and chroots into it: root is needed either way
    command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null || skip "not root and no password-less sudo: podman cannot be installed and the image cannot be mounted"
    SUDO=(sudo -n --preserve-env=PIP_CERT,PIP_FIND_LINKS)
fi

missing=()
command -v podman >/dev/null 2>&1 || missing+=(podman)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null 2>&1 || skip "${missing[*]} missing and no apt-get to install them"
    log "installing ${missing[*]} from Debian"
    if ! { "${SUDO[@]}" apt-get update -qq \
            && "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o DPkg::Lock::Timeout=300 "${missing[@]}"; }; then
        skip "apt-get could not install ${missing[*]}"
    fi
fi
command -v podman >/dev/null 2>&1 || skip "podman is still missing after apt-get install"
log "podman $(podman --version | awk '{print $3}'), stage bounded to ${TIMEOUT_S}s"

OUT="$(mktemp -d -t kawhi-ci-image.XXXXXX)"
trap 'rm -rf "$OUT"' EXIT
start=$(date +%s)
set +e
timeout --kill-after=30 "$TIMEOUT_S" "${SUDO[@]}" bash -c '
    set -euo pipefail
    bash scripts/build_image.sh
    python3 scripts/smoke_image.py --json "$1/smoke.json"
    # earlier builds of the image (untagged now, no children: never a layer the
    # current tag or the build cache uses) would pile up 1.3 GB per code change
    podman image prune -f --filter label=io.kawhi.variant >/dev/null
' _ "$OUT"
status=$?
set -e
if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    log "FAILED: build + smoke test ran past ${TIMEOUT_S}s" >&2
elif [ "$status" -ne 0 ]; then
    log "FAILED: build + smoke test exited with status $status" >&2
else
    log "image built and smoke-tested in $(( $(date +%s) - start ))s: $(tr -d '\n ' < "$OUT/smoke.json")"
fi
exit "$status"
