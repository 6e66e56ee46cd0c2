#!/usr/bin/env bash
# A base image made from Debian's packages alone, for machines that reach Debian's mirror but no
# container registry (python:3.11-slim cannot be pulled there). Debian bookworm, minbase, with
# python3 (3.11), python3-venv and ca-certificates: what deploy/Dockerfile needs of PYTHON_IMAGE.
#
#   deploy/local-base.sh [IMAGE] [extra packages...]     (root; needs mmdebstrap and podman)
#   make image PYTHON_IMAGE=localhost/atlas-base:bookworm ...
#
# tests/deploy/test_image.py builds it when it is missing, and a Redis image on top of it.
set -euo pipefail

image="${1:-localhost/atlas-base:bookworm}"
shift || true
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

packages="python3,python3-venv,ca-certificates"
for p in "$@"; do packages="$packages,$p"; done

# No recommends (they bring perl), no documentation, manual pages or translations: ~90 MB less.
mmdebstrap --variant=minbase --mode=root --include="$packages" \
  --aptopt='APT::Install-Recommends "false"' \
  --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/info/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
  bookworm "$tmp/rootfs.tar" "$mirror"

podman import --change 'CMD ["/bin/bash"]' "$tmp/rootfs.tar" "$image" >/dev/null
podman image inspect --format '{{.Id}} {{.Size}}' "$image"
