#!/usr/bin/env bash
# Before/after of a lever: two or more builds of lifeboat-agent and
# lifeboat-receiver, run alternately on the same image in the same run.
#
#   scripts/ab-binaries.sh MODE LABEL=AGENT,RECEIVER [LABEL=AGENT,RECEIVER ...]
#
# MODE initial: the first sync of a mixed image (a third zeros, a third
#   text-like, a third random) into a new receiver. Prints per run the wall
#   time, MiB/s of source, the agent's CPU (user+sys), peak RSS and context
#   switches (voluntary+involuntary), and the receiver's CPU during the sync.
# MODE scan: a sync of an unchanged dense image with the agent's index
#   present, with --threads 1 and --threads 2 (the first sync is untimed).
#
# Build the "before" binaries from the older commit in a worktree, e.g.
#   git worktree add /tmp/before HEAD~1
#   (cd /tmp/before && cargo build --release -p lifeboat-agent -p lifeboat-receiver)
#   scripts/ab-binaries.sh initial before=/tmp/before/target/release/lifeboat-agent,/tmp/before/target/release/lifeboat-receiver \
#       after=target/release/lifeboat-agent,target/release/lifeboat-receiver
#
# Environment: SIZE_MIB (default 2048), ROUNDS (4), SEED (1), AGENT_ARGS
# (extra `sync` arguments, e.g. "--compression-level=-4"), WORK (a directory
# to create; default a new one in /var/tmp), KEEP=1 keeps it.
set -euo pipefail

MODE=${1:-}
shift || true
case $MODE in
    initial | scan) ;;
    *) echo "usage: $0 initial|scan LABEL=AGENT,RECEIVER [LABEL=AGENT,RECEIVER ...]" >&2; exit 2 ;;
