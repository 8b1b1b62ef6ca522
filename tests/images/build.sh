#!/usr/bin/env bash
# Build RunPilot's two local test images from this Debian machine's own packages, with no image registry:
#   runpilot-test-busybox:latest  busybox-static with its applets, /etc/passwd (root, nobody), /tmp, /workspace
#   runpilot-test-python:latest   Debian's python3 with the full standard library (precompiled) plus busybox
#
# Usage: tests/images/build.sh [--force] ENGINE...      ENGINE is docker or podman
#
# An engine whose two images already carry this script's recipe label is skipped (about 0.2 s), unless --force.
# The root file systems are built once and cached as tarballs under $RUNPILOT_IMAGE_CACHE
# (default /var/cache/runpilot-test-images), keyed by this script's hash, so a second engine or a rerun only
# imports them. Needs root (chroot, package extraction), busybox-static, and apt package lists for python3's
# dependencies (it runs apt-get update itself when they are missing). How and why: shared/notes/container-engines.md.
set -euo pipefail

readonly BUSYBOX_IMAGE=runpilot-test-busybox:latest
readonly PYTHON_IMAGE=runpilot-test-python:latest
readonly CACHE_DIR="${RUNPILOT_IMAGE_CACHE:-/var/cache/runpilot-test-images}"
readonly IMAGE_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
readonly RECIPE_LABEL=io.runpilot.test-image.recipe
# Changing this script changes the recipe, which rebuilds the cached tarballs and re-imports the images.
RECIPE="$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)"
readonly RECIPE
# Packages in python3's dependency closure that only serve dpkg, perl or debconf, never python at run time.
readonly EXCLUDED_PACKAGES='^(dpkg|install-info|tar|debconf.*|cdebconf.*|perl|perl-.*|libperl.*|libgdbm-compat4|mailcap|mime-support)$'
readonly PYTHON_CHECK='import json, dataclasses, shutil, random, math, signal, time, sqlite3, ssl, zlib; print("ok")'

log() { printf 'build.sh: %s\n' "$*"; }
die() {
    printf 'build.sh: error: %s\n' "$*" >&2
    exit 1
}

# ==== engines and images ====

image_recipe() {
    "$1" image inspect --format "{{index .Config.Labels \"$RECIPE_LABEL\"}}" "$2" 2>/dev/null || true
}

images_current() {
    local engine="$1" image
    for image in "$BUSYBOX_IMAGE" "$PYTHON_IMAGE"; do
        [[ "$(image_recipe "$engine" "$image")" == "$RECIPE" ]] || return 1
    done
}

import_image() {
    local engine="$1" tarball="$2" image="$3" old new quiet=()
    old="$("$engine" image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)"
    [[ "$engine" == podman ]] && quiet=(--quiet)  # docker import (20.10) has no -q; podman's progress is noise
    "$engine" import "${quiet[@]}" \
        --change "ENV PATH=$IMAGE_PATH" \
        --change 'CMD ["/bin/sh"]' \
        --change "LABEL $RECIPE_LABEL=$RECIPE" \
        "$tarball" "$image" >/dev/null
    new="$("$engine" image inspect --format '{{.Id}}' "$image")"
    log "$engine: imported $image ($new)"
    if [[ -n "$old" && "$old" != "$new" ]]; then
        # Best effort: a stopped container may still use the old image.
        "$engine" rmi "$old" >/dev/null 2>&1 || true
    fi
}

smoke_test() {
    local engine="$1" run=("$1" run --rm --pull never --network none) out
    out="$("${run[@]}" "$BUSYBOX_IMAGE" sh -c 'id -un; test -d /workspace && test -k /tmp && echo ok')"
    [[ "$out" == $'root\nok' ]] || die "$engine: $BUSYBOX_IMAGE smoke test printed: $out"
    out="$("${run[@]}" "$PYTHON_IMAGE" python -c "$PYTHON_CHECK")"
    [[ "$out" == ok ]] || die "$engine: $PYTHON_IMAGE smoke test printed: $out"
    log "$engine: both images run"
}

# ==== root file systems ====

add_base_files() {
    local root="$1"
    mkdir -p "$root"/{etc,root,workspace,dev,proc,sys} "$root/tmp"
    chmod 1777 "$root/tmp"
    printf '%s\n' 'root:x:0:0:root:/root:/bin/sh' 'nobody:x:65534:65534:nobody:/nonexistent:/bin/false' \
        >"$root/etc/passwd"
    printf '%s\n' 'root:x:0:' 'nogroup:x:65534:' >"$root/etc/group"
}

# Copy busybox into ROOT and link each applet that ROOT does not already provide.
add_busybox() {
    local root="$1" applet
    mkdir -p "$root/bin"
    cp /bin/busybox "$root/bin/busybox"
    while read -r applet; do
        [[ -e "$root/$applet" || -L "$root/$applet" ]] && continue
        mkdir -p "$root/$(dirname "$applet")"
        ln -s /bin/busybox "$root/$applet"
    done < <(/bin/busybox --list-full)
}

