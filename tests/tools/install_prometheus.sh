#!/usr/bin/env bash
# Install the Prometheus server binaries (prometheus, promtool) for the integration tests.
#
# No root needed for the install itself and no system service is started: the Debian package is only
# downloaded and unpacked (`apt-get download` + `dpkg -x`), never installed with dpkg/apt.
#
#   tests/tools/install_prometheus.sh [DEST_DIR]    # default: "$VIRTUAL_ENV/bin"
#
# Idempotent: does nothing if `prometheus` is already on PATH or already in DEST_DIR.
set -euo pipefail

log() { echo "install_prometheus: $*"; }

if command -v prometheus >/dev/null 2>&1; then
    log "prometheus already on PATH at $(command -v prometheus); nothing to do"
    exit 0
fi

dest="${1:-${VIRTUAL_ENV:-}/bin}"
if [[ -z "${1:-}" && -z "${VIRTUAL_ENV:-}" ]]; then
    echo "install_prometheus: no destination: activate a virtualenv or pass a directory as \$1" >&2
    exit 2
fi
if [[ -x "$dest/prometheus" && -x "$dest/promtool" ]]; then
    log "prometheus already installed in $dest (not on PATH?); nothing to do"
    exit 0
fi

for tool in apt-get dpkg; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "install_prometheus: $tool not found; this script needs a Debian/Ubuntu system" >&2
        exit 2
    fi
done

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# As root, apt downloads as its sandbox user _apt; let it write here (else: a harmless "unsandboxed" warning).
if [[ "$(id -u)" -eq 0 ]] && id _apt >/dev/null 2>&1; then
    chown _apt "$tmp"
fi

cd "$tmp"
log "downloading the Debian 'prometheus' package into $tmp"
if ! apt-get download prometheus; then
    log "download failed; running 'apt-get update' and retrying"
    apt-get update
    apt-get download prometheus
fi
deb="$(ls -1 "$tmp"/prometheus_*.deb | head -n 1)"
log "unpacking $(basename "$deb")"
dpkg -x "$deb" "$tmp/root"

mkdir -p "$dest"
for bin in prometheus promtool; do
    install -m 0755 "$tmp/root/usr/bin/$bin" "$dest/$bin"
    log "installed $dest/$bin"
done
"$dest/prometheus" --version 2>&1 | head -n 1
