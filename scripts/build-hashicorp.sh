#!/usr/bin/env bash
# Locate or build a real Consul / Nomad binary from its Go module source.
#
#   scripts/build-hashicorp.sh consul|nomad
#
# Order of resolution:
#   1. $CONSUL_BIN / $NOMAD_BIN if set (must be executable),
#   2. `consul` / `nomad` on the PATH,
#   3. the cache ${MAGLEV_CACHE:-$HOME/.cache/maglev-bridge}/bin/NAME, if its
#      stamp (bin/NAME.stamp) matches the recipe below,
#   4. otherwise build it from the Go module (through GOPROXY) into the cache.
# The binary path is printed on stdout as the last line; progress goes to stderr.
#
# Only MPL-2.0 releases are built: the LICENSE inside the downloaded module is
# checked, and a Business Source License (Consul >= 1.16.6/1.17, Nomad >= 1.7)
# is refused.
#
# Versions (override with MAGLEV_CONSUL_VERSION / MAGLEV_NOMAD_VERSION):
#   consul v1.16.3 - newest 1.16.x whose module the proxy serves with an MPL-2.0
#                    LICENSE (v1.16.4 and v1.16.5 are not served, v1.16.6 is BSL).
#   nomad  v1.6.3  - newest 1.6.x the proxy serves (v1.6.4 has no .mod/.zip,
#                    v1.6.5+ are not served, v1.7.0 is BSL).
#
# Cost on 2 cores with empty Go caches (module download included): consul
# ~400 s (~580 s with a VM running beside it), nomad ~285 s; a cached run ~0 s.
# Binaries: consul ~115 MiB (static, CGO_ENABLED=0), nomad ~77 MiB (cgo, glibc).
#
# Gotchas handled here:
#   * the release go.mod files `replace` their sub-modules with local paths
#     (consul: ./api ./sdk ./proto-public ./envoyextensions ./troubleshoot;
#     nomad: ./api) but a module zip never contains nested modules, so those
#     replaces are dropped and published versions are required instead:
#     consul keeps the versions its go.mod already requires (api v1.25.1,
#     sdk v0.14.1, proto-public v0.4.1, envoyextensions v0.4.1,
#     troubleshoot v0.3.1: the 1.16.x line).  nomad/api has no tags at all;
#     the go.mod's own v0.0.0-20230103221135 is far too old, and the proxy
#     refuses bare commit hashes, but it serves the canonical pseudo-version of
#     the release tag's commit, v0.0.0-<commit time>-<hash[:12]> (for v1.6.3:
#     v0.0.0-20231030125810-e0497bff1437), derived here from the module's
#     .info (Time, Origin.Hash): exactly the api the release was built with.
#     Older pseudo-versions fail: a 2023-07-28 main one lacks
#     PeriodicConfig.Specs (added in 1.6.2), a 2023-10-30 one is 1.4.x.
#   * consul/envoyextensions v0.4.1 is served by the proxy but unknown to the
#     checksum database mirror (404), so it is listed in GONOSUMDB; everything
#     else is verified against the checksum database as usual.
#   * nomad is built like its release builds: cgo on, tags
#     "codegen_generated release" (pre-generated msgpack codecs, no test
#     drivers) and without the "ui" tag, so no web UI is embedded.
set -euo pipefail

# The whole script is one function, parsed before it runs: editing or updating
# this file while a long build runs cannot break that build.
main() {
RECIPE=1   # bump when the build procedure changes, to force a rebuild

log() { printf '[build-hashicorp] %s\n' "$*" >&2; }
die() { printf '[build-hashicorp] ERROR: %s\n' "$*" >&2; exit 1; }

NAME=${1:-}
case "$NAME" in
  consul)
    OVERRIDE=${CONSUL_BIN:-}
    MODULE=github.com/hashicorp/consul
    VERSION=${MAGLEV_CONSUL_VERSION:-v1.16.3}
    ;;
  nomad)
    OVERRIDE=${NOMAD_BIN:-}
    MODULE=github.com/hashicorp/nomad
    VERSION=${MAGLEV_NOMAD_VERSION:-v1.6.3}
    NOMAD_API_VERSION=${MAGLEV_NOMAD_API_VERSION:-}   # default: derived from the release commit
    ;;
  *)
    die "usage: $0 consul|nomad"
    ;;
