#!/usr/bin/env bash
# Lifeboat against the tools users would pick instead (issue 8, "Performance at
# the hardware limit, measured against the tools users would pick instead").
#
# Every comparison runs on this machine, in this run, ROUNDS times (rotating
# which command goes first), and is judged on medians. Goals:
#
#   resync   incremental resync of a SIZE_MIB image with 1 % of its 64 KiB
#            blocks changed at random (seeded), over loopback:
#              lifeboat-agent sync (index present; the first sync is untimed)
#              rsync --inplace --no-whole-file to an rsync daemon on 127.0.0.1
#              bdsync BDSYNC_OPTS "bdsync --server" SRC DST | bdsync --patch=DST
#            rsync's and bdsync's targets already hold the old image; every
#            timed command ends with the target fsynced (`sync FILE`; Lifeboat's
#            receiver fsyncs before it acknowledges). After every run the
#            target must equal the source (cmp), else the script fails.
#            Goal: Lifeboat >= 4x faster than rsync, >= 2x faster than bdsync.
#   initial  first sync of SIZE_MIB of mixed data (a third zeros, a third
#            text-like, a third random) into a new, empty receiver, against two
#            bounds: `zstd -1 -T2 -c FILE > /dev/null` (compression) and UDP on
#            loopback (iperf3 -u -b 0 -l UDP_LEN, rate received). The UDP bound
#            is in wire bytes; it is turned into source bytes with Lifeboat's
#            own source/sent ratio of that sync.
#            Goal: Lifeboat >= 0.8x the lower bound (source bytes per second).
#            For context (not a goal): dd of the same image to a file on the
#            receiver's filesystem with conv=sparse,fdatasync, the rate its disk
#            makes the data durable at. Also, on machines with 2 or more CPUs, the same sync with the agent
#            pinned to CPU 0 and the receiver to CPU 1 (taskset), against
#            `zstd -1 -T1` pinned to CPU 0: per core, with the receiver off the
#            agent's core as in a real deployment (ratio initial_1core_vs_zstd).
#   scan     a sync of an unchanged image with the agent's index present (it
#            reads, hashes and compares every block, sends nothing), with
#            --threads 1 and --threads 2, against `b3sum --num-threads 1 FILE`
#            and `b3sum FILE`. The image has no zero blocks (Lifeboat does not
#            hash a zero block; b3sum would).
#            Goal: Lifeboat 1 thread >= 0.9x b3sum 1 thread; Lifeboat 2
#            threads >= 1.8x b3sum 1 thread.
#   cost     (measured during resync and initial, not a run of its own) the
#            agent's CPU time (user+sys) per GiB of volume and peak RSS
#            (/usr/bin/time), and its index file size per block (under
#            --state-dir). Goal: RSS <= 64 MiB + index; index <= 32 B/block.
#   launch   lifeboat-receiver launch of a SIZE_MIB PIT (mixed data, taken with
#            `sync --pit`) to a new file against `cp --sparse=always` of the
#            raw image followed by `sync FILE`. Goal: cp time / launch >= 0.8.
#
# Page cache: CACHE=warm (the default) reads each timed command's inputs once
# right before it (source image, rsync/bdsync targets, the PIT store), so every
# run measures CPU and protocol, not the disk. CACHE=cold drops the page cache
# before every timed run instead (root only). One mode for the whole run.
#
# The table at the end shows, per ratio, the medians, the ratio, its goal,
# PASS/BELOW, and its floor from FLOORS (default scripts/bench-peers.floors,
# `name value` per line). The script exits 1 when a ratio falls below its floor;
# missing goals alone do not fail it. FLOORS=none skips the check.
#
# Installs what is missing (apt-get: rsync, zstd, iperf3; b3sum with
# `cargo install b3sum`, else apt's). bdsync: used from PATH; else apt's
# package if this release has one; else built from a checkout of its source
# given as BDSYNC_SRC=DIR (needs gcc, make, libssl-dev; installed to
# /usr/local/bin); else the bdsync runs are skipped with a message.
#
#   sudo ./scripts/bench-peers.sh                        # 4 GiB, 3 rounds, everything
#   sudo SIZE_MIB=1024 SKIP_BUILD=1 ./scripts/bench-peers.sh
#   sudo ONLY=resync,scan ROUNDS=5 ./scripts/bench-peers.sh
#   sudo BDSYNC_SRC=/src/bdsync KEEP=1 WORK=/srv/bench ./scripts/bench-peers.sh  # WORK: a directory to create
#
# Everything lives under WORK (default: a new directory in /var/tmp); needs
# about 8x SIZE_MIB of free space at the peak (resync: image, staging, two
# targets, PIT store; launch: image, staging, store, two outputs).
set -euo pipefail

