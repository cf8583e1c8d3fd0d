#!/bin/sh
# runs as root inside the VM; tests/vm/boot.py fills in the @...@ placeholders and writes the result to its output folder
OUT=@OUT@
REPO=@REPO@
exec >"$OUT/setup.log" 2>&1 </dev/null
echo "$(cut -d' ' -f1 /proc/uptime)" >"$OUT/booted"
fail() { echo "SETUP FAILED: $*"; echo "$*" >"$OUT/setup-failed"; exit 1; }
set -x

# virtme's root is 9p without caching, so every stat() of a python import is a round trip through the
# emulated CPU; mount the host a second time with cache=loose and put the folders python reads on it.
mkdir -p /run/maglev/host /run/maglev/repo-upper /run/maglev/repo-work
if mount -t 9p -o ro,trans=virtio,version=9p2000.L,cache=loose,msize=524288 maglevhost /run/maglev/host; then
    for d in @FAST_RO@; do
        [ -d "/run/maglev/host$d" ] && mount --bind "/run/maglev/host$d" "$d"
    done
    mount -t overlay maglevrepo \
        -o "lowerdir=/run/maglev/host$REPO,upperdir=/run/maglev/repo-upper,workdir=/run/maglev/repo-work" \
        "$REPO" || fail "overlay on $REPO"
else
    echo "warning: no cached host mount; running on the uncached 9p root (slow)"
    mount -t overlay maglevrepo \
        -o "lowerdir=$REPO,upperdir=/run/maglev/repo-upper,workdir=/run/maglev/repo-work" "$REPO" \
        || echo "warning: $REPO stays read-only"
fi

for m in @REQUIRED@; do modprobe "$m" || fail "modprobe $m"; done
for m in @OPTIONAL@; do modprobe "$m" || echo "warning: optional module $m not loaded"; done

# /usr through the cached mount as well (every exec of ip/ipvsadm/sysctl gets ~2x cheaper), writable like
# virtme's own overlay; virtme's /lib/modules/<version> link (a tmpfs below /usr) is made again on top.
MODLINK=$(readlink "/lib/modules/$(uname -r)")
mkdir -p /run/maglev/usr-upper /run/maglev/usr-work
if [ -d /run/maglev/host/usr/bin ] && [ -n "$MODLINK" ] && mount -t overlay maglevusr \
        -o lowerdir=/run/maglev/host/usr,upperdir=/run/maglev/usr-upper,workdir=/run/maglev/usr-work /usr; then
    if [ ! -e "/lib/modules/$(uname -r)" ]; then
        mkdir -p /usr/lib/modules && mount -t tmpfs none /usr/lib/modules \
            && ln -s "$MODLINK" "/usr/lib/modules/$(uname -r)"
    fi
    modinfo -F name ip_vs >/dev/null || fail "modules unreachable after the /usr overlay"
fi

ip link set lo up || fail "lo up"
if [ @NET@ = 1 ]; then
    modprobe virtio_net || fail "modprobe virtio_net"
    i=0
    while ! ip link show eth0 >/dev/null 2>&1; do
        i=$((i + 1)); [ $i -gt 300 ] && fail "no eth0 (virtio-net) in the guest after 30 s"; sleep 0.1
    done
    ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 || fail "eth0 setup"
fi
mkdir -p /run/netns
ip netns list >/dev/null || fail "ip netns"

export MAGLEV_VM=1 MAGLEV_VM_OUT="$OUT" MAGLEV_VM_REPO="$REPO"
export PATH=@PATH@
export PYTHONUNBUFFERED=1
@ENV@
cd "$REPO" || fail "cd $REPO"
set +x
echo "$(cut -d' ' -f1 /proc/uptime)" >"$OUT/started"
timeout -k 10 @CMD_TIMEOUT@ @CMD@ >"$OUT/stdout" 2>"$OUT/stderr" </dev/null
rc=$?
echo "$(cut -d' ' -f1 /proc/uptime)" >"$OUT/finished"
echo "$rc" >"$OUT/rc.tmp" && mv "$OUT/rc.tmp" "$OUT/rc"
sync
