#!/usr/bin/env bash
# Exposes Debian's python3-nftables (a ctypes wrapper of libnftables.so.1, not published on PyPI) to the
# project's virtualenv, and only that package: a directory holding one symlink to it, named in a .pth file.
# Installs python3-nftables and libnftables1 when missing (as root; MAGLEV_SKIP_APT=1 refuses instead).
# Usage: scripts/venv-nftables.sh <venv>
set -euo pipefail
VENV=${1:?usage: venv-nftables.sh <venv>}
PACKAGES=(python3-nftables libnftables1)

die() { echo "venv-nftables: $*" >&2; exit 1; }

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [[ ${#missing[@]} -gt 0 ]]; then
    [[ "${MAGLEV_SKIP_APT:-0}" == 1 ]] && die "missing packages: ${missing[*]} (MAGLEV_SKIP_APT=1)"
    [[ $(id -u) -eq 0 ]] || die "missing packages: ${missing[*]}; run as root or install them"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 \
        || { apt-get update -qq >&2 && apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2; } \
        || die "apt-get install ${missing[*]} failed"
fi

init=$(dpkg-query -L python3-nftables | grep -E '/nftables/__init__\.py$' | head -1)
[[ -n "$init" ]] || die "python3-nftables installs no nftables/__init__.py"
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p "$VENV/system-nftables"
ln -sfn "$(dirname "$init")" "$VENV/system-nftables/nftables"
realpath "$VENV/system-nftables" > "$site/system-nftables.pth"
"$VENV/bin/python" -c 'import nftables' || die "nftables does not import in $VENV"
