#!/usr/bin/env bash
# Locate or build a real Prometheus (and its promtool) with Consul service discovery.
#
#   scripts/build-prometheus.sh        # prints the prometheus path; promtool is beside it
#
# Why a build: Debian's `prometheus` package is compiled without Consul discovery, and the
# tests must run Prometheus' real `consul_sd_configs` against a real Consul.
#
# Order of resolution:
#   1. $PROMETHEUS_BIN if set (must be executable; `promtool` must be in the same directory),
#   2. `prometheus` on the PATH, if the `promtool` beside it accepts a consul_sd_configs
#      configuration (a build without Consul discovery is skipped, not used),
#   3. the cache ${MAGLEV_CACHE:-$HOME/.cache/maglev-bridge}/bin/prometheus, if its stamp matches,
#   4. otherwise build cmd/prometheus and cmd/promtool from the Apache-2.0 Go module
#      github.com/prometheus/prometheus (through GOPROXY) into the cache.
# Progress goes to stderr; the path of prometheus is the last line on stdout.
#
# Version (override with MAGLEV_PROMETHEUS_VERSION): module v0.311.3 = Prometheus 3.11.3.
# Built with the tags "remove_all_sd enable_consul_sd" (Prometheus' own plugin switches, see
# plugins/*.go): only file, http and Consul discovery are compiled in, which skips the
# Kubernetes, cloud and other SD client libraries (most of the dependency graph), and without
# "builtinassets" (no web UI embedded; the API is all the tests use).
set -euo pipefail

main() {
RECIPE=1   # bump when the build procedure changes, to force a rebuild
MODULE=github.com/prometheus/prometheus
VERSION=${MAGLEV_PROMETHEUS_VERSION:-v0.311.3}
TAGS="remove_all_sd enable_consul_sd"

log() { printf '[build-prometheus] %s\n' "$*" >&2; }
die() { printf '[build-prometheus] ERROR: %s\n' "$*" >&2; exit 1; }

has_consul_sd() {  # $1: directory holding prometheus and promtool
  local dir=$1 tmp
  [[ -x "$dir/prometheus" && -x "$dir/promtool" ]] || return 1
  tmp=$(mktemp -d)
  printf 'scrape_configs:\n- job_name: x\n  consul_sd_configs: [{server: "127.0.0.1:8500"}]\n' >"$tmp/p.yml"
  "$dir/promtool" check config "$tmp/p.yml" >/dev/null 2>&1; local rc=$?
  rm -rf "$tmp"
  return $rc
}

if [[ -n "${PROMETHEUS_BIN:-}" ]]; then
  [[ -x "$PROMETHEUS_BIN" ]] || die "PROMETHEUS_BIN=$PROMETHEUS_BIN is not an executable file"
  [[ -x "$(dirname "$PROMETHEUS_BIN")/promtool" ]] || die "no promtool beside PROMETHEUS_BIN=$PROMETHEUS_BIN"
  log "using \$PROMETHEUS_BIN"
  echo "$PROMETHEUS_BIN"; exit 0
fi

if found=$(command -v prometheus 2>/dev/null); then
  if has_consul_sd "$(dirname "$found")"; then
    log "using prometheus from PATH"
    echo "$found"; exit 0
  fi
  log "$found has no Consul discovery (or no promtool beside it): building one"
fi

CACHE=${MAGLEV_CACHE:-$HOME/.cache/maglev-bridge}
BIN_DIR=$CACHE/bin
BIN=$BIN_DIR/prometheus
STAMP_FILE=$BIN_DIR/prometheus.stamp
STAMP="prometheus $MODULE@$VERSION recipe=$RECIPE tags=$TAGS"
cache_hit() { [[ -x "$BIN" && -x "$BIN_DIR/promtool" && -f "$STAMP_FILE" && "$(cat "$STAMP_FILE")" == "$STAMP" ]]; }

if cache_hit; then log "cached: $STAMP"; echo "$BIN"; exit 0; fi

command -v go >/dev/null 2>&1 || die "'go' is not on the PATH: cannot build prometheus (or set PROMETHEUS_BIN)"
mkdir -p "$BIN_DIR" "$CACHE/build"
exec 9>"$CACHE/build/prometheus.lock"
log "waiting for the prometheus build lock"; flock 9
if cache_hit; then log "cached: $STAMP"; echo "$BIN"; exit 0; fi

start=$(date +%s)
log "building $MODULE@$VERSION with $(go version)"
export GOTOOLCHAIN=local GOFLAGS="-mod=mod -buildvcs=false" GOWORK=off
dl_json=$(cd "$CACHE/build" && go mod download -json "$MODULE@$VERSION" 2>&1) \
  || die "go mod download $MODULE@$VERSION failed: $dl_json"
SRC=$(printf '%s' "$dl_json" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("Dir", ""))')
[[ -n "$SRC" && -d "$SRC" ]] || die "go mod download $MODULE@$VERSION gave no source dir: $dl_json"
grep -q 'Apache License' "$SRC/LICENSE" || die "$MODULE@$VERSION LICENSE is not Apache-2.0"

WORK=$CACHE/build/prometheus-$VERSION
rm -rf "$WORK"; cp -r "$SRC" "$WORK"; chmod -R u+w "$WORK"; cd "$WORK"
PV=$(cat VERSION)
LDFLAGS="-s -w -X github.com/prometheus/common/version.Version=$PV -X github.com/prometheus/common/version.Branch=module"
for cmd in prometheus promtool; do
  log "go build ./cmd/$cmd (tags '$TAGS'); several minutes on 2 cores"
  CGO_ENABLED=0 go build -trimpath -tags "$TAGS" -ldflags "$LDFLAGS" -o "$BIN_DIR/$cmd.tmp.$$" "./cmd/$cmd" >&2 \
    || { rm -f "$BIN_DIR/$cmd.tmp.$$"; die "go build of $cmd failed (build dir kept: $WORK)"; }
done
"$BIN_DIR/prometheus.tmp.$$" --version >&2 || die "built prometheus does not run"
mv -f "$BIN_DIR/promtool.tmp.$$" "$BIN_DIR/promtool"
mv -f "$BIN_DIR/prometheus.tmp.$$" "$BIN"
printf '%s\n' "$STAMP" >"$STAMP_FILE"
install -m 0644 "$SRC/LICENSE" "$BIN_DIR/prometheus.LICENSE"
rm -rf "$WORK"
log "built $BIN and promtool in $(( $(date +%s) - start ))s"
echo "$BIN"
}

main "$@"