build_busybox_rootfs() {
    local root="$1"
    add_busybox "$root"
    add_base_files "$root"
}

python_packages() {
    apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks --no-replaces \
        --no-enhances python3 | grep -v '^ ' | grep -v '^<' | sort -u | grep -Ev "$EXCLUDED_PACKAGES"
}

download_python_packages() {
    local dir="$1" packages
    if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
        log "no apt package lists: running apt-get update"
        apt-get update -q
    fi
    mapfile -t packages < <(python_packages)
    [[ ${#packages[@]} -gt 5 ]] || die "apt-cache found too few python3 dependencies: ${packages[*]}"
    # apt downloads as the unprivileged _apt user when it can reach and write the folder (else it warns).
    chmod 755 "$(dirname "$dir")"
    chown _apt "$dir" 2>/dev/null || true
    if ! (cd "$dir" && apt-get download -q "${packages[@]}"); then
        log "download failed, refreshing the package lists once"
        apt-get update -q
        (cd "$dir" && apt-get download -q "${packages[@]}")
    fi
}

build_python_rootfs() {
    local root="$1" debs="$2" deb stdlib
    download_python_packages "$debs"
    for deb in "$debs"/*.deb; do
        dpkg-deb -x "$deb" "$root"
    done
    rm -rf "$root"/usr/share/{doc,man,info,lintian,locale}
    add_busybox "$root"
    add_base_files "$root"
    ln -sf python3 "$root/usr/bin/python"
    ldconfig -r "$root"
    # Precompile with the image's own interpreter, serially (parallel workers are slower on 2 cores).
    for stdlib in "$root"/usr/lib/python3.[0-9]*; do
        chroot "$root" /usr/bin/python3 -m compileall -q "${stdlib#"$root"}" >/dev/null
    done
    chroot "$root" /usr/bin/python3 -c "$PYTHON_CHECK" >/dev/null
}

# Print the path of NAME's cached tarball, building it with BUILDER first when it is missing.
cached_tarball() {
    local name="$1" builder="$2" tarball="$CACHE_DIR/$1-$RECIPE.tar" work started
    if [[ ! -f "$tarball" ]]; then
        started=$SECONDS
        work="$(mktemp -d "$CACHE_DIR/.build-$name.XXXXXX")"
        mkdir "$work/root" "$work/debs"
        "$builder" "$work/root" "$work/debs" >&2
        tar --numeric-owner --sort=name -C "$work/root" -cf "$tarball.tmp" .
        mv "$tarball.tmp" "$tarball"
        rm -rf "$work"
        log "built $tarball ($(du -h "$tarball" | cut -f1), $((SECONDS - started)) s)" >&2
    fi
    echo "$tarball"
}

# ==== main ====

main() {
    local force=0 engines=() engine busybox_tar python_tar
    for arg in "$@"; do
        case "$arg" in
            --force) force=1 ;;
            docker | podman) engines+=("$arg") ;;
            *) die "unknown argument '$arg' (usage: build.sh [--force] docker|podman...)" ;;
        esac
    done
    [[ ${#engines[@]} -gt 0 ]] || die "usage: build.sh [--force] docker|podman..."
    [[ $(id -u) -eq 0 ]] || die "run as root (chroot and package extraction need it)"

    local todo=()
    for engine in "${engines[@]}"; do
        command -v "$engine" >/dev/null || die "$engine not installed (run .ci/run --setup-only)"
        if [[ $force -eq 0 ]] && images_current "$engine"; then
            log "$engine: $BUSYBOX_IMAGE and $PYTHON_IMAGE are current (recipe $RECIPE), skipped"
        else
            todo+=("$engine")
        fi
    done
    [[ ${#todo[@]} -gt 0 ]] || return 0

    mkdir -p "$CACHE_DIR"
    exec 9>"$CACHE_DIR/.lock"
    flock 9  # two builds at once would race on the cache
    if [[ $force -eq 1 ]]; then
        rm -f "$CACHE_DIR"/*.tar
    fi
    rm -rf "$CACHE_DIR"/.build-* "$CACHE_DIR"/*.tar.tmp
    find "$CACHE_DIR" -maxdepth 1 -name '*.tar' ! -name "*-$RECIPE.tar" -delete  # other recipes' tarballs
    busybox_tar="$(cached_tarball busybox build_busybox_rootfs)"
    python_tar="$(cached_tarball python build_python_rootfs)"
    for engine in "${todo[@]}"; do
        import_image "$engine" "$busybox_tar" "$BUSYBOX_IMAGE"
        import_image "$engine" "$python_tar" "$PYTHON_IMAGE"
        smoke_test "$engine"
    done
}

main "$@"
