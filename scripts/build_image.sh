#!/usr/bin/env bash
# Build the kawhi service image from the repository's Dockerfile with podman.
# Run from anywhere:
#
#     bash scripts/build_image.sh                    # CPU image, tag ghcr.io/kawhi/kawhi:<version>-cpu
#     bash scripts/build_image.sh --variant gpu      # CUDA image (needs a registry for its base)
#     bash scripts/build_image.sh --local-base       # never try a registry for the CPU base
#
# Options (each also as an environment variable):
#   --variant cpu|gpu     VARIANT       the Dockerfile's VARIANT build argument (default cpu)
#   --tag NAME            IMAGE         the image name (default ghcr.io/kawhi/kawhi:<version>-<variant>,
#                                       the chart's default repository and tag)
#   --base IMAGE          BASE_IMAGE    base image of the variant (CPU_BASE_IMAGE / GPU_BASE_IMAGE)
#   --local-base          LOCAL_BASE=1  CPU only: use a Debian bookworm base made here with
#                                       debootstrap (see below) without trying a registry first
#   --wheels DIR          TORCH_WHEELS  a folder holding a torch==<pin> wheel; it is bind-mounted
#                                       into the build (never copied into the context or the image)
#                                       and pip takes torch from it (default: pip's find-links of
#                                       this machine, when one holds a torch wheel)
#   --no-cache                          rebuild every layer
#
# The CPU base.  The Dockerfile's default CPU base is python:3.12-slim-bookworm from
# Docker Hub.  Where no registry answers (the CI machines), this script makes a stand-in
# with `debootstrap --variant=minbase` from Debian's own archive: bookworm with its
# python3 (3.11), python3-venv and ca-certificates, imported with `podman import` as
# localhost/kawhi-debian-base:bookworm and passed as CPU_BASE_IMAGE.  It is made once and
# reused from podman's storage.  The published image keeps the Dockerfile's default.
#
# Torch.  Without a wheel folder the CPU variant installs torch from
# download.pytorch.org/whl/cpu and the GPU variant from PyPI (the CUDA build, several GB).
# With one, pip takes torch from that folder (--find-links) and everything else from
# PyPI, so no CUDA wheels are downloaded.  The wheel must match the base's Python
# (a cp311 wheel for the Debian base, cp312 for python:3.12-slim).
#
# The image is built in the docker format (podman's default OCI format drops
# HEALTHCHECK) with --isolation chroot (no container runtime needed) and --layers, so a
# rebuild with unchanged inputs reuses every layer.  Smoke test: scripts/smoke_image.py.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"

log() { printf '[build-image] %s\n' "$*"; }
die() { printf '[build-image] ERROR: %s\n' "$*" >&2; exit 1; }

VARIANT="${VARIANT:-cpu}"
IMAGE="${IMAGE:-}"
BASE_IMAGE="${BASE_IMAGE:-}"
LOCAL_BASE="${LOCAL_BASE:-0}"
TORCH_WHEELS="${TORCH_WHEELS:-}"
NO_CACHE=()
while [ $# -gt 0 ]; do
    case "$1" in
        --variant) VARIANT="$2"; shift 2 ;;
        --tag) IMAGE="$2"; shift 2 ;;
        --base) BASE_IMAGE="$2"; shift 2 ;;
        --local-base) LOCAL_BASE=1; shift ;;
        --wheels) TORCH_WHEELS="$2"; shift 2 ;;
        --no-cache) NO_CACHE=(--no-cache); shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
case "$VARIANT" in cpu|gpu) ;; *) die "--variant must be cpu or gpu, not $VARIANT" ;; esac
command -v podman >/dev/null 2>&1 || die "podman is not installed (apt-get install -y podman)"

VERSION="$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n1)"
[ -n "$VERSION" ] || die "no version in pyproject.toml"
IMAGE="${IMAGE:-ghcr.io/kawhi/kawhi:${VERSION}-${VARIANT}}"
TORCH_VERSION="$(sed -n 's/^ARG TORCH_VERSION=//p' Dockerfile)"

DEBIAN_BASE="localhost/kawhi-debian-base:bookworm"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
DEFAULT_CPU_BASE="$(sed -n 's/^ARG CPU_BASE_IMAGE=//p' Dockerfile)"

