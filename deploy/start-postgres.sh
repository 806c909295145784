#!/usr/bin/env bash
# A PostgreSQL server for a cluster's studies, run by an ordinary user (no root, no system service):
# e.g. on a login or service node that the compute nodes can reach.
#
#   RLHF_SWEEP_PG_PASSWORD=... deploy/start-postgres.sh DATA_DIR [PORT] [ALLOWED_CIDR]
#
# First run: initdb in DATA_DIR (password auth, scram-sha-256), role `rlhf` with that password,
# databases `optuna` (the studies) and `mlflow` (the tracking server's backend store); then it
# starts the server listening on all interfaces, accepting ALLOWED_CIDR (default: 10.0.0.0/8).
# Later runs just start it again. Stop: pg_ctl -D DATA_DIR/data stop.
# Where the site runs PostgreSQL already, ask for a role and the two databases instead (README).
set -euo pipefail

die() { echo "start-postgres: $*" >&2; exit 1; }
[ $# -ge 1 ] || die "usage: RLHF_SWEEP_PG_PASSWORD=... $0 DATA_DIR [PORT] [ALLOWED_CIDR]"
[ "$(id -u)" != 0 ] || die "run it as the user who owns the database, not root (PostgreSQL refuses root)"
dir=$(mkdir -p "$1" && readlink -f "$1")
port=${2:-5432}
cidr=${3:-10.0.0.0/8}

# pg_ctl/initdb on PATH, or in Debian's versioned directory
pg_ctl=$(command -v pg_ctl 2>/dev/null || ls /usr/lib/postgresql/*/bin/pg_ctl 2>/dev/null | sort -V | tail -n 1 || true)
[ -n "$pg_ctl" ] || die "no PostgreSQL server binaries: apt-get install postgresql (or module load postgresql)"
BIN=$(dirname "$(readlink -f "$pg_ctl")")
[ -x "$BIN/initdb" ] || die "no initdb beside $BIN/pg_ctl: install PostgreSQL's server package"

if [ ! -f "$dir/data/PG_VERSION" ]; then
    : "${RLHF_SWEEP_PG_PASSWORD:?set RLHF_SWEEP_PG_PASSWORD: the password of the role rlhf that workers connect as}"
    pwfile=$(mktemp)
    trap 'rm -f "$pwfile"' EXIT
    printf '%s\n' "$RLHF_SWEEP_PG_PASSWORD" >"$pwfile"
    # the superuser is rlhf itself: one role, one password, on the socket and over TCP alike
    "$BIN/initdb" -D "$dir/data" -U rlhf --pwfile="$pwfile" --auth=scram-sha-256 \
        --encoding=UTF8 --locale=C.UTF-8 >"$dir/initdb.log"
    echo "host all all $cidr scram-sha-256" >>"$dir/data/pg_hba.conf"
    {
        echo "listen_addresses = '*'"
        echo "port = $port"
        echo "unix_socket_directories = '$dir'"
        # each worker holds a couple of connections (trials + heartbeats), the MLflow server a pool
        echo "max_connections = 300"
    } >>"$dir/data/postgresql.conf"
    fresh=1
fi

if "$BIN/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
    echo "start-postgres: already running ($dir/data)"
else
    "$BIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w start
fi
if [ "${fresh:-0}" = 1 ]; then
    for db in optuna mlflow; do
        PGPASSWORD=$RLHF_SWEEP_PG_PASSWORD "$BIN/createdb" -h "$dir" -p "$port" -U rlhf "$db"
    done
fi
host=$(hostname -f 2>/dev/null || hostname)
echo "studies:      postgresql://rlhf:PASSWORD@$host:$port/optuna    (rlhf-sweep sweep --storage)"
echo "MLflow store: postgresql://rlhf:PASSWORD@$host:$port/mlflow    (deploy/start-mlflow.sh)"
