#!/usr/bin/env bash
# Fetch and unpack the Debian 6.1 kernel that the kernel-test VM boots, and make sure the host has the
# tools the VM needs (qemu, busybox-static, kmod, ipvsadm, iproute2, nftables, iptables, bird2, file).
#
# Prints the path of the unpacked vmlinuz as the only line on stdout; everything else goes to stderr.
# `--packages-only` only makes sure of the host packages (`make host-packages`: the real-component tests on
# the host run BIRD too).
# Idempotent: a second run only checks a stamp file and `dpkg-query`, and prints the path.
#
# Layout (what virtme-ng expects of an unpacked .deb: it walks up from the vmlinuz to the first folder
# that holds lib/modules, and loads modules from lib/modules/<version> there):
#   ${MAGLEV_CACHE:-$HOME/.cache/maglev-bridge}/kernel/boot/vmlinuz-<version>
#   ${MAGLEV_CACHE:-$HOME/.cache/maglev-bridge}/kernel/lib/modules/<version>/   (depmod already run)
#   ${MAGLEV_CACHE:-$HOME/.cache/maglev-bridge}/kernel/.maglev-kernel            (stamp: package version)
#
# Environment:
#   MAGLEV_CACHE          cache root (default $HOME/.cache/maglev-bridge)
#   MAGLEV_KERNEL_PKG     exact Debian package to use (default: newest linux-image-6.1.0-N-amd64)
#   MAGLEV_KERNEL_REFRESH=1  look for a newer package even if one is already unpacked
#   MAGLEV_SKIP_APT=1     never call apt-get (fail if a tool is missing)
set -euo pipefail

log() { printf 'vm-kernel: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

CACHE="${MAGLEV_CACHE:-${HOME:-/root}/.cache/maglev-bridge}"
KDIR="$CACHE/kernel"
STAMP="$KDIR/.maglev-kernel"

# Debian packages the VM needs on the host (checked with dpkg-query, installed only when missing)
HOST_PACKAGES=(qemu-system-x86 busybox-static kmod ipvsadm iproute2 nftables iptables bird2 file)

apt_updated=0
apt_update_once() {
    if [[ $apt_updated -eq 0 ]]; then
        log "apt-get update"
        apt-get update -qq >&2 || die "apt-get update failed"
        apt_updated=1
    fi
}

ensure_host_packages() {
    local missing=() p
    for p in "${HOST_PACKAGES[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
            missing+=("$p")
        fi
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    [[ "${MAGLEV_SKIP_APT:-0}" == 1 ]] && die "missing packages: ${missing[*]} (MAGLEV_SKIP_APT=1)"
    [[ $(id -u) -eq 0 ]] || die "missing packages: ${missing[*]}; run as root or install them"
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2; then
        apt_update_once
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 \
            || die "apt-get install ${missing[*]} failed"
    fi
}

newest_kernel_package() {
    apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' 2>/dev/null \
        | awk '{print $1}' | sort -V | tail -n 1
}

current_vmlinuz() {
    # print the vmlinuz of the unpacked kernel if the stamp says the unpack completed
    [[ -f "$STAMP" ]] || return 1
    local v=("$KDIR"/boot/vmlinuz-*)
    [[ -f "${v[0]}" ]] || return 1
    printf '%s\n' "${v[0]}"
}

fetch_kernel() {
    local pkg="$1" work ver deb kver
    work=$(mktemp -d "$CACHE/kernel.new.XXXXXX")
    log "downloading $pkg"
    (cd "$work" && apt-get download -qq -o APT::Sandbox::User=root "$pkg" >&2) || { rm -rf "$work"; return 1; }
    local debs=("$work"/*.deb) mods
    deb="${debs[0]}"
    [[ -f "$deb" ]] || die "apt-get download $pkg left no .deb"
    ver=$(dpkg-deb -f "$deb" Version)
    log "unpacking $(basename "$deb")"
    mkdir -p "$work/root"
    dpkg -x "$deb" "$work/root"
    mods=("$work"/root/lib/modules/*)
    kver=$(basename "${mods[0]}")
    [[ -f "$work/root/boot/vmlinuz-$kver" ]] || die "no boot/vmlinuz-$kver in $deb"
    # debs ship no modules.dep (postinst makes it); virtme-ng and the guest's modprobe need it
    depmod -a -b "$work/root" "$kver"
    printf 'package=%s\nversion=%s\nkernel=%s\n' "$pkg" "$ver" "$kver" > "$work/root/.maglev-kernel"
    chmod 0755 "$work/root"
    # swap in atomically-ish: readers only trust a tree that has the stamp
    if [[ -d "$KDIR" ]]; then
        mv "$KDIR" "$work/old"
    fi
    mv "$work/root" "$KDIR"
    rm -rf "$work"
}

main() {
    mkdir -p "$CACHE"
    # one unpack at a time (CI and a developer, or two boots, may race)
    exec 9> "$CACHE/kernel.lock"
    flock -w 600 9 || die "timed out waiting for $CACHE/kernel.lock"
    rm -rf "$CACHE"/kernel.new.*   # left over by an interrupted unpack

    ensure_host_packages
    [[ "${1:-}" == --packages-only ]] && return 0

    local vmlinuz="" want=""
    if vmlinuz=$(current_vmlinuz); then
        if [[ -n "${MAGLEV_KERNEL_PKG:-}" ]]; then
            grep -qx "package=${MAGLEV_KERNEL_PKG}" "$STAMP" || vmlinuz=""
        elif [[ "${MAGLEV_KERNEL_REFRESH:-0}" == 1 ]]; then
            want=$(newest_kernel_package)
            if [[ -z "$want" ]]; then apt_update_once; want=$(newest_kernel_package); fi
            if [[ -n "$want" ]] && ! grep -qx "package=$want" "$STAMP"; then vmlinuz=""; fi
        fi
    fi
    if [[ -z "$vmlinuz" ]]; then
        [[ "${MAGLEV_SKIP_APT:-0}" == 1 ]] && die "no kernel unpacked in $KDIR and MAGLEV_SKIP_APT=1"
        want="${MAGLEV_KERNEL_PKG:-$want}"
        if [[ -z "$want" ]]; then
            want=$(newest_kernel_package)
            if [[ -z "$want" ]]; then apt_update_once; want=$(newest_kernel_package); fi
        fi
        [[ -n "$want" ]] || die "no linux-image-6.1.0-N-amd64 package in the apt lists (is this Debian 12?)"
        if ! fetch_kernel "$want"; then
            apt_update_once
            fetch_kernel "$want" || die "apt-get download $want failed"
        fi
        vmlinuz=$(current_vmlinuz) || die "unpack of $want left no vmlinuz in $KDIR"
        log "kernel ready: $vmlinuz"
    fi
    printf '%s\n' "$vmlinuz"
}

main "$@"
