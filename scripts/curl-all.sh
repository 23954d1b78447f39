#!/bin/sh
# One HTTP request to the VIP from every client address of the demo, tallied per backend.
# Run it twice: with source-IP persistence every address gets the same backend each time.
# Usage: scripts/curl-all.sh
set -eu
. "$(dirname "$0")/common.sh"
for a in $CLIENT_ADDRS; do
    b=$(in_client curl -s --max-time 3 --interface "$a" "http://$VIP:$HTTP_PORT/" || echo FAILED)
    echo "$a $b"
done | awk '{ print; n[$2]++ } END { printf "per backend:"; for (b in n) printf " %s=%d", b, n[b]; print "" }'
