#!/usr/bin/env bash
# Write-order replication over NBD (issue 6, "Benchmark (not a test)").
#
# What does serving an image through `lifeboat-agent run --nbd-listen` cost a
# writer, and how far behind does the receiver fall? `qemu-img bench -w -s
# 65536` through the agent's export vs directly on an image file, same run,
# alternating; replication lag sampled from the agent's metrics meanwhile.
# Goal: NBD throughput >= 0.7x direct, lag p99 < 1 s.
#
#   1. builds the release binaries;
#   2. receiver init/enroll/serve on 127.0.0.1; two sparse images of SIZE_MIB:
#      served.img (through the agent) and direct.img (qemu-img writes it
#      itself);
#   3. agent: run --nbd-listen 127.0.0.1:P --metrics-listen 127.0.0.1:M
#      (waits for the initial sync: CONTINUOUS);
#   4. ROUNDS times, rotating which goes first:
#        direct:   qemu-img bench -w -t writeback -f raw -s 65536 -c COUNT
#                  -d DEPTH --flush-interval=FLUSH direct.img
#        nbd:      the same against nbd://127.0.0.1:P/vm1 (the agent)
#        qemu-nbd: the same against qemu-nbd serving plain.img on 127.0.0.1
#                  (an NBD server with no replication: what the transport
#                  alone costs on this machine)
#      Each writes COUNT x 64 KiB sequentially from offset 0, with a FLUSH
#      every FLUSH requests (each FLUSH closes a replication epoch) and at
#      the end. While the nbd run goes, and until the lag is back to 0, a
#      sampler reads lifeboat_replication_lag_seconds every 100 ms;
#   5. checks the staging volume equals served.img (qemu-img compare);
#   6. prints each run, the throughput ratios of the medians (nbd / direct,
#      qemu-nbd / direct, nbd / qemu-nbd) and the lag percentiles over all
#      samples.
#
#   ./scripts/bench-nbd.sh
#   SIZE_MIB=4096 COUNT=32768 ROUNDS=5 ./scripts/bench-nbd.sh
#   SKIP_BUILD=1 KEEP=1 ./scripts/bench-nbd.sh
set -euo pipefail

SIZE_MIB=${SIZE_MIB:-2048}
COUNT=${COUNT:-16384}
DEPTH=${DEPTH:-16}
FLUSH=${FLUSH:-256}
ROUNDS=${ROUNDS:-3}

for tool in python3 qemu-img qemu-nbd; do
    command -v "$tool" >/dev/null || { echo "bench-nbd.sh needs $tool" >&2; exit 1; }
done
if [ $((COUNT * 64)) -gt $((SIZE_MIB * 1024)) ]; then
    echo "COUNT x 64 KiB must fit in SIZE_MIB" >&2
    exit 1
fi

ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/scripts/lib.sh"
export NO_COLOR=1
WORK=$(work_dir lifeboat-bench-nbd)
AGENT="$ROOT/target/release/lifeboat-agent"
RECEIVER="$ROOT/target/release/lifeboat-receiver"
D="$WORK/receiver"
SERVED="$WORK/served.img"
DIRECT="$WORK/direct.img"
PLAIN="$WORK/plain.img"
PIDS=()

stop_all() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    PIDS=()
}

