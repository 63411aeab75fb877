# Shell helpers shared by the scripts in this directory; sourced, not run.

# free_port SOCK_DGRAM|SOCK_STREAM: a port free on 127.0.0.1 just now (bound
# and released).
free_port() {
    python3 -c "import socket; s=socket.socket(socket.AF_INET, socket.$1); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"
}

# wait_listening OUT LOG [WHO]: waits up to 10 s for a receiver's "listening
# on" line in OUT (its stdout); fails after printing LOG (its stderr).
wait_listening() {
    local out=$1 log=$2 who=${3:-}
    for _ in $(seq 1 100); do
        grep -q "listening on" "$out" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "${who:+$who: }the receiver did not start (no \"listening on\" in $out):" >&2
    cat "$log" >&2
    return 1
}

# step TEXT: a heading in a script's output.
step() { printf '\n==> %s\n' "$*"; }

# stop_pid PID: SIGTERM, up to 10 s to exit, then SIGKILL; reaps it. Quiet
# if it is gone already.
stop_pid() {
    local pid=$1
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# build_release ROOT [PACKAGE-ARGS...]: cargo build --release of the agent and
# the receiver (and whatever else is named), unless SKIP_BUILD=1.
build_release() {
    local root=$1
    shift
    if [ "${SKIP_BUILD:-0}" = 1 ]; then
        step "using the release binaries already built (SKIP_BUILD=1)"
    else
        step "building release binaries"
        cargo build --release --quiet --manifest-path "$root/Cargo.toml" \
            -p lifeboat-agent -p lifeboat-receiver "$@"
    fi
}

# work_dir NAME: prints the absolute path of the run's work directory: $WORK
# if set (created here; it must not exist yet), else a new one named
# NAME.XXXXXX under $TMPDIR or /var/tmp.
work_dir() {
    if [ -n "${WORK:-}" ]; then
        mkdir "$WORK" && (cd "$WORK" && pwd)
    else
        mktemp -d -p "${TMPDIR:-/var/tmp}" "$1.XXXXXX"
    fi
}