SIZE_MIB=${SIZE_MIB:-4096}
ROUNDS=${ROUNDS:-3}
SEED=${SEED:-1}
CHANGE_PERCENT=${CHANGE_PERCENT:-1}
CACHE=${CACHE:-warm}
ONLY=${ONLY:-resync,scan,initial,launch}
UDP_LEN=${UDP_LEN:-1452}
UDP_SECONDS=${UDP_SECONDS:-5}
BDSYNC_OPTS=${BDSYNC_OPTS:---blocksize=65536}

ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/scripts/lib.sh"
PEERS="$ROOT/scripts/peers"
FLOORS=${FLOORS:-$ROOT/scripts/bench-peers.floors}
export NO_COLOR=1

want() { case ",$ONLY," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

for c in $(echo "$ONLY" | tr ',' ' '); do
    case $c in
        resync | scan | initial | launch) ;;
        cost) echo "cost is measured during resync and initial: ONLY=resync,initial" >&2; exit 1 ;;
        *) echo "ONLY: unknown comparison '$c' (resync, scan, initial, launch)" >&2; exit 1 ;;
    esac
done
case $CACHE in
    warm) ;;
    cold) [ "$(id -u)" -eq 0 ] || { echo "CACHE=cold needs root (drop_caches)" >&2; exit 1; } ;;
    *) echo "CACHE must be warm or cold" >&2; exit 1 ;;
esac

