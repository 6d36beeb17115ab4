# shellcheck shell=bash
# Shared by the image recipes (scripts/build-image, scripts/build-test-images); source it, do not
# run it. It keeps the recipes to what differs between images: how the root filesystem is made.
#
# Archives are cached under ${KASPR_CACHE_DIR:-$HOME/.cache/kaspr-packages-webhook}/images/ as
# <name>-<key>.tar, where <key> hashes everything the image is made from (the recipe, this file,
# the packer, the package hashes, the binary, the reference). A cached archive is reused as is;
# a new one is built in a staging directory beside it and renamed into place, so an interrupted
# or concurrent build never leaves a partial archive under the final name.

images_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
images_cache=${KASPR_CACHE_DIR:-$HOME/.cache/kaspr-packages-webhook}/images
images_packer=$images_repo/scripts/oci-pack.py

images_log() { printf '%s: %s\n' "$(basename "$0")" "$*" >&2; }
images_die() { images_log "error: $*"; exit 1; }

# Remove every staging directory this process created (their names carry its PID; $$ is the
# same in command substitutions), whatever way it exits.
images_cleanup() {
    local dir
    for dir in "$images_cache"/.staging-*-"$$"-*; do
        if [[ -d $dir ]]; then rm -rf --one-file-system -- "$dir"; fi
    done
}
trap images_cleanup EXIT

# images_key INPUT...: a short hash of the given strings plus the shared files above.
images_key() {
    {
        printf '%s\n' "$@"
        sha256sum "$images_repo/scripts/lib/images.sh" "$images_packer" | cut -d' ' -f1
    } | sha256sum | cut -c1-16
}

# images_stage NAME: create and print a fresh staging directory for NAME (removed on exit).
images_stage() {
    mkdir -p "$images_cache"
    mktemp -d "$images_cache/.staging-$1-$$-XXXXXX"
}

# images_lock NAME: serialise builders of the same image (released when the process exits).
images_lock() {
    mkdir -p "$images_cache"
    exec 8>"$images_cache/.$1.lock"
    flock -w 1800 8 || images_die "timed out waiting for another build of $1"
}

# images_ref ARCHIVE: the full image reference recorded in the archive's index.json.
images_ref() {
    python3 - "$1" <<'PY'
import json, sys, tarfile
with tarfile.open(sys.argv[1]) as tar:
    index = json.load(tar.extractfile("index.json"))
print(index["manifests"][0]["annotations"]["io.containerd.image.name"])
PY
}

# images_deb_uris PACKAGE...: apt's URI, file name, size and SHA256 of each package's candidate
# version, without downloading anything. Goes into cache keys: a new package version, a new key.
images_deb_uris() {
    apt-get download --print-uris "$@" | sort
}

# images_deb_extract DIR ROOTFS PACKAGE...: download the packages' .deb files into DIR with the
# machine's apt sources and unpack them into ROOTFS. Maintainer scripts do not run (there is no
# shell in the images); the recipes do by hand the little those scripts would have done.
images_deb_extract() {
    local dir=$1 rootfs=$2 deb
    shift 2
    local apt_opts=()
    # As root apt wants to download as _apt, which cannot write to a private staging directory.
    [[ $EUID -eq 0 ]] && apt_opts=(-o APT::Sandbox::User=root)
    (cd "$dir" && apt-get "${apt_opts[@]}" download -q "$@" >&2)
    mkdir -p "$rootfs"
    for deb in "$dir"/*.deb; do
        dpkg-deb -x "$deb" "$rootfs"
    done
}

# images_strip_docs ROOTFS: drop documentation, man pages, locales and lintian data, keeping
# each package's copyright file (the licences must travel with the binaries).
images_strip_docs() {
    local rootfs=$1
    rm -rf "$rootfs"/usr/share/{man,info,lintian,locale}
    if [[ -d $rootfs/usr/share/doc ]]; then
        local doc=$rootfs/usr/share/doc
        find "$doc" -mindepth 1 \( -type f -o -type l \) \
            \( ! -path "$doc/*/copyright" -o -path "$doc/*/*/*" \) -delete
        find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
    fi
}

# images_publish STAGED FINAL: move a finished archive into the cache under its final name.
# Same file system, so the rename is atomic.
images_publish() {
    mv -f -- "$1" "$2"
}

# images_copy ARCHIVE FILE: copy an archive to FILE (for --output), atomically as well.
images_copy() {
    local dest=$2 tmp
    mkdir -p "$(dirname "$dest")"
    tmp=$(mktemp "$(dirname "$dest")/.$(basename "$dest").XXXXXX")
    if ! { cp -- "$1" "$tmp" && chmod 0644 "$tmp" && mv -f -- "$tmp" "$dest"; }; then
        rm -f -- "$tmp"
        return 1
    fi
}
