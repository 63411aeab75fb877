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
