#!/usr/bin/env bash
# Instant recovery benchmark (issue 6, "Benchmark (not a test)").
#
# How long from starting `lifeboat-receiver serve-pit` on a PIT in the local
# store until a client has read its first 64 KiB over NBD, next to how long
# `launch` of the same PIT takes? Goal: first read < 1 s.
#
#   1. builds the release binaries;
#   2. writes a raw source image (default 1 GiB; 64 KiB blocks, each zeros,
#      text-like or pseudo-random with probability 1/3 each; block 0 is never
#      zeros, so the first read really fetches a chunk);
#   3. puts it into a PIT through the real path: receiver init/enroll/serve on
#      127.0.0.1, one `lifeboat-agent sync --pit`; the receiver is stopped
#      before any timing;
#   4. times, ROUNDS times:
#        first read: start `serve-pit --nbd-listen 127.0.0.1:0`, wait for its
#                    "nbd on ADDR" line, run
#                    `qemu-io -f raw -c 'read -v 0 64k' nbd://ADDR/data` and
#                    check the bytes equal the image's; the time is from the
#                    spawn of serve-pit to qemu-io's exit (and, separately, to
#                    the "nbd on" line); serve-pit is then stopped (SIGTERM);
#        launch:     lifeboat-receiver launch --at latest --out launched.img.
#      Before each timed command dirty data is synced and (as root) the page
#      cache dropped, outside the timed span, then SETTLE (2) seconds of quiet.
#   5. prints each run, the medians, and qemu-io's own cost (the same read of
#      the raw image file) for reference.
#
#   sudo ./scripts/bench-serve-pit.sh
#   sudo SIZE_MIB=4096 ROUNDS=9 KEEP=1 ./scripts/bench-serve-pit.sh
#   SKIP_BUILD=1 ./scripts/bench-serve-pit.sh     # without root: WARM page cache
#
# Everything lives under WORK (default: a new directory in /var/tmp). Needs
# about 3.5x SIZE_MIB of free space, python3, qemu-io and cmp.
set -euo pipefail

SIZE_MIB=${SIZE_MIB:-1024}
ROUNDS=${ROUNDS:-5}
SETTLE=${SETTLE:-2}
SEED=${SEED:-1}

for tool in python3 qemu-io cmp; do
    command -v "$tool" >/dev/null || { echo "bench-serve-pit.sh needs $tool" >&2; exit 1; }
done
if [ "$(id -u)" -eq 0 ]; then
    COLD=1
else
    COLD=0
    echo "not root: the page cache cannot be dropped, so every run is WARM (sudo for cold runs)" >&2
fi

ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/scripts/lib.sh"
export NO_COLOR=1
WORK=$(work_dir lifeboat-bench-serve-pit)
AGENT="$ROOT/target/release/lifeboat-agent"
RECEIVER="$ROOT/target/release/lifeboat-receiver"
D="$WORK/receiver"
IMG="$WORK/source.img"
LAUNCHED="$WORK/launched.img"
RECEIVER_PID=""

stop_receiver() {
    if [ -n "$RECEIVER_PID" ]; then stop_pid "$RECEIVER_PID"; fi
    RECEIVER_PID=""
}

cleanup() {
    set +e
    stop_receiver
    if [ "${KEEP:-0}" = 1 ]; then
        echo "kept $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

build_release "$ROOT"
for bin in "$AGENT" "$RECEIVER"; do
    [ -x "$bin" ] || { echo "missing $bin: build it first" >&2; exit 1; }
done

step "writing a ${SIZE_MIB} MiB source image in $WORK (64 KiB blocks: 1/3 zeros, 1/3 text-like, 1/3 random)"
python3 "$ROOT/scripts/peers/mkimage.py" "$IMG" "$SIZE_MIB" "$SEED" mixed first-random

PORT=$(free_port SOCK_DGRAM)
step "receiver on 127.0.0.1:$PORT"
"$RECEIVER" init --dir "$D" --listen "127.0.0.1:$PORT" >/dev/null
"$RECEIVER" enroll --dir "$D" --server web-1 --out "$WORK/web-1.bundle" >/dev/null
"$RECEIVER" serve --dir "$D" >"$WORK/receiver.out" 2>"$WORK/receiver.log" &
RECEIVER_PID=$!
wait_listening "$WORK/receiver.out" "$WORK/receiver.log" || exit 1

step "agent: sync --pit"
t0=$EPOCHREALTIME
"$AGENT" sync --pit --bundle "$WORK/web-1.bundle" --volume "$IMG" --name data --state-dir "$WORK/agent-state" \
    >"$WORK/sync.out" 2>"$WORK/agent.log" || { echo "sync failed:"; tail -20 "$WORK/agent.log"; exit 1; }
python3 -c "print(f'sync took {$EPOCHREALTIME - $t0:.1f} s')"
stop_receiver
"$RECEIVER" pits --dir "$D" --server web-1 --volume data
echo "store: $(du -sh "$D/store" | cut -f1) on disk"

prepare() {
    rm -f "$LAUNCHED"
    rm -rf "$D/serve-pit"
    sync
    if [ "$COLD" = 1 ]; then echo 3 >/proc/sys/vm/drop_caches; fi
    sleep "$SETTLE"
}

# One timed serve-pit start + first read; prints "listen_s read_s".
first_read() {
    python3 - "$RECEIVER" "$D" "$IMG" "$WORK/serve-pit.log" <<'PY'
import os, signal, subprocess, sys, time
receiver, d, img, log = sys.argv[1:5]
with open(img, "rb") as f:
    want = f.read(64 << 10)
t0 = time.monotonic()
sp = subprocess.Popen(
    [receiver, "serve-pit", "--dir", d, "--server", "web-1", "--volume", "data",
     "--nbd-listen", "127.0.0.1:0"],
    stdout=subprocess.PIPE, stderr=open(log, "ab"), text=True)
try:
    line = sp.stdout.readline()
    t_listen = time.monotonic() - t0
    if not line.startswith("nbd on "):
        sys.exit(f"serve-pit printed {line!r}, not 'nbd on ADDR' (see {log})")
    addr = line.split()[2]
    out = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "read -v 0 64k", f"nbd://{addr}/data"],
        capture_output=True, text=True, timeout=60)
    t_read = time.monotonic() - t0
    if out.returncode != 0 or "failed" in out.stdout:
        sys.exit(f"qemu-io read failed: {out.stdout}{out.stderr}")
    # `read -v` dumps hex lines: "00000000:  01 ab ...  ascii"
    got = bytearray()
    for l in out.stdout.splitlines():
        if len(l) > 10 and l[8] == ":":
            got += bytes.fromhex(l[10:10 + 16 * 3])
    if bytes(got) != want:
        sys.exit(f"the first 64 KiB read over NBD ({len(got)} bytes) differ from the image's")
