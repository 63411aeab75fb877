#!/usr/bin/env bash
# Lifeboat quick start: builds the binaries, then runs the whole flow on loopback
# with a generated volume and verifies the replica byte for byte.
#
#   ./scripts/quickstart.sh            # 256 MiB volume in a temporary directory
#   SIZE_MIB=1024 WORK=/srv/try ./scripts/quickstart.sh
#
# Needs only a Rust toolchain; no cloud account, no root.
set -euo pipefail

SIZE_MIB=${SIZE_MIB:-256}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/scripts/lib.sh"
WORK=${WORK:-$(mktemp -d -t lifeboat-quickstart.XXXXXX)}
mkdir -p "$WORK"


step "building release binaries"
cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml" -p lifeboat-agent -p lifeboat-receiver
AGENT="$ROOT/target/release/lifeboat-agent"
RECEIVER="$ROOT/target/release/lifeboat-receiver"

step "generating a ${SIZE_MIB} MiB source volume (zeros, random and text-like data) in $WORK"
VOL="$WORK/source.img"
python3 - "$VOL" "$SIZE_MIB" <<'PY'
import os, sys
path, mib = sys.argv[1], int(sys.argv[2])
block = 1 << 20
text = b"".join(b"row %08d: the quick brown fox jumps over the lazy dog\n" % i for i in range(20000))
with open(path, "wb") as f:
    for i in range(mib):
        kind = i % 3
        if kind == 0:
            f.write(bytes(block))
        elif kind == 1:
            f.write(os.urandom(block))
        else:
            start = (i * 4099) % (len(text) - block)
            f.write(text[start:start + block])
PY

# A free UDP port on loopback for the receiver.
PORT=$(free_port SOCK_DGRAM)

step "receiver: init and enroll source server web-1"
"$RECEIVER" init --dir "$WORK/receiver" --listen "127.0.0.1:$PORT"
"$RECEIVER" enroll --dir "$WORK/receiver" --server web-1 --out "$WORK/web-1.bundle"

step "receiver: serve (logs in $WORK/receiver.log)"
"$RECEIVER" serve --dir "$WORK/receiver" >"$WORK/receiver.out" 2>"$WORK/receiver.log" &
RECEIVER_PID=$!
trap 'kill $RECEIVER_PID 2>/dev/null || true' EXIT
wait_listening "$WORK/receiver.out" "$WORK/receiver.log" || exit 1

sync_once() {
    "$AGENT" sync --bundle "$WORK/web-1.bundle" --volume "$VOL" --name data --state-dir "$WORK/agent-state" "$@"
}

step "agent: initial sync"
sync_once

STAGING="$WORK/receiver/staging/web-1/data.img"
step "verifying the replica ($STAGING)"
cmp "$VOL" "$STAGING"
echo "replica is byte-identical to the source"

step "changing 1% of the source's 64 KiB blocks, then syncing again"
python3 - "$VOL" <<'PY'
import os, random, sys
path = sys.argv[1]
blocks = os.path.getsize(path) // 65536
random.seed(7)
with open(path, "r+b") as f:
    for b in random.sample(range(blocks), max(1, blocks // 100)):
        f.seek(b * 65536)
        f.write(os.urandom(65536))
PY
sync_once

step "verifying the replica again"
cmp "$VOL" "$STAGING"
echo "replica is byte-identical to the source"

step "a sync with nothing changed sends nothing"
sync_once --json

kill "$RECEIVER_PID"
wait "$RECEIVER_PID" 2>/dev/null || true
trap - EXIT
printf '\nQuick start done. Everything is in %s\n' "$WORK"