# --- tools -------------------------------------------------------------------
APT_UPDATED=0
apt_install() {
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
        echo "missing $*: install it (needs root and apt-get to do it here)" >&2
        exit 1
    fi
    if [ "$APT_UPDATED" = 0 ]; then
        echo "apt-get update"
        apt-get update -qq
        APT_UPDATED=1
    fi
    echo "installing with apt-get: $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

step "tools"
for tool in python3 cmp /usr/bin/time; do
    command -v "$tool" >/dev/null || { echo "bench-peers.sh needs $tool" >&2; exit 1; }
done
if want resync; then
    command -v rsync >/dev/null || apt_install rsync
fi
if want initial; then
    command -v zstd >/dev/null || apt_install zstd
    command -v iperf3 >/dev/null || apt_install iperf3
fi
if want scan && ! command -v b3sum >/dev/null; then
    if command -v cargo >/dev/null; then
        echo "installing b3sum: cargo install b3sum"
        cargo install --quiet b3sum
        export PATH="$PATH:${CARGO_HOME:-$HOME/.cargo}/bin"
    else
        apt_install b3sum
    fi
fi
BDSYNC=""
if want resync; then
    if command -v bdsync >/dev/null; then
        BDSYNC=$(command -v bdsync)
    elif command -v apt-cache >/dev/null &&
        apt-cache policy bdsync 2>/dev/null | grep -q 'Candidate: [0-9]'; then
        apt_install bdsync
        BDSYNC=$(command -v bdsync)
    elif [ -n "${BDSYNC_SRC:-}" ] && [ -f "$BDSYNC_SRC/bdsync.c" ]; then
        command -v cc >/dev/null || apt_install gcc
        command -v make >/dev/null || apt_install make
        [ -e /usr/include/openssl/evp.h ] || apt_install libssl-dev
        echo "building bdsync from $BDSYNC_SRC, installing it to /usr/local/bin"
        make -s -C "$BDSYNC_SRC" bdsync >/dev/null
        install -m 0755 "$BDSYNC_SRC/bdsync" /usr/local/bin/bdsync
        BDSYNC=/usr/local/bin/bdsync
    else
        echo "bdsync: not on PATH, no apt package in this release, and no BDSYNC_SRC=DIR (a checkout" >&2
        echo "        of its source) to build from: the bdsync runs are SKIPPED" >&2
    fi
fi
for t in rsync zstd iperf3 b3sum bdsync; do
    command -v "$t" >/dev/null && printf '  %-7s %s\n' "$t" "$(command -v "$t")"
done
build_release "$ROOT"
AGENT="$ROOT/target/release/lifeboat-agent"
RECEIVER="$ROOT/target/release/lifeboat-receiver"
for bin in "$AGENT" "$RECEIVER"; do
    [ -x "$bin" ] || { echo "missing $bin: build it first" >&2; exit 1; }
done

# --- work directory, processes, cleanup ----------------------------------------
if [ -n "${WORK:-}" ]; then
    mkdir "$WORK"
else
    WORK=$(mktemp -d -p "${TMPDIR:-/var/tmp}" lifeboat-bench-peers.XXXXXX)
fi
WORK=$(cd "$WORK" && pwd)
RESULTS="$WORK/results"
: >"$RESULTS"
PIDS=()
MAIN_PID=""

cleanup() {
    set +e
    local pid
    for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
    if [ "${KEEP:-0}" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

record() { echo "$1 $2" >>"$RESULTS"; }
elapsed() { python3 -c "print(f'{$2 - $1:.3f}')"; }

# Before each timed command: its inputs in the page cache (warm) or the page
# cache dropped (cold); dirty data written back either way.
prepare() {
    sync
    if [ "$CACHE" = cold ]; then
        echo 3 >/proc/sys/vm/drop_caches
    else
        local f
        for f in "$@"; do
            if [ -d "$f" ]; then
                find "$f" -type f -print0 | xargs -0 -r cat >/dev/null
            else
                cat "$f" >/dev/null
            fi
        done
    fi
}

# A receiver in DIR on a free loopback port, server web-1 enrolled
# (DIR/web-1.bundle); its pid in RX_PID.
start_receiver() {
    local dir=$1 port
    port=$(free_port SOCK_DGRAM)
    "$RECEIVER" init --dir "$dir" --listen "127.0.0.1:$port" >/dev/null
    printf 'metrics_listen = "off"\n' | cat - "$dir/receiver.toml" >"$dir/r.toml" && mv "$dir/r.toml" "$dir/receiver.toml"
    "$RECEIVER" enroll --dir "$dir" --server web-1 --out "$dir/web-1.bundle" >/dev/null
    ${RX_PIN:-} "$RECEIVER" serve --dir "$dir" >"$dir.out" 2>"$dir.log" &
    RX_PID=$!
    PIDS+=("$RX_PID")
    wait_listening "$dir.out" "$dir.log" || exit 1
}
# Stops one process started here and forgets it.
stop_receiver() {
    local pid=$1 p keep=()
    stop_pid "$pid"
    for p in "${PIDS[@]}"; do [ "$p" = "$pid" ] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}

# One timed `lifeboat-agent sync`: agent_sync TAG DIR VOLUME NAME STATE [args].
# Prints the wall seconds; the --json summary goes to WORK/TAG.json and
# /usr/bin/time's "wall user sys maxrss_kib" to WORK/TAG.time.
agent_sync() {
    local tag=$1 dir=$2 vol=$3 name=$4 state=$5 t0 t1
    shift 5
    t0=$EPOCHREALTIME
    /usr/bin/time -f '%e %U %S %M' -o "$WORK/$tag.time" \
        ${AGENT_PIN:-} "$AGENT" sync --bundle "$dir/web-1.bundle" --volume "$vol" --name "$name" \
        --state-dir "$state" --json "$@" >"$WORK/$tag.json" 2>>"$WORK/agent.log" ||
        { echo "sync $tag failed:" >&2; tail -20 "$WORK/agent.log" >&2; exit 1; }
    t1=$EPOCHREALTIME
    elapsed "$t0" "$t1"
}
json_field() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$1" "$2"; }
cpu_of() { awk '{printf "%.3f\n", $2 + $3}' "$1"; }
rss_of() { awk '{print $4}' "$1"; }

# Wall seconds of "$@" (stdout and stderr to WORK/runs.log).
timed() {
    local t0 t1
    t0=$EPOCHREALTIME
    "$@" >>"$WORK/runs.log" 2>&1 || { echo "failed: $*" >&2; tail -20 "$WORK/runs.log" >&2; exit 1; }
    t1=$EPOCHREALTIME
    elapsed "$t0" "$t1"
}

# Rotate the order of a round's members: order ROUND member...
order() {
    local r=$1
    shift
    local a=("$@") n=$# i
    for i in $(seq 0 $((n - 1))); do printf '%s ' "${a[$(((i + r) % n))]}"; done
}

SIZE_BYTES=$((SIZE_MIB * 1024 * 1024))
BLOCKS=$((SIZE_BYTES / 65536))
record size_bytes "$SIZE_BYTES"
D="$WORK/main"           # the receiver for resync, scan and launch
DENSE="$WORK/dense.img"  # resync and scan: no zero blocks
MIXED="$WORK/mixed.img"  # initial and launch: 1/3 zeros, 1/3 text, 1/3 random
echo "WORK=$WORK  SIZE_MIB=$SIZE_MIB  ROUNDS=$ROUNDS  CACHE=$CACHE  ONLY=$ONLY"
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"

if want resync || want scan || want launch; then
    step "receiver on 127.0.0.1 for resync/scan/launch"
    start_receiver "$D"
    MAIN_PID=$RX_PID
fi
if want resync || want scan; then
    step "writing a ${SIZE_MIB} MiB dense image (no zero blocks)"
    python3 "$PEERS/mkimage.py" "$DENSE" "$SIZE_MIB" "$SEED" dense
    step "untimed first sync of the dense image"
    t=$(agent_sync dense-first "$D" "$DENSE" dense "$WORK/state-dense")
    echo "took $t s"
    cmp "$DENSE" "$D/staging/web-1/dense.img"
    INDEX="$WORK/state-dense/web-1/dense.index"
    if [ -f "$INDEX" ]; then
        record index.bytes "$(stat -c %s "$INDEX")"
        record index.blocks "$BLOCKS"
    else
        echo "no agent index at $INDEX (files in the state dir: $(find "$WORK/state-dense" -type f))" >&2
    fi
fi

# --- 1. resync ------------------------------------------------------------------
if want resync; then
    RDST="$WORK/rsync-dst"
    BDST="$WORK/bdsync.img"
    mkdir "$RDST"
    step "rsync daemon on 127.0.0.1; rsync and bdsync targets hold the old image"
    RSYNC_PORT=$(free_port SOCK_STREAM)
    cat >"$WORK/rsyncd.conf" <<EOF
use chroot = no
pid file = $WORK/rsyncd.pid
log file = $WORK/rsyncd.log
[bench]
    path = $RDST
    read only = false
    uid = root
    gid = root
EOF
    rsync --daemon --no-detach --address=127.0.0.1 --port="$RSYNC_PORT" --config="$WORK/rsyncd.conf" &
    RSYNCD_PID=$!
    PIDS+=("$RSYNCD_PID")
    for _ in $(seq 1 50); do
        rsync "rsync://127.0.0.1:$RSYNC_PORT/" >/dev/null 2>&1 && break
        sleep 0.1
    done
    RURL="rsync://127.0.0.1:$RSYNC_PORT/bench/dense.img"
    rsync "$DENSE" "$RURL"
    cmp "$DENSE" "$RDST/dense.img"
    if [ -n "$BDSYNC" ]; then cp "$DENSE" "$BDST"; fi

    lifeboat_resync() { agent_sync "resync-$r" "$D" "$DENSE" dense "$WORK/state-dense"; }
    # --ignore-times: rsync's quick check (same size and mtime to the second)
    # would skip the file when a small image is changed within the second of
    # the last copy; a changed image on a real server always has a newer
    # mtime, so rsync does the same delta transfer either way.
    rsync_resync() { rsync --inplace --no-whole-file --ignore-times --stats "$DENSE" "$RURL" && sync "$RDST/dense.img"; }
    bdsync_resync() {
        "$BDSYNC" $BDSYNC_OPTS "$BDSYNC --server" "$DENSE" "$BDST" | "$BDSYNC" --patch="$BDST" && sync "$BDST"
    }
    members=(lifeboat rsync)
    [ -n "$BDSYNC" ] && members+=(bdsync)
    step "resync: $ROUNDS rounds, each after changing $CHANGE_PERCENT % of the blocks (${CACHE} page cache)"
    for r in $(seq 1 "$ROUNDS"); do
        n=$(python3 "$PEERS/mutate.py" "$DENSE" "$((SEED * 1000 + r))" "$CHANGE_PERCENT")
        line="round $r ($n blocks changed):"
        for m in $(order "$r" "${members[@]}"); do
            case $m in
                lifeboat)
                    prepare "$DENSE"
                    t=$(lifeboat_resync)
                    cmp "$DENSE" "$D/staging/web-1/dense.img" || { echo "lifeboat: staging differs from the source" >&2; exit 1; }
                    [ "$(json_field "$WORK/resync-$r.json" changed_blocks)" = "$n" ] ||
                        echo "note: lifeboat reported $(json_field "$WORK/resync-$r.json" changed_blocks) changed blocks, $n were changed"
                    record resync.fetched_digests "$(json_field "$WORK/resync-$r.json" fetched_digests)"
                    record resync.agent_cpu "$(cpu_of "$WORK/resync-$r.time")"
                    record resync.agent_rss_kib "$(rss_of "$WORK/resync-$r.time")"
                    ;;
                rsync)
                    prepare "$DENSE" "$RDST/dense.img"
                    t=$(timed rsync_resync)
                    cmp "$DENSE" "$RDST/dense.img" || { echo "rsync: target differs from the source" >&2; exit 1; }
                    ;;
                bdsync)
                    prepare "$DENSE" "$BDST"
                    t=$(timed bdsync_resync)
                    cmp "$DENSE" "$BDST" || { echo "bdsync: target differs from the source" >&2; exit 1; }
                    ;;
            esac
            record "resync.$m" "$t"
            line+=" $m $t s;"
        done
        echo "$line targets equal the source"
    done
    stop_receiver "$RSYNCD_PID"
    rm -rf "$RDST" "$BDST"
