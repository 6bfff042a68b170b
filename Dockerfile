# syntax=docker/dockerfile:1
#
# kawhi service image (`kawhi serve`), two variants from one file:
#
#   docker build -t kawhi:0.1.0-cpu .                              # CPU (default)
#   docker build -t kawhi:0.1.0-gpu --build-arg VARIANT=gpu .      # CUDA
#   bash scripts/build_image.sh                # podman, tag ghcr.io/kawhi/kawhi:0.1.0-cpu
#
# podman: build with --format docker; its default OCI format drops HEALTHCHECK.
# CPU_BASE_IMAGE may be any Debian/Ubuntu image with python3 and python3-venv
# (scripts/build_image.sh makes one with debootstrap where no registry answers);
# TORCH_FIND_LINKS takes torch from a local wheel folder (see the builder stage).
#
#   cpu: python:3.12-slim-bookworm, torch 2.13.0 CPU wheel (download.pytorch.org/whl/cpu)
#   gpu: nvidia/cuda:13.0.1-runtime-ubuntu24.04 + Ubuntu's python 3.12, torch 2.13.0
#        from PyPI, which is the CUDA 13.0 build (needs an NVIDIA driver >= 580).
#        The torch wheel bundles its own CUDA libraries, so the smaller
#        nvidia/cuda:13.0.1-base-ubuntu24.04 also works as GPU_BASE_IMAGE.
#        For an older driver pick a matching pair, e.g.
#          --build-arg GPU_BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 \
#          --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
#
# Model weights are never baked in.  Mount them (volume / PVC) under /models and
# set KAWHI_MODEL=/models/<dir>; with KAWHI_MODEL unset the image serves the
# embedded kawhi-tiny model (shipped inside the kawhi wheel, trained on a
# synthetic visual task: docs/tiny.md; for trying kawhi, not for real training).
#
# The image listens on 0.0.0.0:8000 and runs as uid/gid 10001.  Every
# `kawhi serve` setting is a KAWHI_* environment variable (docs/server.md).
# This file is linted by hadolint in tests/deploy/test_deploy.py and built with
# podman in CI (scripts/build_image.sh), then smoke-tested by mounting the
# image and running its entry point under chroot (scripts/smoke_image.py).

ARG VARIANT=cpu
ARG CPU_BASE_IMAGE=python:3.12-slim-bookworm
ARG GPU_BASE_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04

# ------------------------------------------------------------------ OS + python, per variant
FROM ${CPU_BASE_IMAGE} AS os-cpu
ENV KAWHI_DEVICE=cpu

FROM ${GPU_BASE_IMAGE} AS os-gpu
ENV KAWHI_DEVICE=cuda \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# Ubuntu's python3 (3.12 on 24.04) and venv.  Not version-pinned: the CUDA base
# image is the pin, and exact apt versions vanish from the archive on every
# security update, which would break rebuilds of a pinned Dockerfile.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# ------------------------------------------------------------------ common base
# os-${VARIANT} names one of the two stages above, not a registry image, so
# there is no tag to pin; hadolint cannot resolve the build argument.
# hadolint ignore=DL3006
FROM os-${VARIANT} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/kawhi/venv \
    PATH=/opt/kawhi/venv/bin:${PATH}

# ------------------------------------------------------------------ builder
FROM base AS builder
ARG VARIANT
ARG TORCH_VERSION=2.13.0
# empty: the CPU index for VARIANT=cpu, PyPI (CUDA 13.0 wheels) for VARIANT=gpu
ARG TORCH_INDEX_URL=""
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src
RUN python3 -m venv "${VIRTUAL_ENV}"

