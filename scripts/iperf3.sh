#!/bin/sh
# TCP throughput through tether's XDP DSR path: iperf3 from the demo's client namespace to
# VIP:5201 (the demo runs an iperf3 server in every backend namespace). The control and data
# connections share the source address, so persistence keeps them on one backend.
# Usage: scripts/iperf3.sh [SECONDS] [SOURCE_ADDR] [extra iperf3 args, e.g. -P 4 or -R]
set -eu
. "$(dirname "$0")/common.sh"
secs=${1:-5}; src=${2:-$FIRST_CLIENT}
[ $# -gt 2 ] && shift 2 || set --
command -v iperf3 >/dev/null || { echo "iperf3 is not installed: cargo xtask bootstrap" >&2; exit 1; }
echo "iperf3: ${secs}s from $src ($CLIENT_NS) to $VIP:$IPERF_PORT"
in_client iperf3 -c "$VIP" -p "$IPERF_PORT" -B "$src" -t "$secs" "$@"