esac

# 1. explicit override
if [[ -n "$OVERRIDE" ]]; then
  [[ -x "$OVERRIDE" ]] || die "${NAME^^}_BIN=$OVERRIDE is not an executable file"
  log "using \$${NAME^^}_BIN"
  echo "$OVERRIDE"
  exit 0
fi

# 2. on the PATH
if found=$(command -v "$NAME" 2>/dev/null); then
  log "using $NAME from PATH"
  echo "$found"
  exit 0
fi

# 3. cache
CACHE=${MAGLEV_CACHE:-$HOME/.cache/maglev-bridge}
BIN_DIR=$CACHE/bin
BIN=$BIN_DIR/$NAME
STAMP_FILE=$BIN_DIR/$NAME.stamp
STAMP="$NAME $MODULE@$VERSION recipe=$RECIPE${NOMAD_API_VERSION:+ api=$NOMAD_API_VERSION}"

cache_hit() { [[ -x "$BIN" && -f "$STAMP_FILE" && "$(cat "$STAMP_FILE")" == "$STAMP" ]]; }

if cache_hit; then
  log "cached: $STAMP"
  echo "$BIN"
  exit 0
fi

# 4. build, one builder at a time per tool
command -v go >/dev/null 2>&1 || die "'go' is not on the PATH: cannot build $NAME (or set ${NAME^^}_BIN)"
mkdir -p "$BIN_DIR" "$CACHE/build"
exec 9>"$CACHE/build/$NAME.lock"
if command -v flock >/dev/null 2>&1; then
  log "waiting for the $NAME build lock" ; flock 9
  if cache_hit; then   # somebody else built it while we waited
    log "cached: $STAMP"
    echo "$BIN"
    exit 0
  fi
fi

start=$(date +%s)
log "building $MODULE@$VERSION with $(go version)"

export GOTOOLCHAIN=local
export GOFLAGS="-mod=mod -buildvcs=false"
export GONOSUMDB="github.com/hashicorp/consul/envoyextensions${GONOSUMDB:+,$GONOSUMDB}"
export GOWORK=off

log "go mod download $MODULE@$VERSION"
dl_json=$(cd "$CACHE/build" && go mod download -json "$MODULE@$VERSION" 2>&1) \
  || die "go mod download $MODULE@$VERSION failed: $(printf '%s\n' "$dl_json" | grep '"Error"' || printf '%s' "$dl_json")"
