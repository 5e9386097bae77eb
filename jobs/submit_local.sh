#!/usr/bin/env bash
# `make calibrate`: start a local Ray head with token auth unless one is running, submit
# jobs/calibrate.py through the Jobs API (results under ./runs) and follow its logs.
# Extra arguments go to the job, e.g. `make calibrate ARGS=--smoke-test`.
set -euo pipefail
export RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0
ADDRESS=${RAY_API_SERVER_ADDRESS:-http://127.0.0.1:8265}
ray get-auth-token --generate >/dev/null
if ray status >/dev/null 2>&1; then
  echo "[make calibrate] using the running Ray cluster (dashboard $ADDRESS)"
else
  echo "[make calibrate] starting a local Ray head (token auth; stop it with: RAY_AUTH_MODE=token ray stop)"
  ray start --head --num-cpus "${KVRAY_HEAD_CPUS:-$(nproc)}" --dashboard-host 127.0.0.1 --dashboard-port 8265 \
    --include-dashboard true --disable-usage-stats >/dev/null
fi
ID="kvray-calibrate-$(date +%Y%m%d-%H%M%S)"
# Ctrl-C here stops the job too (by its id), not only the log tail.
trap 'echo "[make calibrate] interrupted: stopping job $ID"; ray job stop --address "$ADDRESS" "$ID" >/dev/null 2>&1 || true; exit 130' INT TERM
echo "[make calibrate] submitting $ID (watch it at $ADDRESS, or: RAY_AUTH_MODE=token ray job logs -f $ID)"
ray job submit --address "$ADDRESS" --submission-id "$ID" --working-dir . -- \
  python jobs/calibrate.py --out "$PWD/runs" "$@"
echo "[make calibrate] done: RAY_AUTH_MODE=token ray job list --address $ADDRESS shows $ID; results in $PWD/runs"