esac
[ $# -ge 1 ] || { echo "give at least one LABEL=AGENT,RECEIVER" >&2; exit 2; }
SIZE_MIB=${SIZE_MIB:-2048}
ROUNDS=${ROUNDS:-4}
SEED=${SEED:-1}
read -r -a EXTRA <<<"${AGENT_ARGS:-}"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/scripts/lib.sh"
export NO_COLOR=1

declare -A AGENTS RECEIVERS
LABELS=()
for spec in "$@"; do
    label=${spec%%=*}
    pair=${spec#*=}
    agent=${pair%%,*}
    receiver=${pair#*,}
    if [ "$label" = "$spec" ] || [ "$agent" = "$pair" ]; then
        echo "bad pair '$spec': want LABEL=AGENT,RECEIVER" >&2
        exit 2
    fi
    for b in "$agent" "$receiver"; do
        [ -x "$b" ] || { echo "$label: $b is not an executable" >&2; exit 2; }
    done
    AGENTS[$label]=$(realpath "$agent")
    RECEIVERS[$label]=$(realpath "$receiver")
    LABELS+=("$label")
done

if [ -n "${WORK:-}" ]; then mkdir "$WORK"; else WORK=$(mktemp -d /var/tmp/lifeboat-ab.XXXXXX); fi
RX_PID=""
cleanup() {
    if [ -n "$RX_PID" ]; then kill -9 "$RX_PID" 2>/dev/null || true; wait "$RX_PID" 2>/dev/null || true; fi
    if [ "${KEEP:-0}" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A receiver of build LABEL in DIR (created, with server web-1 enrolled, the
# first time); pid in RX_PID.
start_receiver() {
    local label=$1 dir=$2 port
    local rx=${RECEIVERS[$label]}
    if [ ! -f "$dir/receiver.toml" ]; then
        port=$(free_port SOCK_DGRAM)
        "$rx" init --dir "$dir" --listen "127.0.0.1:$port" >/dev/null
        printf 'metrics_listen = "off"\n' | cat - "$dir/receiver.toml" >"$dir/r.toml" && mv "$dir/r.toml" "$dir/receiver.toml"
        "$rx" enroll --dir "$dir" --server web-1 --out "$dir/web-1.bundle" >/dev/null 2>&1
    fi
    : >"$dir.out"
    "$rx" serve --dir "$dir" >"$dir.out" 2>"$dir.log" &
    RX_PID=$!
    wait_listening "$dir.out" "$dir.log" "$label" || exit 1
}
stop_receiver() {
    kill -9 "$RX_PID" 2>/dev/null || true
    wait "$RX_PID" 2>/dev/null || true
    RX_PID=""
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# One timed sync: sync LABEL DIR IMAGE STATE [args]; prints "wall agent-time-fields".
timed_sync() {
    local label=$1 dir=$2 image=$3 state=$4 t0 t1
    shift 4
    t0=$EPOCHREALTIME
    /usr/bin/time -f '%U %S %M %w %c' -o "$WORK/time" "${AGENTS[$label]}" sync \
        --bundle "$dir/web-1.bundle" --volume "$image" --name vol --state-dir "$state" \
        --json "${EXTRA[@]}" "$@" >"$WORK/sync.json" 2>"$WORK/sync.log" ||
        { echo "$label: sync failed:" >&2; tail -20 "$WORK/sync.log" >&2; exit 1; }
    t1=$EPOCHREALTIME
    echo "$(python3 -c "print(f'{$t1 - $t0:.3f}')") $(cat "$WORK/time")"
}

IMAGE="$WORK/image.img"
if [ "$MODE" = initial ]; then
    python3 "$ROOT/scripts/peers/mkimage.py" "$IMAGE" "$SIZE_MIB" "$SEED" mixed
    printf '%-10s %8s %8s %10s %9s %14s %12s\n' build wall MiB/s agent_cpu agent_rss agent_cs receiver_cpu
    for r in $(seq 1 "$ROUNDS"); do
        # Rotate the order so no build always goes first.
        for i in $(seq 0 $((${#LABELS[@]} - 1))); do
            label=${LABELS[$(((i + r) % ${#LABELS[@]}))]}
            rm -rf "$WORK/rx" "$WORK/state"
            start_receiver "$label" "$WORK/rx"
            sync
            cat "$IMAGE" >/dev/null
            r0=$(cpu_ticks "$RX_PID")
            read -r wall user sys rss vcs ics <<<"$(timed_sync "$label" "$WORK/rx" "$IMAGE" "$WORK/state")"
            r1=$(cpu_ticks "$RX_PID")
            stop_receiver
            cmp "$IMAGE" "$WORK/rx/staging/web-1/vol.img" || { echo "$label: the replica differs from the source" >&2; exit 1; }
            python3 -c "
w, u, s = $wall, $user, $sys
print(f'{\"$label\":<10} {w:8.2f} {$SIZE_MIB / w:8.0f} {u + s:9.2f}s {$rss / 1024:8.1f}M {\"$vcs+$ics\":>14} {($r1 - $r0) / 100:11.2f}s')"
        done
    done
else
    python3 "$ROOT/scripts/peers/mkimage.py" "$IMAGE" "$SIZE_MIB" "$SEED" dense
    printf '%-10s %8s %8s %10s\n' build threads wall GiB/s
    for r in $(seq 1 "$ROUNDS"); do
        for i in $(seq 0 $((${#LABELS[@]} - 1))); do
            label=${LABELS[$(((i + r) % ${#LABELS[@]}))]}
            if [ ! -d "$WORK/rx-$label" ]; then
                # Each build keeps its own receiver and index; the first sync is untimed.
                start_receiver "$label" "$WORK/rx-$label"
                timed_sync "$label" "$WORK/rx-$label" "$IMAGE" "$WORK/state-$label" >/dev/null
                # The receiver takes a PIT after a first sync: let it finish
                # rather than compete with the timed scans.
                for _ in $(seq 1 1200); do
                    grep -q "PIT taken" "$WORK/rx-$label.log" && break
                    sleep 0.1
                done
                stop_receiver
            fi
            start_receiver "$label" "$WORK/rx-$label"
            for threads in 1 2; do
                sync
                cat "$IMAGE" >/dev/null
                read -r wall _ <<<"$(timed_sync "$label" "$WORK/rx-$label" "$IMAGE" "$WORK/state-$label" --threads "$threads")"
                sent=$(python3 -c "import json; print(json.load(open('$WORK/sync.json'))['sent_blocks'])")
                [ "$sent" = 0 ] || { echo "$label: a scan of the unchanged image sent $sent blocks" >&2; exit 1; }
                python3 -c "print(f'{\"$label\":<10} {$threads:8} {$wall:8.2f} {$SIZE_MIB / 1024 / $wall:10.2f}')"
            done
            stop_receiver
        done
    done
fi
