#!/usr/bin/env bash
# Launch (RTO) benchmark (issue 4, "Benchmark (not a test)").
#
# How long does `lifeboat-receiver launch` take to rebuild a volume from a PIT in
# the local store, next to `cp --sparse=always` of the raw image on the same
# machine? Goal: launch at >= 0.8x cp's speed (cp time / launch time >= 0.8)
# while it verifies the BLAKE3 digest of every block.
#
#   1. builds the release binaries;
#   2. writes a raw source image (default 4 GiB, zeros written out like a dump
#      of a block device): 64 KiB blocks, each zeros, text-like or pseudo-random
#      with probability 1/3 each;
#   3. puts it into a PIT through the real path: receiver init/enroll/serve on
#      127.0.0.1, one `lifeboat-agent sync --pit` (it waits until the receiver
#      has taken the PIT); the receiver is stopped before any timing;
#   4. launches the PIT once and checks the output equals the image (cmp);
#   5. times, ROUNDS times, alternating which goes first:
#        launch:  lifeboat-receiver launch --at latest --out launched.img
#        cp:      cp --sparse=always source.img copy.img && sync copy.img
#      Both outputs are fsynced: launch fsyncs its file (and the directory)
#      itself; `sync FILE` fsyncs the copy. Before each timed command both
#      outputs are removed, dirty data is synced and (as root) the page cache
#      is dropped, outside the timed span, followed by SETTLE (5) seconds of
#      quiet: each run starts cold, reading the store (launch) or the image
#      (cp) from disk.
#   6. prints each run and the ratio cp / launch of the medians.
#
#   sudo ./scripts/bench-launch.sh
#   sudo SIZE_MIB=1024 ROUNDS=9 KEEP=1 ./scripts/bench-launch.sh
#   sudo SKIP_BUILD=1 WORK=/srv/bench ./scripts/bench-launch.sh   # WORK: a directory to create
#   ./scripts/bench-launch.sh           # without root: page cache NOT dropped (warm runs)
#
# Everything lives under WORK (default: a new directory in /var/tmp); image,
# store and outputs share one filesystem. Needs about 3.5x SIZE_MIB of free
# space (image, staging replica, store, two outputs).
set -euo pipefail

SIZE_MIB=${SIZE_MIB:-4096}
ROUNDS=${ROUNDS:-5}
SETTLE=${SETTLE:-5}
SEED=${SEED:-1}

for tool in python3 cmp; do
    command -v "$tool" >/dev/null || { echo "bench-launch.sh needs $tool" >&2; exit 1; }
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
WORK=$(work_dir lifeboat-bench-launch)
AGENT="$ROOT/target/release/lifeboat-agent"
RECEIVER="$ROOT/target/release/lifeboat-receiver"
D="$WORK/receiver"
IMG="$WORK/source.img"
LAUNCHED="$WORK/launched.img"
COPY="$WORK/copy.img"
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
python3 "$ROOT/scripts/peers/mkimage.py" "$IMG" "$SIZE_MIB" "$SEED" mixed

PORT=$(free_port SOCK_DGRAM)
step "receiver on 127.0.0.1:$PORT"
"$RECEIVER" init --dir "$D" --listen "127.0.0.1:$PORT" >/dev/null
"$RECEIVER" enroll --dir "$D" --server web-1 --out "$WORK/web-1.bundle" >/dev/null
"$RECEIVER" serve --dir "$D" >"$WORK/receiver.out" 2>"$WORK/receiver.log" &
RECEIVER_PID=$!
wait_listening "$WORK/receiver.out" "$WORK/receiver.log" || exit 1

step "agent: sync --pit (returns once the receiver has taken the PIT)"
t0=$EPOCHREALTIME
"$AGENT" sync --bundle "$WORK/web-1.bundle" --volume "$IMG" --name data --state-dir "$WORK/agent-state" --pit \
    2>"$WORK/agent.log" || { echo "sync failed:"; tail -20 "$WORK/agent.log"; exit 1; }
