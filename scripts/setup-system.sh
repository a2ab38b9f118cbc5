#!/usr/bin/env bash
# Installs the Debian packages skyvault's tests and benchmarks need, when they are missing.
# docker.io's service is not started: the end-to-end test runs an engine of its own.
set -euo pipefail
need=()
command -v gdal_translate >/dev/null 2>&1 || need+=(gdal-bin)
command -v mkfs.ext4 >/dev/null 2>&1 || need+=(e2fsprogs)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need+=(postgresql)
# pgstac catalogs: PostGIS for the default PostgreSQL (pg_dump/pg_restore come with postgresql)
compgen -G "/usr/share/postgresql/*/extension/postgis.control" >/dev/null || need+=(postgresql-postgis)
# the Docker end-to-end test: an engine it starts itself, and a base image made from Debian packages
command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
# the map page: its library is downloaded from the npm registry, its test runs a headless browser
command -v curl >/dev/null 2>&1 || need+=(curl ca-certificates)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup-system: need root to install ${need[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
