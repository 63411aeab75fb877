#!/usr/bin/env bash
# Rate-limit accuracy benchmark (issue 5, "Throttling": the achieved rate
# within 10 % of the limit at 10, 50 and 200 MiB/s).
#
# Builds the release binaries, starts a receiver on 127.0.0.1 and, for each
# limit, syncs a fresh volume of random (incompressible) data sized for about
# SECONDS_EACH seconds at that limit, first with the agent's `--max-rate`,
# then with the receiver-wide `max_rate` (receiver.toml, SIGHUP-reloaded).
# Each limit is measured with two syncs, of N and 2N MiB: achieved rate =
# (bytes sent by the second - bytes sent by the first) / (its wall time - the
# first's), bytes on the wire after compression from the syncs' JSON
# summaries. The slope leaves out what every sync costs whatever its size
# (process start, QUIC/TLS handshake, digest fetch, the final flush), which
# is not what the limit governs.
#
#   ./scripts/bench-throttle.sh
#   RATES="10 50" SECONDS_EACH=10 ./scripts/bench-throttle.sh
#   SKIP_BUILD=1 ./scripts/bench-throttle.sh
set -euo pipefail

RATES=${RATES:-"10 50 200"}
SECONDS_EACH=${SECONDS_EACH:-6}

for tool in jq python3; do
    command -v "$tool" >/dev/null || { echo "bench-throttle.sh needs $tool" >&2; exit 1; }
done
ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/scripts/lib.sh"
export NO_COLOR=1
WORK=$(mktemp -d -t lifeboat-bench-throttle.XXXXXX)
AGENT="$ROOT/target/release/lifeboat-agent"
RECEIVER="$ROOT/target/release/lifeboat-receiver"
D="$WORK/receiver"
RECEIVER_PID=""

cleanup() {
    set +e
    if [ -n "$RECEIVER_PID" ]; then
        kill -TERM "$RECEIVER_PID" 2>/dev/null
        wait "$RECEIVER_PID" 2>/dev/null
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

if [ -z "${SKIP_BUILD:-}" ]; then
    echo "==> cargo build --release"
    (cd "$ROOT" && cargo build --release --bins -p lifeboat-agent -p lifeboat-receiver)
fi

PORT=$(free_port SOCK_DGRAM)
"$RECEIVER" init --dir "$D" --listen "127.0.0.1:$PORT" >/dev/null
"$RECEIVER" enroll --dir "$D" --server bench --out "$WORK/bench.bundle" >/dev/null
"$RECEIVER" serve --dir "$D" >"$WORK/receiver.out" 2>"$WORK/receiver.log" &
RECEIVER_PID=$!
wait_listening "$WORK/receiver.out" "$WORK/receiver.log" || exit 1

# sync_at NAME MIB [AGENT ARGS...]: prints "bytes seconds".
sync_at() {
    local name=$1 mib=$2
    shift 2
    local img="$WORK/$name.img"
    head -c "$((mib << 20))" /dev/urandom >"$img"
    local t0 t1 sent
    t0=$(date +%s.%N)
    sent=$("$AGENT" sync --json --bundle "$WORK/bench.bundle" --volume "$img" --name "$name" \
        --state-dir "$WORK/state-$name" "$@" | jq .sent_bytes)
    t1=$(date +%s.%N)
    rm -f "$img"
    echo "$sent $(python3 -c "print($t1 - $t0)")"
}

report() { # LIMIT_MIB BYTES SECONDS WHAT
    python3 - "$@" <<'PY'
import sys
limit, sent, secs, what = float(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
rate = sent / secs / 2**20
print(f"{what:<28} limit {limit:6.0f} MiB/s  achieved {rate:7.1f} MiB/s  ratio {rate/limit:5.3f}  ({sent/2**20:.0f} MiB in {secs:.2f} s)")
PY
}

slope() { # LIMIT WHAT NAME [AGENT ARGS...]: syncs N and 2N MiB, reports the slope
    local r=$1 what=$2 name=$3
    shift 3
    local mib=$((r * SECONDS_EACH)) s1 t1 s2 t2
    read -r s1 t1 < <(sync_at "${name}a" "$mib" "$@")
    read -r s2 t2 < <(sync_at "${name}b" "$((2 * mib))" "$@")
    report "$r" "$((s2 - s1))" "$(python3 -c "print($t2 - $t1)")" "$what"
}

echo "==> achieved rates (slope of two syncs of random data)"
# What this machine does with no limit, sized as for the largest limit: a
# limit above it cannot be reached, whatever the throttle does.
max_rate=0
for r in $RATES; do [ "$r" -gt "$max_rate" ] && max_rate=$r; done
slope "$max_rate" "no limit (machine bound)" "nolimit"
for r in $RATES; do
    slope "$r" "agent --max-rate" "agent$r" --max-rate "${r}MiB/s"
done
for r in $RATES; do
    sed -i '/^max_rate = /d' "$D/receiver.toml"
    sed -i "1i max_rate = \"${r}MiB/s\"" "$D/receiver.toml"
    kill -HUP "$RECEIVER_PID"
    sleep 0.5
    slope "$r" "receiver max_rate (SIGHUP)" "receiver$r"
done