python3 -c "print(f'sync took {$EPOCHREALTIME - $t0:.1f} s')"
stop_receiver

"$RECEIVER" pits --dir "$D" --server web-1 --volume data
NPITS=$("$RECEIVER" pits --dir "$D" --server web-1 --volume data --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
[ "$NPITS" -ge 1 ] || { echo "no PIT was taken" >&2; exit 1; }
echo "store: $(du -sh "$D/store" | cut -f1) on disk"

launch_cmd() {
    "$RECEIVER" launch --dir "$D" --server web-1 --volume data --at latest --out "$LAUNCHED"
}
cp_cmd() {
    cp --sparse=always "$IMG" "$COPY" && sync "$COPY"
}

# Outside the timed span: no outputs, nothing dirty, (as root) a cold page
# cache, then SETTLE seconds of quiet. Without the pause, whichever command ran
# right after the other's 2.7 GiB output was deleted ran slower (the disk
# still busy with the delete); the pause shrinks that order effect.
prepare() {
    rm -f "$LAUNCHED" "$COPY"
    sync
    if [ "$COLD" = 1 ]; then echo 3 >/proc/sys/vm/drop_caches; fi
    sleep "$SETTLE"
}

step "launch once and check the output"
prepare
launch_cmd 2>"$WORK/launch.log" || { echo "launch failed:"; tail -20 "$WORK/launch.log"; exit 1; }
cmp "$IMG" "$LAUNCHED"
echo "launched image is byte-identical to the source; allocated: $(du -h "$LAUNCHED" | cut -f1) of $(du -h --apparent-size "$LAUNCHED" | cut -f1)"
cp_cmd
echo "cp --sparse=always copy allocated: $(du -h "$COPY" | cut -f1)"

# Wall seconds of one run of "$@"; its output goes to $WORK/runs.log.
timed() {
    local t0 t1
    prepare
    t0=$EPOCHREALTIME
    "$@" >>"$WORK/runs.log" 2>&1
    t1=$EPOCHREALTIME
    python3 -c "print(f'{$t1 - $t0:.3f}')"
}

step "timing $ROUNDS rounds ($([ "$COLD" = 1 ] && echo "cold page cache" || echo "WARM page cache"); load average before: $(cut -d' ' -f1-3 /proc/loadavg))"
LAUNCH_T=()
CP_T=()
for r in $(seq 1 "$ROUNDS"); do
    if [ $((r % 2)) = 1 ]; then
        l=$(timed launch_cmd); c=$(timed cp_cmd)
    else
        c=$(timed cp_cmd); l=$(timed launch_cmd)
    fi
    LAUNCH_T+=("$l")
    CP_T+=("$c")
    printf 'round %d: launch %s s, cp %s s, cp/launch %s\n' "$r" "$l" "$c" \
        "$(python3 -c "print(f'{$c / $l:.2f}')")"
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
grep -h "^launched" "$WORK/runs.log" | tail -1

python3 - "$SIZE_MIB" "${LAUNCH_T[*]}" "${CP_T[*]}" <<'PY'
import statistics, sys
mib = int(sys.argv[1])
launch = [float(x) for x in sys.argv[2].split()]
cp = [float(x) for x in sys.argv[3].split()]
ml, mc = statistics.median(launch), statistics.median(cp)
gib = mib / 1024
print(f"launch: median {ml:.2f} s ({gib / ml:.2f} GiB/s of volume), min {min(launch):.2f}, max {max(launch):.2f}")
print(f"cp:     median {mc:.2f} s ({gib / mc:.2f} GiB/s of volume), min {min(cp):.2f}, max {max(cp):.2f}")
pairs = [c / l for l, c in zip(launch, cp)]
ratio = mc / ml
print(f"ratio cp/launch (medians): {ratio:.2f}  (per round: {', '.join(f'{p:.2f}' for p in pairs)})")
print(f"goal >= 0.8: {'met' if ratio >= 0.8 else 'NOT met'}")
PY