# Source dir, commit time and commit hash (from the module's .info file).
read -r SRC TS HASH < <(printf '%s' "$dl_json" | python3 -c '
import json, sys
m = json.load(sys.stdin)
info = {}
try:
    info = json.load(open(m["Info"]))
except Exception:
    pass
print(m.get("Dir", "-"), info.get("Time", "-"), (info.get("Origin") or m.get("Origin") or {}).get("Hash", "-"))
') || die "could not parse the go mod download output: $dl_json"
[[ "$TS" != - ]] || TS=""
[[ "$HASH" != - ]] || HASH=""
[[ -n "$SRC" && -d "$SRC" ]] || die "go mod download $MODULE@$VERSION gave no source dir: $dl_json"

# License check: the LICENSE shipped inside this very module version.
[[ -f "$SRC/LICENSE" ]] || die "$MODULE@$VERSION has no LICENSE file in $SRC"
if grep -qi 'Business Source License' "$SRC/LICENSE"; then
  die "$MODULE@$VERSION is under the Business Source License (not open source); refusing to build it"
fi
grep -q 'Mozilla Public License, version 2.0' "$SRC/LICENSE" \
  || die "$MODULE@$VERSION LICENSE is not MPL-2.0: $(head -n3 "$SRC/LICENSE" | tr '\n' ' ')"
log "LICENSE of $MODULE@$VERSION: $(grep -m1 'Mozilla Public License' "$SRC/LICENSE")"

WORK=$CACHE/build/$NAME-$VERSION
rm -rf "$WORK"
cp -r "$SRC" "$WORK"
chmod -R u+w "$WORK"
cd "$WORK"

# Drop replace directives that point at local directories (absent from the zip).
local_replaces=$(go mod edit -json | python3 -c '
import json, sys
for r in json.load(sys.stdin).get("Replace") or []:
    if r["New"]["Path"].startswith((".", "/")):
        print(r["Old"]["Path"])
') || die "could not read the replace directives of $WORK/go.mod"
for old in $local_replaces; do
  log "go mod edit -dropreplace=$old"
  go mod edit -dropreplace="$old"
done

LD_VERSION_PKG=$MODULE/version
LDFLAGS="-s -w -X $LD_VERSION_PKG.GitCommit=${HASH:0:8} -X $LD_VERSION_PKG.BuildDate=${TS:-unknown}"

case "$NAME" in
  consul)
    # The sub-module versions already required by the release go.mod are the
    # published 1.16.x ones; nothing to pin.
    CGO=0
    TAGS=""
    ;;
  nomad)
    if [[ -z "$NOMAD_API_VERSION" ]]; then
      [[ -n "$TS" && -n "$HASH" ]] \
        || die "cannot derive the nomad/api pseudo-version: no Time/Origin.Hash for $MODULE@$VERSION (set MAGLEV_NOMAD_API_VERSION)"
      NOMAD_API_VERSION=v0.0.0-$(date -u -d "$TS" +%Y%m%d%H%M%S)-${HASH:0:12}
    fi
    log "go mod edit -require=github.com/hashicorp/nomad/api@$NOMAD_API_VERSION"
    go mod edit -require="github.com/hashicorp/nomad/api@$NOMAD_API_VERSION"
    CGO=1
    command -v "${CC:-gcc}" >/dev/null 2>&1 || CGO=0
    TAGS="codegen_generated release"
    ;;
esac

log "go mod download (dependencies)"
# Retried: a cold download of several hundred modules once failed here without a message.
for attempt in 1 2 3; do
  if go mod download -x 2>"$WORK/download.log"; then break; fi
  grep -v ': 200 OK' "$WORK/download.log" | tail -n 20 >&2 || true
  [[ $attempt -lt 3 ]] || die "downloading the dependencies of $MODULE@$VERSION failed 3 times (log: $WORK/download.log)"
  log "dependency download failed (attempt $attempt), retrying in 5s"
  sleep 5
done

log "go build -trimpath (CGO_ENABLED=$CGO, tags='$TAGS'); this takes several minutes on 2 cores"
CGO_ENABLED=$CGO go build -trimpath -tags "$TAGS" -ldflags "$LDFLAGS" -o "$BIN.tmp.$$" . >&2 \
  || { rm -f "$BIN.tmp.$$"; die "go build of $MODULE@$VERSION failed (build dir kept: $WORK)"; }

"$BIN.tmp.$$" version >&2 || { rm -f "$BIN.tmp.$$"; die "built $NAME does not run: '$BIN.tmp.$$ version' failed"; }
mv -f "$BIN.tmp.$$" "$BIN"
printf '%s\n' "$STAMP" > "$STAMP_FILE"
install -m 0644 "$SRC/LICENSE" "$BIN_DIR/$NAME.LICENSE"
rm -rf "$WORK"
log "built $BIN ($(du -h "$BIN" | cut -f1)) in $(( $(date +%s) - start ))s"
echo "$BIN"
}

main "$@"
