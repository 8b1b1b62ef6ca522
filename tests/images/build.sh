#!/usr/bin/env bash
# Build RunPilot's local test images from this Debian machine's own packages, with no image registry:
#   runpilot-test-busybox:latest  busybox-static with its applets, /etc/passwd (root, nobody), /tmp, /workspace
#   runpilot-test-python:latest   Debian's python3 with the full standard library (precompiled) plus busybox
#   runpilot-test-pytorch:latest  (only with --pytorch) the python image plus the CPU build of torch, installed
#                                 by pip, and the C++ runtime libraries torch needs
#
# Usage: tests/images/build.sh [--force] [--pytorch] ENGINE...      ENGINE is docker or podman
#
# An engine whose images already carry this script's recipe label is skipped (about 0.2 s), unless --force.
# The root file systems are built once and cached as tarballs under $RUNPILOT_IMAGE_CACHE
# (default /var/cache/runpilot-test-images), keyed by this script's hash, so a second engine or a rerun only
# imports them; pip's torch install is cached there too, keyed by what was asked of pip. Needs root (chroot,
# package extraction), busybox-static, and apt package lists for python3's dependencies (it runs apt-get update
# itself when they are missing); --pytorch also needs the host's `python3 -m pip` and a torch wheel it can find.
# The facts these steps rely on: tests/images/README.md.
#
# Exit status: 0 every image asked for is built and current; 1 an error; 3 (only with --pytorch) the busybox and
# python images are fine but torch could not be installed: the reason is printed and kept in
# $RUNPILOT_IMAGE_CACHE/pytorch-unavailable.txt, where tests/test_pytorch.py reads it to say why it skips.
set -euo pipefail
shopt -s inherit_errexit  # a failure inside $(...) fails the assignment, and so the script

readonly BUSYBOX_IMAGE=runpilot-test-busybox:latest
readonly PYTHON_IMAGE=runpilot-test-python:latest
readonly PYTORCH_IMAGE=runpilot-test-pytorch:latest
readonly CACHE_DIR="${RUNPILOT_IMAGE_CACHE:-/var/cache/runpilot-test-images}"
readonly IMAGE_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
readonly RECIPE_LABEL=io.runpilot.test-image.recipe
# Changing this script changes the recipe, which rebuilds the cached tarballs and re-imports the images.
RECIPE="$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)"
readonly RECIPE
# Packages in python3's dependency closure that only serve dpkg, perl or debconf, never python at run time.
readonly EXCLUDED_PACKAGES='^(dpkg|install-info|tar|debconf.*|cdebconf.*|perl|perl-.*|libperl.*|libgdbm-compat4|mailcap|mime-support)$'
readonly PYTHON_CHECK='import json, dataclasses, shutil, random, math, signal, time, sqlite3, ssl, zlib; print("ok")'
# The torch wheel: a CPU build lies in pip's configured local files on these machines (pip.conf find-links).
# numpy too, as in PyTorch's own images: without it every `import torch` warns "Failed to initialize NumPy".
readonly TORCH_REQUIREMENTS=(torch==2.13.0 numpy)
# torch's C extension needs these shared libraries, which python3's dependency closure lacks (libgcc-s1 comes with
# libc6 today; named so that a change there cannot break torch).
readonly TORCH_LIB_PACKAGES=(libstdc++6 libgomp1 libgcc-s1)
# Imports torch and its DataLoader, and multiplies on the CPU: the C extension and its libraries load.
readonly TORCH_CHECK='import numpy, torch, torch.utils.data; x = torch.from_numpy(numpy.ones((2, 2))); print("ok" if (x @ x).sum().item() == 8 else "bad")'
readonly TORCH_UNAVAILABLE="$CACHE_DIR/pytorch-unavailable.txt"
readonly TORCH_PIP_LOG="$CACHE_DIR/pytorch-pip.log"
readonly EXIT_NO_TORCH=3

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

pytorch_current() {
    [[ "$(image_recipe "$1" "$PYTORCH_IMAGE")" == "$RECIPE" ]]
}

smoke_test() {
    local engine="$1" run=("$1" run --rm --pull never --network none) out
    out="$("${run[@]}" "$BUSYBOX_IMAGE" sh -c 'id -un; test -d /workspace && test -k /tmp && echo ok')"
    [[ "$out" == $'root\nok' ]] || die "$engine: $BUSYBOX_IMAGE smoke test printed: $out"
    out="$("${run[@]}" "$PYTHON_IMAGE" python -c "$PYTHON_CHECK")"
    [[ "$out" == ok ]] || die "$engine: $PYTHON_IMAGE smoke test printed: $out"
    log "$engine: both images run"
}