cleanup() {
    set +e
    stop_all
    if [ "${KEEP:-0}" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

build_release "$ROOT"

step "receiver and agent on 127.0.0.1; three sparse ${SIZE_MIB} MiB images"
RX_PORT=$(free_port SOCK_DGRAM)
NBD_PORT=$(free_port SOCK_STREAM)
METRICS_PORT=$(free_port SOCK_STREAM)
"$RECEIVER" init --dir "$D" --listen "127.0.0.1:$RX_PORT" >/dev/null
printf 'metrics_listen = "off"\n' | cat - "$D/receiver.toml" >"$D/r.toml" && mv "$D/r.toml" "$D/receiver.toml"
"$RECEIVER" enroll --dir "$D" --server web-1 --out "$WORK/web-1.bundle" >/dev/null
"$RECEIVER" serve --dir "$D" >"$WORK/receiver.out" 2>"$WORK/receiver.log" &
PIDS+=($!)
truncate -s "${SIZE_MIB}M" "$SERVED" "$DIRECT" "$PLAIN"
QEMU_NBD_PORT=$(free_port SOCK_STREAM)
qemu-nbd -f raw -x vm1 -b 127.0.0.1 -p "$QEMU_NBD_PORT" --cache=writeback -t "$PLAIN" \
    2>"$WORK/qemu-nbd.log" &
PIDS+=($!)
"$AGENT" run --bundle "$WORK/web-1.bundle" --volume "$SERVED" --name vm1 \
    --state-dir "$WORK/agent-state" --nbd-listen "127.0.0.1:$NBD_PORT" \
    --metrics-listen "127.0.0.1:$METRICS_PORT" >"$WORK/agent.out" 2>"$WORK/agent.log" &
PIDS+=($!)
METRICS="http://127.0.0.1:$METRICS_PORT/metrics"
python3 - "$METRICS" <<'PY' || { echo "agent never CONTINUOUS:"; tail -20 "$WORK/agent.log"; exit 1; }
import sys, time, urllib.request
url = sys.argv[1]
deadline = time.time() + 300
while time.time() < deadline:
    try:
        text = urllib.request.urlopen(url, timeout=2).read().decode()
        if 'state="CONTINUOUS"} 1' in text:
            sys.exit(0)
    except OSError:
        pass
    time.sleep(0.2)
sys.exit(1)
PY
echo "initial sync done"

# qemu-img bench's "Run completed in X seconds." for one target.
bench() {
    qemu-img bench -w -t writeback -f raw -s 65536 -c "$COUNT" -d "$DEPTH" \
        --flush-interval="$FLUSH" "$1" | sed -n 's/^Run completed in \([0-9.]*\) seconds.*/\1/p'
}

SAMPLES="$WORK/lag.samples"
: >"$SAMPLES"
run_nbd() {
    # The sampler runs until told to stop and the lag is back to 0.
    python3 - "$METRICS" "$SAMPLES" "$WORK/stop-sampler" <<'PY' &
import os, re, sys, time, urllib.request
url, out, stop = sys.argv[1], sys.argv[2], sys.argv[3]
pat = re.compile(r'^lifeboat_replication_lag_seconds\{[^}]*volume="vm1"[^}]*\} (\S+)$', re.M)
deadline = time.time() + 600
with open(out, "a") as f:
    while time.time() < deadline:
        try:
            m = pat.search(urllib.request.urlopen(url, timeout=2).read().decode())
        except OSError:
            m = None
        lag = float(m.group(1)) if m else None
        if lag is not None:
            f.write(f"{lag}\n")
        if os.path.exists(stop) and lag == 0.0:
            break
        time.sleep(0.1)
PY
    local sampler=$!
    local t
    t=$(bench "nbd://127.0.0.1:$NBD_PORT/vm1")
    touch "$WORK/stop-sampler"
    wait "$sampler"
    rm -f "$WORK/stop-sampler"
    echo "$t"
}

step "timing $ROUNDS rounds of $COUNT x 64 KiB writes, depth $DEPTH, a FLUSH every $FLUSH (load average before: $(cut -d' ' -f1-3 /proc/loadavg))"
DIRECT_TIMES=()
NBD_TIMES=()
QEMU_TIMES=()
for r in $(seq 1 "$ROUNDS"); do
    case $((r % 3)) in
        1) order="direct nbd qemu-nbd" ;;
        2) order="nbd qemu-nbd direct" ;;
        *) order="qemu-nbd direct nbd" ;;
    esac
    for which in $order; do
        case $which in
            direct) t=$(bench "$DIRECT"); DIRECT_TIMES+=("$t") ;;
            nbd) t=$(run_nbd); NBD_TIMES+=("$t") ;;
            qemu-nbd) t=$(bench "nbd://127.0.0.1:$QEMU_NBD_PORT/vm1"); QEMU_TIMES+=("$t") ;;
        esac
        printf 'round %d %-8s %8s s  %7.1f MiB/s\n' "$r" "$which" "$t" \
            "$(python3 -c "print($COUNT * 64 / 1024 / $t)")"
    done
done

step "checking the staging volume"
qemu-img compare -f raw -F raw "$SERVED" "$D/staging/web-1/vm1.img"

step "results"
python3 - "$COUNT" "$SAMPLES" "${DIRECT_TIMES[*]}" "${NBD_TIMES[*]}" "${QEMU_TIMES[*]}" <<'PY'
import statistics, sys
count, samples = int(sys.argv[1]), sys.argv[2]
direct = [float(x) for x in sys.argv[3].split()]
nbd = [float(x) for x in sys.argv[4].split()]
qemu = [float(x) for x in sys.argv[5].split()]
mib = count * 64 / 1024
md, mn, mq = statistics.median(direct), statistics.median(nbd), statistics.median(qemu)
print(f"direct:   median {md:.3f} s = {mib / md:.1f} MiB/s   runs {direct}")
print(f"nbd:      median {mn:.3f} s = {mib / mn:.1f} MiB/s   runs {nbd}")
print(f"qemu-nbd: median {mq:.3f} s = {mib / mq:.1f} MiB/s   runs {qemu}")
print(f"throughput ratio nbd / direct: {md / mn:.2f}  (goal >= 0.7)")
print(f"throughput ratio qemu-nbd / direct: {md / mq:.2f}  (plain NBD, no replication)")
print(f"throughput ratio nbd / qemu-nbd: {mq / mn:.2f}")
lags = sorted(float(x) for x in open(samples) if x.strip())
if lags:
    def pct(p):
        return lags[min(len(lags) - 1, int(p / 100 * len(lags)))]
    print(f"lag over {len(lags)} samples: p50 {pct(50):.3f} s  p90 {pct(90):.3f} s  "
          f"p99 {pct(99):.3f} s  max {lags[-1]:.3f} s  (goal p99 < 1 s)")
PY
