#!/usr/bin/env bash
# Downloads the pinned emoji artwork and wallpapers that tools/emoji10/generate.py renders from,
# into target/emoji10-assets (nothing is installed). Needs apt-get (Debian bookworm sources),
# npm and dpkg-deb. Idempotent: a package already unpacked with the right checksum is kept.
# Usage: tools/emoji10/fetch-assets.sh [ASSET_DIR]   (run from the repository root)
set -euo pipefail
assets="${1:-target/emoji10-assets}"
mkdir -p "$assets/dl"
cd "$assets"

# name  version  sha256 of the downloaded file
DEB_PACKAGES=(
    "fonts-noto-color-emoji 2.042-0+deb12u1 a5ab0f69c7938423862320d9aca5dd187b3fd879d6a9a57dd52e17c3fa8d2751"
    "gnome-backgrounds 43.1-1 a670dea21572652127d6e55f9cdb3a226d0037854fdbfd037003c7d00ee0dc4e"
)
NPM_PACKAGES=(
    "@twemoji/svg 15.0.0 1d2907557a422c7c4e3feca50ef915c39da1db3d76b4a4d7e73fb59bce4403c3"
    "openmoji 17.0.0 55ee7d13485dec86e9f38c1f3a645a13382d33ff97c0cd845ee824b0aef45e68"
)

check() {  # FILE SHA256
    local got
    got=$(sha256sum "$1" | cut -d' ' -f1)
    if [ "$got" != "$2" ]; then
        echo "checksum mismatch for $1: got $got, expected $2" >&2
        exit 1
    fi
}

for entry in "${DEB_PACKAGES[@]}"; do
    read -r name version sha <<<"$entry"
    file="dl/${name}_${version//:/%3a}_all.deb"
    if [ ! -f "$file" ]; then
        (cd dl && apt-get download -q "$name=$version")
    fi
    check "$file" "$sha"
    if [ ! -f "$name/.unpacked-$sha" ]; then
        rm -rf "$name"
        dpkg-deb -x "$file" "$name"
        touch "$name/.unpacked-$sha"
    fi
done

for entry in "${NPM_PACKAGES[@]}"; do
    read -r name version sha <<<"$entry"
    base="${name#@}"; base="${base//\//-}"
    file="dl/$base-$version.tgz"
    dir="npm-$base"
    if [ ! -f "$file" ]; then
        (cd dl && npm pack --silent "$name@$version" >/dev/null)
    fi
    check "$file" "$sha"
    if [ ! -f "$dir/.unpacked-$sha" ]; then
        rm -rf "$dir"
        mkdir -p "$dir"
        tar -xzf "$file" -C "$dir"
        touch "$dir/.unpacked-$sha"
    fi
done
echo "assets ready in $assets"
