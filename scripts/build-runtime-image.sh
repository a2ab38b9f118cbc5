#!/usr/bin/env bash
# Builds skyvault's runtime image (runtime.Dockerfile) on a machine that reaches no image registry
# and, from inside a build, no package index:
#
#   1. the base image (SKYVAULT_BASE_IMAGE, default skyvault/base:bookworm-pg) is made from Debian
#      packages with debootstrap and `docker import` when the engine does not have it yet;
#   2. the locked wheels (uv.lock, plus uv and the build backend) are downloaded on this machine
#      into <cache>/wheels/<lock hash>/ once;
#   3. the image is built with BASE_IMAGE and PIP_OPTIONS="--no-index --find-links <that folder,
#      served on 127.0.0.1 for the build>", and labelled with a hash of its inputs: an image whose
#      label matches is not built again.
#
# Prints the image tag on stdout; progress goes to stderr.
#
# Environment: SKYVAULT_IMAGE (default skyvault/runtime:dev), SKYVAULT_BASE_IMAGE,
# SKYVAULT_CACHE_DIR (default skyvault-data/cache), DEBIAN_MIRROR (default: the machine's apt
# source), PYTHON (a Python with pip and uv for the downloads, default python3), VENV_PYTHON (one
# with `packaging`, default .venv/bin/python), DOCKER_HOST (the engine).
# Needs root for debootstrap. In production build from the index instead:
#   docker build -f runtime.Dockerfile -t registry.example.org/skyvault/runtime:1.0.0 .
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
image=${SKYVAULT_IMAGE:-skyvault/runtime:dev}
base=${SKYVAULT_BASE_IMAGE:-skyvault/base:bookworm-pg}
cache=${SKYVAULT_CACHE_DIR:-$repo/skyvault-data/cache}
python=${PYTHON:-python3}
venv_python=${VENV_PYTHON:-$repo/.venv/bin/python}
uv_version=$(sed -n 's/^UV_VERSION := //p' Makefile)
log() { echo "build-runtime-image: $*" >&2; }
die() { log "$*"; exit 1; }

docker info >/dev/null 2>&1 || die "no Docker engine answers (DOCKER_HOST=${DOCKER_HOST:-default})"
"$python" -m uv --version >/dev/null 2>&1 && "$python" -m pip --version >/dev/null 2>&1 \
  || die "$python has no pip or no uv: set PYTHON to an interpreter with both (make setup-python installs uv)"
mkdir -p "$cache"

debian_mirror() {
  if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
  local uri
  uri=$(grep -hE '^(URIs:|deb )' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
        | grep -v security | head -n1 | awk '{print ($1 == "deb") ? $2 : $2}')
  echo "${uri:-http://deb.debian.org/debian}"
}

# --- 1. the base image -------------------------------------------------------------------------
if ! docker image inspect "$base" >/dev/null 2>&1; then
  command -v debootstrap >/dev/null || die "debootstrap is missing: run scripts/setup-system.sh"
  [ "$(id -u)" = 0 ] || die "making the base image $base needs root (debootstrap)"
  rootfs=$(mktemp -d "$cache/rootfs.XXXXXX")
  trap 'rm -rf "$rootfs"' EXIT
  mirror=$(debian_mirror)
  log "making $base from Debian bookworm ($mirror); takes a few minutes"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,postgresql-client \
    bookworm "$rootfs" "$mirror" >"$cache/debootstrap.log" 2>&1 \
    || die "debootstrap failed; see $cache/debootstrap.log"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | docker import \
    -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    -c 'ENV LANG=C.UTF-8' -c 'CMD ["/bin/bash"]' - "$base" >/dev/null
  rm -rf "$rootfs"
  trap - EXIT
fi
base_id=$(docker image inspect --format '{{.Id}}' "$base")

