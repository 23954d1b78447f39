# Sourced by the demo scripts: loads the running demo's topology (written by tether-demo,
# started with `cargo xtask run`) from /run/tether-demo.env, or from $TETHER_DEMO_ENV.
env_file=${TETHER_DEMO_ENV:-/run/tether-demo.env}
if [ ! -r "$env_file" ]; then
    echo "$env_file not found: start the demo first with \`cargo xtask run\` (as root)" >&2
    exit 1
fi
# shellcheck disable=SC1090
. "$env_file"
if [ "$(id -u)" -ne 0 ]; then
    echo "run as root (the demo's namespaces need it)" >&2
    exit 1
fi
in_client() { ip netns exec "$CLIENT_NS" "$@"; }
