#!/usr/bin/env bash
# Build the sfxflow image from the Dockerfile with podman, on a Debian bookworm base made here by
# debootstrap (no image registry needed), then run `sfxflow demo` inside the image's file system
# the way Shifter and Apptainer run an image: no daemon, the image mounted (`podman image mount`)
# and entered with chroot, as the unprivileged user the image declares.
#
#   usage: scripts/container-build.sh [TAG]          (default: localhost/sfxflow:ci; needs root)
#
# Where packages come from is taken from this machine's environment, never from the repository:
# the Debian mirror from /etc/apt/sources.list*, pip's index and CA from PIP_INDEX_URL,
# PIP_EXTRA_INDEX_URL and PIP_CERT (the CA file is mounted into the build, not copied).
#
# Exit status: 0 built and the demo ran; 1 the build or the demo failed (a defect to fix);
# 3 this machine cannot build images (no root, no podman/debootstrap to be had, no mirror):
# the reason is printed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TAG="${1:-localhost/sfxflow:ci}"
BASE_TAG=localhost/debian-bookworm:minbase
t0=$SECONDS

say() { echo "container: $*"; }
cannot() { echo "container: SKIPPED, cannot build here: $*" >&2; exit 3; }
fail() { echo "container: FAILED: $*" >&2; exit 1; }

[[ "$(id -u)" == 0 ]] || cannot "needs root (podman image mount and chroot)"

if ! command -v podman >/dev/null || ! command -v debootstrap >/dev/null; then
    command -v apt-get >/dev/null || cannot "no podman/debootstrap and no apt-get to install them"
    say "installing podman and debootstrap with apt-get"
    # shellcheck source=scripts/apt-install.sh
    source "$ROOT/scripts/apt-install.sh"
    apt_install 900 podman debootstrap || cannot "the packages could not be installed (above)"
fi

# the Debian mirror apt already uses (one-line or deb822 sources), not the security archive
mirror_of_apt() {
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
        | awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^https?:\/\//) { print $i; break } }'
    cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '/^URIs:/ { for (i = 2; i <= NF; i++) print $i }'
}

if ! podman image exists "$BASE_TAG"; then
    mirror="$(mirror_of_apt | grep -E '/debian/?$' | grep -v security | head -n1 || true)"
    [[ -n "$mirror" ]] || cannot "no Debian mirror found in /etc/apt/sources.list*"
    rootfs="$(mktemp -d)"
    trap 'rm -rf "$rootfs"' EXIT
    say "debootstrap --variant=minbase bookworm (mirror from /etc/apt/sources.list*)"
    t1=$SECONDS
    timeout 900 debootstrap --variant=minbase bookworm "$rootfs" "$mirror" > "$rootfs.log" 2>&1 \
        || { tail -n 5 "$rootfs.log" >&2; cannot "debootstrap failed (log above)"; }
    rm -f "$rootfs.log"
    tar -C "$rootfs" -c . | podman import --quiet - "$BASE_TAG" > /dev/null \
        || cannot "podman import of the debootstrap tree failed"
    rm -rf "$rootfs"
    trap - EXIT
    say "base image $BASE_TAG made in $((SECONDS - t1)) s"
fi

build_args=(--build-arg "BASE=$BASE_TAG")
mounts=()
for var in PIP_INDEX_URL PIP_EXTRA_INDEX_URL; do
    # a file:// index of this machine is not visible inside the build
    if [[ -n "${!var:-}" && "${!var}" != file:* ]]; then build_args+=(--build-arg "$var=${!var}"); fi
done
cert="${PIP_CERT:-}"
[[ -z "$cert" && -s /etc/ssl/certs/ca-certificates.crt ]] && cert=/etc/ssl/certs/ca-certificates.crt
if [[ -n "$cert" && -s "$cert" ]]; then
    mounts+=(-v "$cert:/run/host-ca.pem:ro")
    build_args+=(--build-arg "PIP_CERT=/run/host-ca.pem")
fi