fi

# --- 3. scan ----------------------------------------------------------------------
if want scan; then
    step "scan of the unchanged dense image: $ROUNDS rounds (${CACHE} page cache)"
    for r in $(seq 1 "$ROUNDS"); do
        line="round $r:"
        for m in $(order "$r" lifeboat_1t lifeboat_2t b3sum_1t b3sum); do
            prepare "$DENSE"
            case $m in
                lifeboat_1t) t=$(agent_sync "scan1-$r" "$D" "$DENSE" dense "$WORK/state-dense" --threads 1) ;;
                lifeboat_2t) t=$(agent_sync "scan2-$r" "$D" "$DENSE" dense "$WORK/state-dense" --threads 2) ;;
                b3sum_1t) t=$(timed b3sum --num-threads 1 "$DENSE") ;;
                b3sum) t=$(timed b3sum "$DENSE") ;;
            esac
            case $m in lifeboat_*)
                tag=$([ "$m" = lifeboat_1t ] && echo scan1 || echo scan2)
                sent=$(json_field "$WORK/$tag-$r.json" sent_blocks)
                [ "$sent" = 0 ] || { echo "scan of an unchanged image sent $sent blocks" >&2; exit 1; }
                record scan.fetched_digests "$(json_field "$WORK/$tag-$r.json" fetched_digests)"
                ;;
            esac
            record "scan.$m" "$t"
            line+=" $m $t s;"
        done
        echo "$line"
    done