# --- 2. the wheels -------------------------------------------------------------------------------
# The lock's markers are evaluated for the base image's interpreter (its Python may be an older
# patch release than this machine's), so the folder holds exactly what the image installs.
target_env=$(docker run --rm --network none "$base" python3 -c '
import json, os, platform, sys
i = sys.implementation
print(json.dumps({
    "implementation_name": i.name,
    "implementation_version": "%d.%d.%d" % i.version[:3],
    "os_name": os.name, "platform_machine": platform.machine(),
    "platform_release": platform.release(), "platform_system": platform.system(),
    "platform_version": platform.version(), "python_full_version": platform.python_version(),
    "platform_python_implementation": platform.python_implementation(),
    "python_version": ".".join(platform.python_version_tuple()[:2]), "sys_platform": sys.platform,
}))')
lock_hash=$( { cat uv.lock pyproject.toml; echo "$target_env"; } | sha256sum | cut -c1-16)
wheels="$cache/wheels/$lock_hash"
if [ ! -f "$wheels/.complete" ]; then
  log "downloading the locked wheels into $wheels"
  rm -rf "$wheels.part" && mkdir -p "$wheels.part"
  "$python" -m uv export --frozen --no-dev --no-emit-project --format requirements-txt \
    -o "$wheels.part/requirements.txt" >/dev/null
  TARGET_ENV="$target_env" "$venv_python" - "$wheels.part/requirements.txt" "$wheels.part/target.txt" <<'PY'
import json, os, re, sys
from packaging.requirements import Requirement
env = json.loads(os.environ["TARGET_ENV"])
text = open(sys.argv[1], encoding="utf-8").read().replace("\\\n", " ")
out = []
for line in text.splitlines():
    line = line.strip()
    if not line or line.startswith("#"):
        continue
    spec, *hashes = re.split(r"\s+(?=--hash=)", line)
    requirement = Requirement(spec)
    if requirement.marker is None or requirement.marker.evaluate(env):
        requirement.marker = None
        out.append(" ".join([str(requirement), *hashes]))
open(sys.argv[2], "w", encoding="utf-8").write("\n".join(out) + "\n")
PY
  # wheels wherever the lock has one; a package published only as an sdist (version-parser) is
  # fetched as such and built in the image, with setuptools and wheel from the same folder
  "$python" -m pip download --quiet --prefer-binary --require-hashes --no-deps \
    -r "$wheels.part/target.txt" -d "$wheels.part" >&2
  "$python" -m pip download --quiet --only-binary=:all: "uv==$uv_version" hatchling setuptools wheel \
    -d "$wheels.part" >&2
  touch "$wheels.part/.complete"
  rm -rf "$wheels" && mv "$wheels.part" "$wheels"
fi

# --- 3. the image --------------------------------------------------------------------------------
inputs=$( { echo "$base_id"; cat runtime.Dockerfile .dockerignore pyproject.toml uv.lock README.md;
            find skyvault -name '*.py' -type f | LC_ALL=C sort | xargs cat; } | sha256sum | cut -c1-32)
if [ "$(docker image inspect --format '{{index .Config.Labels "org.skyvault.inputs"}}' "$image" 2>/dev/null)" \
     = "$inputs" ]; then
  log "$image is up to date"
  echo "$image"
  exit 0
fi

port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$python" -m http.server --bind 127.0.0.1 --directory "$wheels" "$port" >/dev/null 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
for _ in $(seq 50); do
  "$python" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/')" 2>/dev/null && break
  sleep 0.2
done
log "building $image on $base"
DOCKER_BUILDKIT=0 docker build --network host --quiet=false -f runtime.Dockerfile \
  --build-arg "BASE_IMAGE=$base" \
  --build-arg "UV_VERSION=$uv_version" \
  --build-arg "PIP_OPTIONS=--no-index --find-links http://127.0.0.1:$port/ --trusted-host 127.0.0.1" \
  --label "org.skyvault.inputs=$inputs" \
  -t "$image" . >&2
echo "$image"
