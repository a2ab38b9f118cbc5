#!/usr/bin/env bash
# Installs the Debian packages skyvault's tests and benchmarks need, when they are missing.
set -euo pipefail
need=()
command -v gdal_translate >/dev/null 2>&1 || need+=(gdal-bin)
command -v mkfs.ext4 >/dev/null 2>&1 || need+=(e2fsprogs)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup-system: need root to install ${need[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