fi

# --- 2. initial -----------------------------------------------------------------
if want initial || want launch; then
    step "writing a ${SIZE_MIB} MiB mixed image (1/3 zeros, 1/3 text-like, 1/3 random)"
    python3 "$PEERS/mkimage.py" "$MIXED" "$SIZE_MIB" "$((SEED + 1))" mixed
fi
if want initial; then
    # Receiver-side UDP rate of one iperf3 run (bytes per second).
    udp_bound() {
        local port spid
        port=$(free_port SOCK_STREAM)
        iperf3 -s -B 127.0.0.1 -p "$port" >>"$WORK/iperf3-server.log" 2>&1 &
        spid=$!
        PIDS+=("$spid")
        for _ in $(seq 1 50); do
            ss -Hltn "sport = :$port" | grep -q . && break
            sleep 0.1
        done
        timeout $((UDP_SECONDS + 30)) iperf3 -c 127.0.0.1 -p "$port" -u -b 0 -l "$UDP_LEN" \
            -t "$UDP_SECONDS" -J >"$WORK/iperf3.json" 2>&1 || true
        stop_receiver "$spid"
        python3 -c "import json,sys; s=json.load(open(sys.argv[1]))['end']['sum_received']; print(f\"{s['bytes'] / s['seconds']:.0f}\")" \
            "$WORK/iperf3.json" || { echo "iperf3 failed:" >&2; cat "$WORK/iperf3.json" >&2; exit 1; }
    }
    step "initial sync: $ROUNDS rounds, each into a new receiver; bounds zstd -1 -T2 and UDP (-l $UDP_LEN) (${CACHE} page cache)"
    members=(lifeboat zstd udp disk)
    if [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then members+=(pinned zstd_1t); fi
    for r in $(seq 1 "$ROUNDS"); do
        line="round $r:"
        for m in $(order "$r" "${members[@]}"); do
            case $m in
                lifeboat | pinned)
                    # pinned: the agent on CPU 0, the receiver on CPU 1.
                    pin_rx="" pin_agent=""
                    [ "$m" = pinned ] && pin_rx="taskset -c 1" pin_agent="taskset -c 0"
                    tag="$m-$r"
                    RX_PIN=$pin_rx start_receiver "$WORK/fresh"
                    prepare "$MIXED"
                    t=$(AGENT_PIN=$pin_agent agent_sync "$tag" "$WORK/fresh" "$MIXED" mixed "$WORK/state-fresh")
                    stop_receiver "$RX_PID"
                    cmp "$MIXED" "$WORK/fresh/staging/web-1/mixed.img" || { echo "lifeboat ($m): staging differs from the source" >&2; exit 1; }
                    if [ "$m" = lifeboat ]; then
                        record initial.sent_bytes "$(json_field "$WORK/$tag.json" sent_bytes)"
                        record initial.agent_cpu "$(cpu_of "$WORK/$tag.time")"
                        record initial.agent_rss_kib "$(rss_of "$WORK/$tag.time")"
                        if [ -f "$WORK/state-fresh/web-1/mixed.index" ]; then
                            record index.bytes "$(stat -c %s "$WORK/state-fresh/web-1/mixed.index")"
                            record index.blocks "$BLOCKS"
                        fi
                    fi
                    rm -rf "$WORK/fresh" "$WORK/state-fresh"
                    record "initial.$m" "$t"
                    line+=" $m $t s;"
                    ;;
                zstd)
                    prepare "$MIXED"
                    t=$(timed sh -c 'zstd -q -1 -T2 -c "$1" >/dev/null' sh "$MIXED")
                    record initial.zstd "$t"
                    line+=" zstd $t s;"
                    ;;
                zstd_1t)
                    prepare "$MIXED"
                    t=$(timed taskset -c 0 sh -c 'zstd -q -1 -T1 -c "$1" >/dev/null' sh "$MIXED")
                    record initial.zstd_1t "$t"
                    line+=" zstd -T1 (cpu 0) $t s;"
                    ;;
                disk)
                    # What the receiver's disk absorbs: the image's non-zero
                    # blocks written and made durable, as the staging volume is.
                    prepare "$MIXED"
                    t=$(timed dd if="$MIXED" of="$WORK/disk.img" bs=1M conv=sparse,fdatasync status=none)
                    rm -f "$WORK/disk.img"
                    record initial.disk "$t"
                    line+=" dd $t s;"
                    ;;
                udp)
                    b=$(udp_bound)
                    record initial.udp_Bps "$b"
                    line+=" udp $(python3 -c "print(f'{$b / 1048576:.1f}')") MiB/s received;"
                    ;;
            esac
        done
        echo "$line"
    done
