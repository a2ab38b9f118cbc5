#!/usr/bin/env bash
# Puts the map page's JavaScript library (Leaflet, from the npm registry) where the gateway serves
# it: skyvault/gateway/static/vendor/leaflet/ (git-ignored). The tarball's sha512 must match the
# integrity the registry published for this version; nothing is loaded from a CDN at run time.
# NPM_REGISTRY names a mirror of registry.npmjs.org. Does nothing when the version is in place.
set -euo pipefail
LEAFLET_VERSION=1.9.4
LEAFLET_INTEGRITY="sha512-nxS1ynzJOmOlHp+iL3FyWqK89GtNL8U8rvlMOsQdTTssxZwCXh8N2NB3GDQOL+YR3XnWyZAxwQixURb+FA74PA=="
REGISTRY="${NPM_REGISTRY:-https://registry.npmjs.org}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$here/skyvault/gateway/static/vendor/leaflet"
stamp="$dest/VERSION"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$LEAFLET_VERSION" ] && [ -f "$dest/leaflet.js" ]; then
  exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
url="$REGISTRY/leaflet/-/leaflet-$LEAFLET_VERSION.tgz"
if command -v curl >/dev/null 2>&1; then
  curl --fail --silent --show-error --location --retry 3 --output "$work/leaflet.tgz" "$url"
else  # a minimal system without curl (make setup-system installs it)
  python3 -c 'import shutil, sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=60) as r, open(sys.argv[2], "wb") as f:
    shutil.copyfileobj(r, f)' "$url" "$work/leaflet.tgz"
fi
got="sha512-$(python3 -c 'import base64, hashlib, sys
print(base64.b64encode(hashlib.sha512(open(sys.argv[1], "rb").read()).digest()).decode())' "$work/leaflet.tgz")"
if [ "$got" != "$LEAFLET_INTEGRITY" ]; then
  echo "fetch-web-assets: $url has integrity $got, expected $LEAFLET_INTEGRITY; not installed" >&2
  exit 1
fi
tar -xzf "$work/leaflet.tgz" -C "$work"
rm -rf "$dest.new"
mkdir -p "$dest.new"
cp "$work/package/dist/leaflet.js" "$work/package/dist/leaflet.css" "$work/package/LICENSE" "$dest.new/"
cp -r "$work/package/dist/images" "$dest.new/images"
echo "$LEAFLET_VERSION" > "$dest.new/VERSION"
rm -rf "$dest"
mv "$dest.new" "$dest"
echo "fetch-web-assets: Leaflet $LEAFLET_VERSION in $dest"
