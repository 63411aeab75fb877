#!/usr/bin/env bash
# Continuous-replication lag benchmark (issue 3, "Benchmark (not a test)").
#
# Builds the release binaries, puts a loop device on a sparse file, starts a
# receiver on loopback and `lifeboat-agent run` on the device, waits for the
# initial sync, then writes random 64 KiB blocks with O_DIRECT at a fixed rate
# (benches/examples/write_load.rs) and measures the lag two ways:
#
#   - status: `lifeboat-receiver status --json` sampled every 250 ms
#     (lag_seconds, backlog_bytes: the agent's own view, reported once a second);
#   - end to end: write_load polls the staging volume every 50 ms and notes when
#     each write's header shows up there.
#
#   sudo ./scripts/bench-lag.sh
#   sudo EPOCH_INTERVAL=200ms ./scripts/bench-lag.sh
#   sudo RATE=50MiB SECONDS_LOAD=60 SIZE_MIB=1024 KEEP=1 ./scripts/bench-lag.sh
#   sudo SKIP_BUILD=1 ./scripts/bench-lag.sh     # use target/release as it is
#
# Needs root (loop device, tracefs). Everything it starts is stopped and the loop
# device detached on exit.
set -euo pipefail

RATE=${RATE:-50MiB}
SECONDS_LOAD=${SECONDS_LOAD:-60}
SIZE_MIB=${SIZE_MIB:-1024}
EPOCH_INTERVAL=${EPOCH_INTERVAL:-500ms}
BLOCK=${BLOCK:-64KiB}
SEED=${SEED:-1}
POLL=${POLL:-50ms}
SYNC_TIMEOUT=${SYNC_TIMEOUT:-600}

if [ "$(id -u)" -ne 0 ]; then
    echo "bench-lag.sh needs root (it creates a loop device and the agent reads tracefs); run it with sudo" >&2
    exit 1
fi
for tool in losetup jq python3; do
    command -v "$tool" >/dev/null || { echo "bench-lag.sh needs $tool" >&2; exit 1; }
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/scripts/lib.sh"
export NO_COLOR=1
WORK=$(mktemp -d -t lifeboat-bench-lag.XXXXXX)
AGENT="$ROOT/target/release/lifeboat-agent"
RECEIVER="$ROOT/target/release/lifeboat-receiver"
LOAD="$ROOT/target/release/examples/write_load"
D="$WORK/receiver"
LOOP=""
RECEIVER_PID=""
AGENT_PID=""
SAMPLER_PID=""

cleanup() {
    set +e
    [ -n "$SAMPLER_PID" ] && kill "$SAMPLER_PID" 2>/dev/null && wait "$SAMPLER_PID" 2>/dev/null
    if [ -n "$AGENT_PID" ]; then stop_pid "$AGENT_PID"; fi
    if [ -n "$RECEIVER_PID" ]; then stop_pid "$RECEIVER_PID"; fi
    [ -n "$LOOP" ] && losetup -d "$LOOP"
    if [ "${KEEP:-0}" = 1 ]; then
        echo "kept $WORK (logs, status samples, per-write log)"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

build_release "$ROOT" -p lifeboat-benches --bins --examples
for bin in "$AGENT" "$RECEIVER" "$LOAD"; do
    [ -x "$bin" ] || { echo "missing $bin: build it first" >&2; exit 1; }
done

step "loop device on a ${SIZE_MIB} MiB sparse file in $WORK"
truncate -s "${SIZE_MIB}M" "$WORK/source.img"
LOOP=$(losetup -f --show "$WORK/source.img")
echo "source: $LOOP"

PORT=$(free_port SOCK_DGRAM)
step "receiver on 127.0.0.1:$PORT"
"$RECEIVER" init --dir "$D" --listen "127.0.0.1:$PORT" >/dev/null
"$RECEIVER" enroll --dir "$D" --server web-1 --out "$WORK/web-1.bundle" >/dev/null
"$RECEIVER" serve --dir "$D" >"$WORK/receiver.out" 2>"$WORK/receiver.log" &
RECEIVER_PID=$!
wait_listening "$WORK/receiver.out" "$WORK/receiver.log" || exit 1

step "agent: run --epoch-interval $EPOCH_INTERVAL"
"$AGENT" run --bundle "$WORK/web-1.bundle" --volume "$LOOP" --name data \
    --state-dir "$WORK/agent-state" --epoch-interval "$EPOCH_INTERVAL" \
    >"$WORK/agent.out" 2>"$WORK/agent.log" &
AGENT_PID=$!

status_row() {
    "$RECEIVER" status --dir "$D" --json 2>/dev/null |
        jq -c '.[] | select(.server == "web-1" and .volume == "data")' 2>/dev/null || true
}

step "waiting for the initial sync (state CONTINUOUS)"
t0=$(date +%s)
while :; do
    row=$(status_row)
    state=$(jq -r '.state // empty' <<<"$row" 2>/dev/null || true)
    [ "$state" = CONTINUOUS ] && break
    kill -0 "$AGENT_PID" 2>/dev/null || { echo "agent exited:"; tail -20 "$WORK/agent.log"; exit 1; }
    if [ $(( $(date +%s) - t0 )) -gt "$SYNC_TIMEOUT" ]; then
        echo "no CONTINUOUS after ${SYNC_TIMEOUT}s; last status: $row"; tail -20 "$WORK/agent.log"; exit 1
    fi
    sleep 0.5
done
echo "initial sync done in $(( $(date +%s) - t0 )) s: $(jq -c '{state, tracking, epoch}' <<<"$row")"
sleep 2

# utime + stime of a process, in clock ticks.
cpu_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }
TCK=$(getconf CLK_TCK)