# torch first and pinned, in its own layer: it is by far the largest and changes
# least often.  Installed before kawhi so kawhi's `torch>=2.4` is
# already satisfied and never re-resolved to another build.
# TORCH_FIND_LINKS: a folder (e.g. bind-mounted with `podman build --volume`,
# see scripts/build_image.sh) holding the torch wheel; torch comes from it and
# only from it (--no-index: a wheel for another Python fails the build instead
# of falling back to PyPI's multi-GB CUDA build), its dependencies from the index.
ARG TORCH_FIND_LINKS=""
RUN if [ -n "${TORCH_FIND_LINKS}" ]; then \
        pip install --no-cache-dir --no-index --no-deps --find-links "${TORCH_FIND_LINKS}" "torch==${TORCH_VERSION}"; \
    fi; \
    index="${TORCH_INDEX_URL}"; \
    if [ -z "${index}" ] && [ "${VARIANT}" = "cpu" ] && [ -z "${TORCH_FIND_LINKS}" ]; then \
        index="https://download.pytorch.org/whl/cpu"; \
    fi; \
    if [ -n "${index}" ]; then \
        pip install --no-cache-dir --index-url "${index}" "torch==${TORCH_VERSION}"; \
    else \
        pip install --no-cache-dir "torch==${TORCH_VERSION}"; \
    fi

# The dependencies of kawhi-rl[server], read from pyproject.toml alone (its
# kawhi-rl[...] self-references followed), in their own layer: a change of the code
# rebuilds only the small kawhi layer below, not ~500 MB of dependencies.
COPY pyproject.toml ./
RUN python3 -c "import tomllib; project = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
extras, todo, reqs = project['optional-dependencies'], ['server'], list(project['dependencies']); \
[(todo.extend(x for x in r[9:-1].split(',') if x not in todo) if r.startswith('kawhi-rl[') else reqs.append(r)) \
 for extra in todo for r in extras[extra]]; print('\n'.join(dict.fromkeys(reqs)))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt

# kawhi as a wheel (the embedded kawhi-tiny and demo models are package data inside it), then its server
# extra into the venv (already satisfied: only kawhi itself is added).  Only the
# files a wheel needs are copied (.dockerignore is an allow-list too).
COPY README.md ./
COPY service ./service
COPY client ./client
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && pip install --no-cache-dir "$(ls /wheels/kawhi_rl-*.whl)[server]" \
    && python3 -c "import torch, kawhi.server.app; print('torch', torch.__version__)"

# ------------------------------------------------------------------ runtime
FROM base AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="kawhi" \
      org.opencontainers.image.description="KAWHI reward shaping service (kawhi serve)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.kawhi.variant="${VARIANT}"

# numeric uid/gid so Kubernetes' runAsNonRoot can verify them; /models is the
# mount point for weights (read-only volume or PVC), not a VOLUME: an anonymous
# volume per container would only hide a missing mount.
RUN groupadd --system --gid 10001 kawhi \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/kawhi --create-home \
       --shell /usr/sbin/nologin kawhi \
    && mkdir -p /models

COPY --from=builder /opt/kawhi/venv /opt/kawhi/venv

# Listen on all interfaces inside the container, HTTP on 8000 and gRPC on 50051
# (KAWHI_GRPC_PORT= leaves gRPC off); caches and HF state go to
# /tmp so the root filesystem can be mounted read-only.
ENV KAWHI_HOST=0.0.0.0 \
    KAWHI_PORT=8000 \
    KAWHI_GRPC_PORT=50051 \
    HOME=/home/kawhi \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HOME=/tmp/.cache/huggingface \
    TRITON_CACHE_DIR=/tmp/.cache/triton

USER 10001:10001
WORKDIR /home/kawhi
EXPOSE 8000 50051

# Liveness only (the process answers); /readyz says whether the model is loaded.
# python, not curl: the image carries no curl.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('KAWHI_PORT', '8000'), timeout=4)"]

# SIGTERM drains: /readyz turns 503, in-flight requests finish (KAWHI_DRAIN_TIMEOUT_S).
STOPSIGNAL SIGTERM
ENTRYPOINT ["kawhi"]
CMD ["serve"]
