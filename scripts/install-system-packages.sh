#!/usr/bin/env bash
# Debian packages the project needs: the servers, and the peers (DIALS, cctbx) the tests cross-check against.
set -euo pipefail
packages=(redis-server rabbitmq-server python3-dials dials python3-cctbx)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
