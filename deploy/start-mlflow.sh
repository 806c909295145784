#!/usr/bin/env bash
# The shared MLflow tracking server: runs and metrics in PostgreSQL, artifacts in a shared directory.
#
#   deploy/start-mlflow.sh BACKEND_URL ARTIFACTS_DIR [PORT] [HOST]
#   e.g. deploy/start-mlflow.sh postgresql://rlhf:PASSWORD@db-host:5432/mlflow /shared/mlflow-artifacts 5000
#
# Workers then log with `--tracking-uri http://THIS_HOST:PORT`. With --serve-artifacts the server
# proxies artifact uploads and downloads (MLflow 3: experiments get `mlflow-artifacts:/` locations),
# so workers need no access to ARTIFACTS_DIR; the directory can be local or on shared storage.
# Needs the full `mlflow` package (pip install -e '.[cluster]'); mlflow-skinny has no server.
# Runs in the foreground: use tmux/nohup/systemd, or `sbatch --wrap` on a service node.
set -euo pipefail

[ $# -ge 2 ] || { echo "usage: $0 BACKEND_URL ARTIFACTS_DIR [PORT] [HOST]" >&2; exit 1; }
backend=$1
artifacts=$(mkdir -p "$2" && readlink -f "$2")
port=${3:-5000}
host=${4:-0.0.0.0}
here=$(cd "$(dirname "$0")/.." && pwd)
mlflow=$here/.venv/bin/mlflow  # the project's (make install); else one on PATH
[ -x "$mlflow" ] || mlflow=$(command -v mlflow) || { echo "no mlflow: pip install -e '.[cluster]'" >&2; exit 1; }

# the background job runner serves MLflow's GenAI features (several processes); the sweep needs none
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}
# MLflow 3 refuses requests whose Host header it does not know (DNS rebinding): its default is
# localhost and private IPs; workers that use this machine's name need it too (any port)
allowed="localhost:*,127.0.0.1:*,$(hostname):*,$(hostname -f 2>/dev/null || hostname):*,10.*,172.*,192.168.*"

exec "$mlflow" server \
    --backend-store-uri "$backend" \
    --artifacts-destination "$artifacts" --serve-artifacts \
    --host "$host" --port "$port" \
    --allowed-hosts "${MLFLOW_ALLOWED_HOSTS:-$allowed}" \
    --workers "${MLFLOW_WORKERS:-4}"