fi

# --- 5. launch --------------------------------------------------------------------
if want launch; then
    step "untimed sync --pit of the mixed image"
    t=$(agent_sync mixed-pit "$D" "$MIXED" mixed "$WORK/state-mixed" --pit)
    echo "took $t s; PIT $(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['pit']['id'])" "$WORK/mixed-pit.json")"
    stop_receiver "$MAIN_PID"
    MAIN_PID=""
    LAUNCHED="$WORK/launched.img"
    COPY="$WORK/copy.img"
    launch_cmd() { "$RECEIVER" launch --dir "$D" --server web-1 --volume mixed --at latest --out "$LAUNCHED"; }
    cp_cmd() { cp --sparse=always "$MIXED" "$COPY" && sync "$COPY"; }
    rm -f "$LAUNCHED"
    launch_cmd >>"$WORK/runs.log" 2>&1 || { echo "launch failed" >&2; tail "$WORK/runs.log" >&2; exit 1; }
    cmp "$MIXED" "$LAUNCHED" || { echo "launched image differs from the source" >&2; exit 1; }
    step "launch vs cp: $ROUNDS rounds (${CACHE} page cache: the store / the image)"
    for r in $(seq 1 "$ROUNDS"); do
        line="round $r:"
        for m in $(order "$r" lifeboat cp); do
            rm -f "$LAUNCHED" "$COPY"
            case $m in
                lifeboat) prepare "$D/store"; t=$(timed launch_cmd) ;;
                cp) prepare "$MIXED"; t=$(timed cp_cmd) ;;
            esac
            record "launch.$m" "$t"
            line+=" $m $t s;"
        done
        echo "$line"
    done
    rm -f "$LAUNCHED" "$COPY"
fi

step "results (SIZE_MIB=$SIZE_MIB, ROUNDS=$ROUNDS, medians, ${CACHE} page cache; load average now: $(cut -d' ' -f1-3 /proc/loadavg))"
python3 "$PEERS/report.py" "$RESULTS" "$FLOORS"