pytorch_smoke_test() {
    local engine="$1" out
    out="$("$engine" run --rm --pull never --network none "$PYTORCH_IMAGE" python -c "$TORCH_CHECK")"
    [[ "$out" == ok ]] || die "$engine: $PYTORCH_IMAGE smoke test printed: $out"
    log "$engine: $PYTORCH_IMAGE runs torch"
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

ensure_apt_lists() {
    if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
        log "no apt package lists: running apt-get update"
        apt-get update -q
    fi
}

download_python_packages() {
    local dir="$1" packages
    ensure_apt_lists
    mapfile -t packages < <(python_packages)
    [[ ${#packages[@]} -gt 5 ]] || die "apt-cache found too few python3 dependencies: ${packages[*]}"
    download_packages "$dir" "${packages[@]}"
}

# Download the .deb files of PACKAGES into DIR (apt's package lists must exist).
download_packages() {
    local dir="$1" packages=("${@:2}")
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

# The python root file system (tarball PYTHON_TAR) plus torch's libraries and the torch install in TORCH_SITE, a
# pip --target folder, as Debian's own packages would lay it out: /usr/lib/python3/dist-packages is on Debian
# python's sys.path (/usr/local/lib/python3.X/dist-packages is not, in this image), so no PYTHONPATH is needed, and
# a job that sets its own PYTHONPATH still finds torch.
build_pytorch_rootfs() {
    local root="$1" debs="$2" python_tar="$3" torch_site="$4" deb script
    tar -C "$root" -xf "$python_tar"
    ensure_apt_lists
    download_packages "$debs" "${TORCH_LIB_PACKAGES[@]}"
    for deb in "$debs"/*.deb; do
        dpkg-deb -x "$deb" "$root"
    done
    rm -rf "$root"/usr/share/{doc,man,info,lintian,locale}
    tar -C "$torch_site" --exclude=./bin --exclude=./share -cf - . | tar -C "$root/usr/lib/python3/dist-packages" -xf -
    # pip's console scripts (torchrun, ...) name the host's interpreter; point them at the image's.
    mkdir -p "$root/usr/local/bin"
    for script in "$torch_site"/bin/*; do
        [[ -f "$script" ]] || continue
        sed '1s|^#!.*python.*$|#!/usr/bin/python3|' "$script" >"$root/usr/local/bin/$(basename "$script")"
        chmod 755 "$root/usr/local/bin/$(basename "$script")"
    done
    ldconfig -r "$root"
}

# The Python version (3.X) of the python root file system in tarball PYTHON_TAR.
image_python_version() {
    local versions
    mapfile -t versions < <(tar -tf "$1" | sed -n 's|^\./usr/lib/python\(3\.[0-9][0-9]*\)/$|\1|p')
    echo "${versions[0]:-}"
}

# The pip arguments that install TORCH_REQUIREMENTS for an image whose Python is PYVER (3.X): the host's pip picks
# the wheels for the image's Python and glibc (the host's own, as the image is built from its packages), whatever
# the host's own Python is. pip takes --platform literally, so every manylinux tag that glibc runs is listed.
torch_pip_args() {
    local pyver="$1" arch glibc_minor minor
    arch="$(uname -m)"
    glibc_minor="$(getconf GNU_LIBC_VERSION | sed -n 's/^glibc 2\.\([0-9][0-9]*\).*/\1/p')"
    [[ -n "$glibc_minor" ]] || die "cannot read the glibc version (getconf GNU_LIBC_VERSION)"
    printf '%s\n' --only-binary=:all: --implementation cp --python-version "$pyver" --abi "cp${pyver/./}"
    for ((minor = glibc_minor; minor >= 5; minor--)); do
        printf '%s\n' --platform "manylinux_2_${minor}_${arch}"
    done
    printf '%s\n' --platform "manylinux2014_${arch}" --platform "manylinux2010_${arch}" \
        --platform "manylinux1_${arch}" "${TORCH_REQUIREMENTS[@]}"
}

# pip install PIP_ARGS into the new folder SITE (a --target folder). Print nothing on success; on failure leave
# no SITE and print why, in one line.
install_torch() {
    local site="$1" pip_args=("${@:2}") work started=$SECONDS
    if ! python3 -m pip --version >/dev/null 2>&1; then
        echo "the host has no pip (python3 -m pip): install python3-pip"
        return 0
    fi
    work="$(mktemp -d "$CACHE_DIR/.build-torch.XXXXXX")"
    log "pip install --target $site ${TORCH_REQUIREMENTS[*]} for the image's Python (about 45 s, 1 GB)" >&2
    if ! python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
            --root-user-action=ignore --target "$work/site" "${pip_args[@]}" >"$work/pip.log" 2>&1; then
        mv "$work/pip.log" "$TORCH_PIP_LOG"
        echo "pip could not install ${TORCH_REQUIREMENTS[*]} for CPython ${pip_args[4]}: $(
            grep -m 1 '^ERROR:' "$TORCH_PIP_LOG" || tail -n 1 "$TORCH_PIP_LOG") (all of pip's output: $TORCH_PIP_LOG)"
        rm -rf "$work"
        return 0
    fi
    mv "$work/site" "$site"
    rm -rf "$work"
    log "installed ${TORCH_REQUIREMENTS[*]} in $site ($(du -sh "$site" | cut -f1), $((SECONDS - started)) s)" >&2
}

# Print the path of NAME's cached tarball, building it first when it is missing: BUILDER ROOT DEBS [ARG...].
cached_tarball() {
    local name="$1" builder="$2" tarball="$CACHE_DIR/$1-$RECIPE.tar" work started
    if [[ ! -f "$tarball" ]]; then
        started=$SECONDS
        work="$(mktemp -d "$CACHE_DIR/.build-$name.XXXXXX")"
        mkdir "$work/root" "$work/debs"
        "$builder" "$work/root" "$work/debs" "${@:3}" >&2
        tar --numeric-owner --sort=name -C "$work/root" -cf "$tarball.tmp" .
        mv "$tarball.tmp" "$tarball"
        rm -rf "$work"
        log "built $tarball ($(du -h "$tarball" | cut -f1), $((SECONDS - started)) s)" >&2
    fi
    echo "$tarball"
}

# ==== main ====

# Build and import the pytorch image for ENGINES on top of the python tarball PYTHON_TAR. When pip cannot install
# torch, say why (also in TORCH_UNAVAILABLE, for the tests' skip message) and exit EXIT_NO_TORCH.
build_pytorch_images() {
    local python_tar="$1" engines=("${@:2}") pyver pip_args torch_site reason pytorch_tar engine
    pyver="$(image_python_version "$python_tar")"
    [[ -n "$pyver" ]] || die "no /usr/lib/python3.X in $python_tar"
    mapfile -t pip_args < <(torch_pip_args "$pyver")
    # pip's install is cached by what pip was asked, so a change to this script does not install torch again.
    torch_site="$CACHE_DIR/torch-$(printf '%s\n' "${pip_args[@]}" | sha256sum | cut -c1-16)"
    find "$CACHE_DIR" -maxdepth 1 -name 'torch-*' ! -name "${torch_site##*/}" -exec rm -rf {} +  # others' installs
    if [[ ! -d "$torch_site" ]]; then
        reason="$(install_torch "$torch_site" "${pip_args[@]}")"
        if [[ -n "$reason" ]]; then
            printf '%s\n' "$reason" >"$TORCH_UNAVAILABLE"
            printf 'build.sh: warning: %s not built: %s\n' "$PYTORCH_IMAGE" "$reason" >&2
            exit "$EXIT_NO_TORCH"
        fi
    fi
    rm -f "$TORCH_UNAVAILABLE" "$TORCH_PIP_LOG"
    pytorch_tar="$(cached_tarball pytorch build_pytorch_rootfs "$python_tar" "$torch_site")"
    for engine in "${engines[@]}"; do
        import_image "$engine" "$pytorch_tar" "$PYTORCH_IMAGE"
        pytorch_smoke_test "$engine"
    done
}

main() {
    local force=0 pytorch=0 engines=() engine busybox_tar python_tar
    local usage="usage: build.sh [--force] [--pytorch] docker|podman..."
    for arg in "$@"; do
        case "$arg" in
            --force) force=1 ;;
            --pytorch) pytorch=1 ;;
            docker | podman) engines+=("$arg") ;;
            *) die "unknown argument '$arg' ($usage)" ;;
        esac
    done
    [[ ${#engines[@]} -gt 0 ]] || die "$usage"
    [[ $(id -u) -eq 0 ]] || die "run as root (chroot and package extraction need it)"

    local todo=() pytorch_todo=()
    for engine in "${engines[@]}"; do
        command -v "$engine" >/dev/null || die "$engine not installed (run .ci/run --setup-only)"
        if [[ $force -eq 0 ]] && images_current "$engine"; then
            log "$engine: $BUSYBOX_IMAGE and $PYTHON_IMAGE are current (recipe $RECIPE), skipped"
        else
            todo+=("$engine")
        fi
        if [[ $pytorch -eq 1 && $force -eq 0 ]] && pytorch_current "$engine"; then
            log "$engine: $PYTORCH_IMAGE is current (recipe $RECIPE), skipped"
        elif [[ $pytorch -eq 1 ]]; then
            pytorch_todo+=("$engine")
        fi
    done
    [[ ${#todo[@]} -gt 0 || ${#pytorch_todo[@]} -gt 0 ]] || return 0

    mkdir -p "$CACHE_DIR"
    exec 9>"$CACHE_DIR/.lock"
    flock 9  # two builds at once would race on the cache
    if [[ $force -eq 1 ]]; then
        rm -rf "$CACHE_DIR"/*.tar "$CACHE_DIR"/torch-*
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
    if [[ ${#pytorch_todo[@]} -gt 0 ]]; then
        build_pytorch_images "$python_tar" "${pytorch_todo[@]}"
    fi
}

main "$@"