make_debian_base() {
    if podman image exists "$DEBIAN_BASE"; then
        log "reusing $DEBIAN_BASE (made earlier with debootstrap; \`podman rmi $DEBIAN_BASE\` to remake it)"
        return
    fi
    command -v debootstrap >/dev/null 2>&1 || die "debootstrap is not installed (apt-get install -y debootstrap)"
    [ "$(id -u)" -eq 0 ] || die "debootstrap needs root"
    local dir
    dir="$(mktemp -d -t kawhi-debian-base.XXXXXX)"
    log "making $DEBIAN_BASE with debootstrap --variant=minbase bookworm from $DEBIAN_MIRROR"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$dir" "$DEBIAN_MIRROR" >"$dir.log" 2>&1 \
        || { tail -n 20 "$dir.log" >&2; rm -rf "$dir" "$dir.log"; die "debootstrap failed"; }
    # what a published slim image leaves out: package caches and lists, logs
    rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/* "$dir"/var/log/*.log \
        "$dir"/var/cache/debconf/*-old
    tar -C "$dir" --numeric-owner -c . \
        | podman import --message "debootstrap --variant=minbase bookworm + python3 python3-venv ca-certificates" \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'ENV LANG=C.UTF-8' \
            --change 'CMD ["python3"]' - "$DEBIAN_BASE" >/dev/null
    rm -rf "$dir" "$dir.log"
    log "made $DEBIAN_BASE ($(podman image inspect --format '{{.Size}}' "$DEBIAN_BASE" | awk '{printf "%.0f MB", $1/1e6}'))"
}

BUILD_ARGS=(--build-arg "VARIANT=$VARIANT")
if [ "$VARIANT" = cpu ]; then
    if [ -z "$BASE_IMAGE" ]; then
        if [ "$LOCAL_BASE" = 1 ]; then
            make_debian_base; BASE_IMAGE="$DEBIAN_BASE"
        elif podman image exists "$DEFAULT_CPU_BASE" \
            || timeout 60 podman pull -q "docker.io/library/$DEFAULT_CPU_BASE" >/dev/null 2>&1; then
            BASE_IMAGE="$DEFAULT_CPU_BASE"
        else
            log "no registry answers for $DEFAULT_CPU_BASE: using a local Debian base instead"
            make_debian_base; BASE_IMAGE="$DEBIAN_BASE"
        fi
    fi
    BUILD_ARGS+=(--build-arg "CPU_BASE_IMAGE=$BASE_IMAGE")
elif [ -n "$BASE_IMAGE" ]; then
    BUILD_ARGS+=(--build-arg "GPU_BASE_IMAGE=$BASE_IMAGE")
fi

# The base's Python as a wheel tag (cp311, cp312, ...), read from its filesystem;
# empty when it cannot be told (no root for `podman image mount`, base not local).
base_python_tag() {
    local base="$1" dir py
    [ -n "$base" ] && [ "$(id -u)" -eq 0 ] && podman image exists "$base" || return 0
    dir="$(podman image mount "$base" 2>/dev/null)" || return 0
    py="$(ls "$dir"/usr/local/bin/python3.* "$dir"/usr/bin/python3.* 2>/dev/null \
        | sed -n 's|.*/python3\.\([0-9]*\)$|cp3\1|p' | head -n1)"
    podman image unmount "$base" >/dev/null 2>&1 || true
    printf '%s' "$py"
}

# A torch wheel from this machine for the base's Python: the given folder, else
# the first of pip's find-links folders that holds one.  None found: torch comes
# from the index (download.pytorch.org/whl/cpu for the CPU variant).
PY_TAG="$(base_python_tag "$BASE_IMAGE")"
WHEEL_GLOB="torch-${TORCH_VERSION}*-${PY_TAG:-cp3*}-*.whl"
if [ -z "$TORCH_WHEELS" ]; then
    for dir in $(python3 -m pip config list 2>/dev/null | sed -n "s/^[a-z:]*\.find-links='\(..*\)'$/\1/p") ${PIP_FIND_LINKS:-}; do
        if compgen -G "$dir/$WHEEL_GLOB" >/dev/null; then TORCH_WHEELS="$dir"; break; fi
    done
    [ -n "$TORCH_WHEELS" ] || log "no local $WHEEL_GLOB: torch comes from the index"
fi
VOLUMES=()
if [ -n "$TORCH_WHEELS" ]; then
    TORCH_WHEELS="$(cd "$TORCH_WHEELS" && pwd)"
    compgen -G "$TORCH_WHEELS/$WHEEL_GLOB" >/dev/null || die "no $WHEEL_GLOB in $TORCH_WHEELS"
    log "torch from $(cd "$TORCH_WHEELS" && ls $WHEEL_GLOB | tr '\n' ' ')(bind-mounted from $TORCH_WHEELS)"
    VOLUMES=(--volume "$TORCH_WHEELS:/opt/torch-wheels:ro")
    BUILD_ARGS+=(--build-arg "TORCH_FIND_LINKS=/opt/torch-wheels")
fi

# pip's trust store: where this machine's pip is told to trust a CA of its own (a
# TLS-intercepting proxy in front of PyPI), the build's pip gets the same CA through
# a bind-mounted /etc/pip.conf.  Both mounts exist only while a RUN step runs, and
# only the builder stage runs pip: the image keeps Debian's CA bundle.
HOST_CERT="${PIP_CERT:-$(python3 -m pip config list 2>/dev/null | sed -n "s/^[a-z:]*\.cert='\(..*\)'$/\1/p" | head -n1)}"
BUILD_TMP="$(mktemp -d -t kawhi-build-image.XXXXXX)"
trap 'rm -rf "$BUILD_TMP"' EXIT
if [ -n "$HOST_CERT" ] && [ -f "$HOST_CERT" ]; then
    log "pip in the build trusts $HOST_CERT (this machine's pip cert, bind-mounted)"
    printf '[global]\ncert = /run/kawhi-build/ca.crt\n' >"$BUILD_TMP/pip.conf"
    VOLUMES+=(--volume "$HOST_CERT:/run/kawhi-build/ca.crt:ro" --volume "$BUILD_TMP/pip.conf:/etc/pip.conf:ro")
fi

log "building $IMAGE (variant $VARIANT, base ${BASE_IMAGE:-the Dockerfile default})"
start=$(date +%s)
podman build --isolation chroot --format docker --layers "${NO_CACHE[@]}" \
    "${BUILD_ARGS[@]}" "${VOLUMES[@]}" --tag "$IMAGE" --file Dockerfile "$ROOT"
elapsed=$(( $(date +%s) - start ))
size="$(podman image inspect --format '{{.Size}}' "$IMAGE")"
log "built $IMAGE in ${elapsed}s; size $(awk -v s="$size" 'BEGIN {printf "%.0f MB", s/1e6}')"
log "smoke test: python3 scripts/smoke_image.py $IMAGE"
log "push: podman push $IMAGE   (or: podman tag $IMAGE REGISTRY/kawhi:${VERSION}-${VARIANT} && podman push REGISTRY/kawhi:${VERSION}-${VARIANT})"
