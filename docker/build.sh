#!/usr/bin/env bash
# `make image`: the Debian 12 base (made locally once when no registry is reachable), then the image.
#
#   docker/build.sh                      # ct-zeroshot:<version> on ct-zeroshot-base:bookworm
#   BASE=debian:bookworm-slim docker/build.sh   # where Docker Hub is reachable
#
# Variables: IMAGE (tag), BASE (base image; ct-zeroshot-base:* is made with debootstrap when absent),
# DOCKER (client; default: one that has BuildKit), TORCH_WHEEL_DIR (a folder with the CPU torch wheel;
# default /opt/wheels when it has one, else download.pytorch.org), PIP_CERT_FILE (pip's CA bundle for a
# proxy; default: pip's configured `cert`; passed as a build secret, never stored in the image).
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' operators/__init__.py)
IMAGE=${IMAGE:-ct-zeroshot:$version}
BASE=${BASE:-ct-zeroshot-base:bookworm}
if [[ -z "${DOCKER:-}" ]]; then
    # BuildKit (secrets, bind mounts) needs buildx on Docker >= 23; Debian's 20.10 client has it built in.
    if docker buildx version >/dev/null 2>&1; then DOCKER=docker; else DOCKER=/usr/bin/docker; fi
fi
say() { echo "[image] $*" >&2; }

if ! $DOCKER image inspect "$BASE" >/dev/null 2>&1 && [[ "$BASE" == ct-zeroshot-base:* ]]; then
    say "making the base $BASE with debootstrap (about a minute)"
    root=$(mktemp -d)
    trap 'rm -rf "$root"' EXIT
    debootstrap --variant=minbase bookworm "$root/rootfs" http://deb.debian.org/debian >"$root/log" 2>&1 \
        || { tail -20 "$root/log" >&2; exit 1; }
    tar -C "$root/rootfs" -c . | $DOCKER import -m "debootstrap --variant=minbase bookworm" - "$BASE" >/dev/null
fi

torch_index=https://download.pytorch.org/whl/cpu
rm -f docker/wheels/*.whl
wheel_dir=${TORCH_WHEEL_DIR:-/opt/wheels}
shopt -s nullglob
wheels=("$wheel_dir"/torch-2.13.0+cpu-*.whl)
if (( ${#wheels[@]} )); then
    say "torch: the local CPU wheel ${wheels[0]##*/}"
    cp "${wheels[0]}" docker/wheels/
    torch_index=""
fi

secret=()
cert=${PIP_CERT_FILE:-${PIP_CERT:-$(pip config list 2>/dev/null | sed -n "s/^[^=]*\.cert='\(.*\)'$/\1/p" | head -1)}}
if [[ -n "$cert" && -f "$cert" ]]; then secret=(--secret "id=pip_cert,src=$cert"); fi

say "building $IMAGE on $BASE with $DOCKER"
start=$(date +%s)
DOCKER_BUILDKIT=1 $DOCKER build --network host --progress plain -f docker/Dockerfile -t "$IMAGE" \
    --build-arg "BASE=$BASE" --build-arg "TORCH_INDEX=$torch_index" "${secret[@]}" .
rm -f docker/wheels/*.whl
size=$($DOCKER image inspect -f '{{.Size}}' "$IMAGE")
say "built $IMAGE in $(( $(date +%s) - start )) s: $(( size / 1000000 )) MB"

# The PACS of the containerised pipeline (docker/pacs/): Debian's Orthanc on the same base.
ORTHANC_IMAGE=${ORTHANC_IMAGE:-ct-zeroshot-orthanc:$version}
DOCKER_BUILDKIT=1 $DOCKER build --network host --progress plain -f docker/pacs/Dockerfile.orthanc \
    -t "$ORTHANC_IMAGE" --build-arg "BASE=$BASE" docker/pacs
say "built $ORTHANC_IMAGE"

# The viewer of the pipeline: OHIF's prebuilt dist/ from npm (integrity checked by npm against the
# registry's digest), served by Debian's nginx on the same base.
OHIF_VERSION=${OHIF_VERSION:-3.13.2}
ohif=docker/viewer/ohif
if [[ "$(cat "$ohif/VERSION" 2>/dev/null)" != "$OHIF_VERSION" || ! -f "$ohif/dist/index.html" ]]; then
    say "fetching @ohif/app@$OHIF_VERSION from npm"
    command -v npm >/dev/null || { say "npm (with Node.js) is needed for the viewer image"; exit 1; }
    rm -rf "$ohif" && mkdir -p "$ohif/pack"
    npm pack --silent "@ohif/app@$OHIF_VERSION" --pack-destination "$ohif/pack" >/dev/null
    tar -xzf "$ohif"/pack/ohif-app-*.tgz -C "$ohif/pack"
    mv "$ohif/pack/package/dist" "$ohif/dist" && rm -rf "$ohif/pack"
    echo "$OHIF_VERSION" >"$ohif/VERSION"
fi
VIEWER_IMAGE=${VIEWER_IMAGE:-ct-zeroshot-viewer:$version}
DOCKER_BUILDKIT=1 $DOCKER build --network host --progress plain -f docker/viewer/Dockerfile \
    -t "$VIEWER_IMAGE" --build-arg "BASE=$BASE" docker/viewer
say "built $VIEWER_IMAGE (OHIF $OHIF_VERSION)"
