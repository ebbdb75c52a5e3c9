#!/usr/bin/env bash
# Makes a minimal Debian bookworm image NAME (default sigil-base:bookworm) from Debian's
# packages, for machines where no image registry can be reached: the Sigil image, the demo
# workload and the test PostgreSQL are built FROM it (--build-arg BASE=NAME).
#   deploy/docker/make-base.sh [NAME]
# Needs root, debootstrap (installed from Debian's packages when missing) and Docker.
set -euo pipefail
NAME="${1:-sigil-base:bookworm}"
if docker image inspect "$NAME" >/dev/null 2>&1; then
  echo "$NAME exists"
  exit 0
fi
if ! command -v debootstrap >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap
fi
dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT
debootstrap --variant=minbase --include=ca-certificates bookworm "$dir" >/dev/null
# apt inside images built from this base: no recommends, no caches kept.
printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' > "$dir/etc/apt/apt.conf.d/90sigil"
rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/*
tar -C "$dir" -c . | docker import - "$NAME" >/dev/null
echo "made $NAME"
