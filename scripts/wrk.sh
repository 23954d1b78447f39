#!/bin/sh
# HTTP load through tether with wrk from the demo's client namespace. wrk uses the client's
# first address for every connection, so with persistence all of it goes to one backend.
# Usage: scripts/wrk.sh [SECONDS] [CONNECTIONS] [THREADS] [extra wrk args]
set -eu
. "$(dirname "$0")/common.sh"
secs=${1:-10}; conns=${2:-32}; threads=${3:-2}
[ $# -gt 3 ] && shift 3 || set --
command -v wrk >/dev/null || { echo "wrk is not installed: cargo xtask bootstrap" >&2; exit 1; }
echo "wrk: ${secs}s, $conns connections, $threads threads -> http://$VIP:$HTTP_PORT/ from $FIRST_CLIENT ($CLIENT_NS)"
in_client wrk -t"$threads" -c"$conns" -d"${secs}s" --latency "$@" "http://$VIP:$HTTP_PORT/"
