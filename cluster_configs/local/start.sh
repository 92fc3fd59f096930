#!/usr/bin/env bash
# Start a single-machine Ray head for `asd` with Ray token authentication ON.
#
#   bash cluster_configs/local/start.sh                 # all cores of this machine
#   NUM_CPUS=8 NUM_GPUS=1 bash cluster_configs/local/start.sh
#   bash cluster_configs/local/start.sh --temp-dir /scratch/ray   # extra args go to `ray start`
#
# Then, from the repository root (same shell settings: RAY_AUTH_MODE=token):
#   export RAY_AUTH_MODE=token
#   ray job submit --working-dir . -- python -m jobs.pipeline ray=cluster
# Stop it with `ray stop`.
#
# `ray start --head` (unlike `ray.init()`) does not create a token by itself, and without
# RAY_AUTH_MODE=token and a token it would start with authentication disabled. This script
# generates the token once (~/.ray/auth_token, or $RAY_AUTH_TOKEN_PATH) and always starts
# in token mode, whatever RAY_AUTH_MODE the calling shell had. Workers on other machines
# need the same token file and `RAY_AUTH_MODE=token ray start --address=<head-ip>:6379`.
set -euo pipefail

export RAY_AUTH_MODE=token

NUM_CPUS=${NUM_CPUS:-$(getconf _NPROCESSORS_ONLN)}
PORT=${RAY_PORT:-6379}
DASHBOARD_PORT=${RAY_DASHBOARD_PORT:-8265}

# Create the token if there is none yet; keep it off the terminal and out of logs.
ray get-auth-token --generate >/dev/null 2>&1 || {
  echo "could not create a Ray auth token (ray get-auth-token --generate)" >&2
  exit 1
}
# Ray writes the token file world-readable; keep it to this user.
TOKEN_FILE=${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}
if [[ -z "${RAY_AUTH_TOKEN:-}" && -f "$TOKEN_FILE" ]]; then
  chmod 600 "$TOKEN_FILE"
fi

args=(--head --num-cpus "$NUM_CPUS" --port "$PORT" --dashboard-port "$DASHBOARD_PORT"
      --dashboard-host 127.0.0.1)
if [[ -n "${NUM_GPUS:-}" ]]; then
  args+=(--num-gpus "$NUM_GPUS")
fi

ray start "${args[@]}" "$@"

cat <<EOF

Ray head started with token auth (RAY_AUTH_MODE=token), $NUM_CPUS CPUs, dashboard on
http://127.0.0.1:$DASHBOARD_PORT (it asks for the token: \`RAY_AUTH_MODE=token ray get-auth-token\`).

Submit the pipeline from the repository root:
  export RAY_AUTH_MODE=token
  ray job submit --address http://127.0.0.1:$DASHBOARD_PORT --working-dir . -- python -m jobs.pipeline ray=cluster

Or run a job directly on this machine (it attaches with address=auto):
  RAY_AUTH_MODE=token python -m jobs.pipeline ray=cluster
EOF