say "podman build --isolation=chroot ${build_args[*]} -t $TAG"
t1=$SECONDS
log="$(mktemp)"
rc=0
timeout 2400 podman build --isolation=chroot "${mounts[@]}" "${build_args[@]}" -t "$TAG" "$ROOT" \
    2>&1 | tee "$log" | grep -E '^(STEP|COMMIT|Successfully|Error)' || true
rc=${PIPESTATUS[0]}
if [[ $rc != 0 ]]; then
    tail -n 30 "$log" >&2
    # a package index or mirror that did not answer is this machine's network, not the recipe
    if grep -qE "Could not fetch URL|Temporary failure in name resolution|Network is unreachable|Failed to fetch|Connection (refused|reset|timed out)|Read timed out" "$log"; then
        rm -f "$log"
        cannot "podman build could not download packages (exit $rc; messages above)"
    fi
    rm -f "$log"
    [[ $rc == 124 ]] && fail "podman build took longer than 40 min"
    fail "podman build failed (exit $rc; messages above)"
fi
rm -f "$log"
build_s=$((SECONDS - t1))
podman image prune -f > /dev/null 2>&1 || true  # earlier builds' layers no tag refers to
size="$(podman image inspect --format '{{.Size}}' "$TAG")"
say "built $TAG in ${build_s} s; image size $((size / 1000000)) MB"

# run the demo inside the image's file system, as the image's own user, with its environment
user="$(podman image inspect --format '{{.Config.User}}' "$TAG")"
[[ -n "$user" && "$user" != root && "$user" != 0 ]] || fail "the image declares no unprivileged USER"
mapfile -t image_env < <(podman image inspect --format '{{range .Config.Env}}{{println .}}{{end}}' "$TAG" | grep .)
workdir="$(podman image inspect --format '{{.Config.WorkingDir}}' "$TAG")"
mnt="$(podman image mount "$TAG")"
mounted=()
cleanup() {
    for m in "${mounted[@]}"; do umount -l "$m" 2>/dev/null || true; done
    podman image unmount "$TAG" > /dev/null 2>&1 || true
}
trap cleanup EXIT
# what a container runtime provides: /proc, /dev with a fresh /dev/shm (the local Dask cluster's
# semaphores) and a writable scratch directory on the image's /data (the image stays read-only)
scratch="$(mktemp -d)"
chmod 0777 "$scratch"
for spec in "proc:/proc" "/dev:/dev" "tmpfs:/dev/shm" "$scratch:${workdir:-/data}"; do
    src="${spec%%:*}" dst="$mnt${spec#*:}"
    case "$src" in
        proc) mount -t proc proc "$dst" ;;
        tmpfs) mount -t tmpfs -o mode=1777,size=1g shm "$dst" ;;
        *) mount --bind "$src" "$dst" ;;
    esac || fail "cannot mount $src inside the image at $dst"
    mounted=("$dst" "${mounted[@]}")
done
say "sfxflow demo inside the image as user '$user' (chroot into podman image mount)"
t1=$SECONDS
env -i "${image_env[@]}" HOME="${workdir:-/data}" TMPDIR="${workdir:-/data}" \
    NUMBA_CACHE_DIR="${workdir:-/data}/numba-cache" \
    timeout 900 chroot --userspec="$user:$user" "$mnt" /bin/sh -c \
    "cd '${workdir:-/data}' && sfxflow --version && sfxflow demo demo-run --frames 16 --workers 2" \
    || fail "sfxflow demo inside the image failed"
[[ -s "$scratch/demo-run/run/summary.json" ]] || fail "the demo wrote no run/summary.json"
owner="$(stat -c %u "$scratch/demo-run/run/summary.json")"
[[ "$owner" != 0 ]] || fail "the demo's files belong to root, not to the image's user"
say "demo ran in $((SECONDS - t1)) s as uid $owner (the image's user $user); it wrote: $(ls "$scratch/demo-run" | tr '\n' ' ')"
rm -rf "$scratch"
say "OK in $((SECONDS - t0)) s: image $TAG, $((size / 1000000)) MB, built in ${build_s} s"