finally:
    sp.send_signal(signal.SIGTERM)
    try:
        sp.wait(timeout=30)
    except subprocess.TimeoutExpired:
        sp.kill()
        sys.exit("serve-pit did not stop within 30 s of SIGTERM")
if sp.returncode != 0:
    sys.exit(f"serve-pit exited with {sp.returncode} (see {log})")
print(f"{t_listen:.3f} {t_read:.3f}")
PY
}

launch_once() {
    local t0 t1
    prepare
    t0=$EPOCHREALTIME
    "$RECEIVER" launch --dir "$D" --server web-1 --volume data --at latest --out "$LAUNCHED" \
        >>"$WORK/launch.log" 2>&1
    t1=$EPOCHREALTIME
    python3 -c "print(f'{$t1 - $t0:.3f}')"
}

step "launch once and check the output"
prepare
"$RECEIVER" launch --dir "$D" --server web-1 --volume data --at latest --out "$LAUNCHED" >/dev/null 2>&1
cmp "$IMG" "$LAUNCHED"
echo "launched image is byte-identical to the source"

step "timing $ROUNDS rounds ($([ "$COLD" = 1 ] && echo "cold page cache" || echo "WARM page cache"); load average before: $(cut -d' ' -f1-3 /proc/loadavg))"
LISTEN_T=()
READ_T=()
LAUNCH_T=()
for r in $(seq 1 "$ROUNDS"); do
    prepare
    read -r listen first < <(first_read)
    [ -n "${first:-}" ] || { echo "the first-read run failed (see $WORK/serve-pit.log)" >&2; exit 1; }
    l=$(launch_once)
    LISTEN_T+=("$listen")
    READ_T+=("$first")
    LAUNCH_T+=("$l")
    printf 'round %d: serve-pit listening after %s s, first 64 KiB read after %s s; launch %s s\n' \
        "$r" "$listen" "$first" "$l"
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"

# qemu-io's own start-up and read, on the raw image (warm), for reference.
t0=$EPOCHREALTIME
qemu-io -f raw -c 'read 0 64k' "$IMG" >/dev/null
QEMU_IO=$(python3 -c "print(f'{$EPOCHREALTIME - $t0:.3f}')")

python3 - "$SIZE_MIB" "${LISTEN_T[*]}" "${READ_T[*]}" "${LAUNCH_T[*]}" "$QEMU_IO" <<'PY'
import statistics, sys
mib = int(sys.argv[1])
listen = [float(x) for x in sys.argv[2].split()]
read = [float(x) for x in sys.argv[3].split()]
launch = [float(x) for x in sys.argv[4].split()]
qemu_io = float(sys.argv[5])
med = statistics.median
print(f"volume: {mib} MiB")
print(f"serve-pit 'nbd on' line:   median {med(listen):.3f} s, min {min(listen):.3f}, max {max(listen):.3f}")
print(f"first 64 KiB read done:    median {med(read):.3f} s, min {min(read):.3f}, max {max(read):.3f}")
print(f"launch (whole volume):     median {med(launch):.3f} s, min {min(launch):.3f}, max {max(launch):.3f}")
print(f"qemu-io alone (raw file):  {qemu_io:.3f} s")
print(f"first read vs launch: {med(launch) / med(read):.0f}x sooner")
print(f"goal first read < 1 s: {'met' if med(read) < 1 else 'NOT met'}")
PY