step "sampling status every 250 ms"
(
    while :; do
        row=$(status_row)
        [ -n "$row" ] && printf '%s %s\n' "$(date +%s.%N)" "$row"
        sleep 0.25
    done
) >"$WORK/status.samples" &
SAMPLER_PID=$!

step "load: random $BLOCK writes at $RATE for $SECONDS_LOAD s (load average before: $(cut -d' ' -f1-3 /proc/loadavg))"
A0=$(cpu_ticks "$AGENT_PID"); R0=$(cpu_ticks "$RECEIVER_PID"); W0=$(date +%s.%N)
"$LOAD" --device "$LOOP" --rate "$RATE" --seconds "$SECONDS_LOAD" --block "$BLOCK" --seed "$SEED" \
    --staging "$D/staging/web-1/data.img" --poll "$POLL" --settle 60 --log "$WORK/writes.csv" |
    tee "$WORK/load.out"
A1=$(cpu_ticks "$AGENT_PID"); R1=$(cpu_ticks "$RECEIVER_PID"); W1=$(date +%s.%N)
LOADAVG=$(cut -d' ' -f1-3 /proc/loadavg)
sleep 2
kill "$SAMPLER_PID" 2>/dev/null; wait "$SAMPLER_PID" 2>/dev/null || true
SAMPLER_PID=""

step "results (epoch interval $EPOCH_INTERVAL)"
python3 - "$WORK/status.samples" <<'PY'
import json, sys
rows = []
for line in open(sys.argv[1]):
    t, _, js = line.partition(" ")
    try:
        rows.append((float(t), json.loads(js)))
    except ValueError:
        pass
def pct(v, p):
    v = sorted(v)
    if not v:
        return float("nan")
    import math
    return v[max(1, math.ceil(p / 100 * len(v))) - 1]
# Only the samples taken while the load ran or drained (state seen after the
# first non-zero lag or backlog, up to the end).
lags = [r["lag_seconds"] for _, r in rows]
backlogs = [r["backlog_bytes"] for _, r in rows]
states = sorted({r["state"] for _, r in rows})
# One value per status-file update (the file changes at most once a second).
seen, dedup = set(), []
for _, r in rows:
    k = r.get("updated_at_unix_ms", r.get("last_contact_unix_ms"))
    if k not in seen:
        seen.add(k)
        dedup.append(r["lag_seconds"])
epochs = [r["epoch"] for _, r in rows]
print(f"status samples: {len(rows)} (every 250 ms), {len(dedup)} distinct updates; states seen: {', '.join(states)}")
print(f"status lag_seconds, all samples:      p50 {pct(lags,50):.2f}  p99 {pct(lags,99):.2f}  max {max(lags, default=float('nan')):.2f}")
print(f"status lag_seconds, distinct updates: p50 {pct(dedup,50):.2f}  p99 {pct(dedup,99):.2f}  max {max(dedup, default=float('nan')):.2f}")
print(f"status backlog_bytes max: {max(backlogs, default=0)} ({max(backlogs, default=0)/2**20:.1f} MiB)")
if epochs:
    print(f"epochs: {epochs[0]} -> {epochs[-1]} ({epochs[-1]-epochs[0]} during the run)")
PY
awk -v a0="$A0" -v a1="$A1" -v r0="$R0" -v r1="$R1" -v w0="$W0" -v w1="$W1" -v tck="$TCK" 'BEGIN {
    w = w1 - w0
    printf "CPU over the %.1f s of load + settle: agent %.2f s (%.0f %% of a core), receiver %.2f s (%.0f %%)\n",
        w, (a1-a0)/tck, 100*(a1-a0)/tck/w, (r1-r0)/tck, 100*(r1-r0)/tck/w
}'
echo "load average at the end: $LOADAVG"
grep "^RESULT" "$WORK/load.out" | sed 's/^RESULT/load:/'
nocolor() { sed 's/\x1b\[[0-9;]*m//g' "$@"; }
echo "agent log: $(nocolor "$WORK/agent.log" | grep -c -E ' (WARN|ERROR) ' || true) warnings/errors; receiver log: $(nocolor "$WORK/receiver.log" | grep -c -E ' (WARN|ERROR) ' || true)"
for f in agent receiver; do nocolor "$WORK/$f.log" | grep -E ' (WARN|ERROR) ' | sed "s/^/$f: /" | head -5 || true; done

step "checking the replica"
if cmp "$LOOP" "$D/staging/web-1/data.img"; then
    echo "staging volume is byte-identical to $LOOP"
else
    echo "staging volume DIFFERS from $LOOP"
fi
