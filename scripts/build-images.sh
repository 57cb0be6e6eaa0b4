#!/usr/bin/env bash
# Builds the Dockerfile's targets (full, slim, mlflow) with podman, or docker where podman is missing, tagged as
# the chart names them (image.repository:TAG, TAG-slim, TAG-mlflow), and prints each image's size and build time.
#
#   scripts/build-images.sh                       # every target, tag = the chart's appVersion
#   scripts/build-images.sh --targets slim        # one (or a comma-separated list)
#   scripts/build-images.sh --repository localhost/vision --tag 0.1.0
#
# The base is python:3.11.11-slim-bookworm where it can be pulled. Where no registry is reachable (these
# machines), the script makes an equivalent base from Debian's own packages instead: debootstrap bookworm
# (minbase) with python3 and python3-venv, pruned of docs, manuals, locales and apt lists, imported as
# localhost/vision-base:bookworm (made once, then reused; --rebuild-base makes it again).
# podman on hybrid-cgroup VMs needs the runc runtime and no default ulimits: the script points
# CONTAINERS_CONF at such a file (.tools/containers.conf) unless CONTAINERS_CONF is set already.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

TARGETS="slim,full,mlflow"
REPOSITORY="localhost/vision"
TAG="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' charts/vision-platform/Chart.yaml)"
PYTHON_IMAGE="python:3.11.11-slim-bookworm"
LOCAL_BASE="localhost/vision-base:bookworm"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
REBUILD_BASE=0
while [ $# -gt 0 ]; do
    case "$1" in
        --targets) TARGETS="$2"; shift 2 ;;
        --repository) REPOSITORY="$2"; shift 2 ;;
        --tag) TAG="$2"; shift 2 ;;
        --rebuild-base) REBUILD_BASE=1; shift ;;
        -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "build-images.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

if command -v podman >/dev/null; then
    ENGINE=podman
    if [ -z "${CONTAINERS_CONF:-}" ]; then
        mkdir -p .tools
        printf '[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = "runc"\n' > .tools/containers.conf
        export CONTAINERS_CONF="$ROOT/.tools/containers.conf"
    fi
elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    ENGINE=docker
else
    echo "build-images.sh: neither podman nor a working docker is installed (Debian: apt-get install podman buildah runc)" >&2
    exit 1
fi

# The base: the registry's python image, else one made here from Debian's packages.
if [ "$REBUILD_BASE" = 0 ] && $ENGINE image exists "$LOCAL_BASE" 2>/dev/null; then
    BASE="$LOCAL_BASE"
elif [ "$REBUILD_BASE" = 0 ] && timeout 60 $ENGINE pull -q "$PYTHON_IMAGE" >/dev/null 2>&1; then
    BASE="$PYTHON_IMAGE"
else
    command -v debootstrap >/dev/null || { echo "build-images.sh: $PYTHON_IMAGE cannot be pulled and debootstrap is not installed" >&2; exit 1; }
    started=$(date +%s)
    rootfs="$(mktemp -d)"
    trap 'rm -rf "$rootfs"' EXIT
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$DEBIAN_MIRROR" >/dev/null
    # The host's CA bundle: pip inside builds must trust what the host trusts (a TLS-inspecting proxy's CA).
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    ln -sf python3 "$rootfs/usr/bin/python"
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* \
        "$rootfs"/usr/share/info/* "$rootfs"/var/log/*
    find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} +
    tar -C "$rootfs" -c . | $ENGINE import --quiet \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
        --change 'CMD ["/bin/bash"]' - "$LOCAL_BASE" >/dev/null
    rm -rf "$rootfs"
    trap - EXIT
    echo "base $LOCAL_BASE made from Debian bookworm in $(( $(date +%s) - started )) s"
    BASE="$LOCAL_BASE"
fi

size_mb() { $ENGINE image inspect --format '{{.Size}}' "$1" | awk '{printf "%.0f", $1 / 1000000}'; }
echo "base: $BASE ($(size_mb "$BASE") MB)"
IFS=',' read -r -a targets <<< "$TARGETS"
for target in "${targets[@]}"; do
    case "$target" in
        full) image="$REPOSITORY:$TAG" ;;
        slim|mlflow) image="$REPOSITORY:$TAG-$target" ;;
        *) echo "build-images.sh: unknown target $target (full, slim, mlflow)" >&2; exit 2 ;;
    esac
    started=$(date +%s)
    $ENGINE build --quiet --build-arg "PYTHON_IMAGE=$BASE" --target "$target" -t "$image" -f Dockerfile . >/dev/null
    echo "$target: $image $(size_mb "$image") MB, built in $(( $(date +%s) - started )) s"
done
