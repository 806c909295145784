#!/usr/bin/env bash
# A throwaway PostgreSQL cluster on loopback, for CI and tests (not for production: trust auth, no fsync).
#
#   deploy/pg-throwaway.sh start DIR PORT   initdb DIR/data, start on 127.0.0.1:PORT, print the server URL
#   deploy/pg-throwaway.sh stop DIR         stop it (DIR can then be removed)
#
# DIR must not exist yet or be empty. PostgreSQL refuses to run as root, so as root the
# cluster belongs to the `postgres` user (created by the distribution's package) or, failing
# that, to a system user `rlhf-sweep-pg` created here.
set -euo pipefail

die() { echo "pg-throwaway: $*" >&2; exit 1; }

# pg_ctl/initdb on PATH (e.g. /usr/local/bin) or in Debian's versioned directory
bindir() {
    if command -v pg_ctl >/dev/null 2>&1 && command -v initdb >/dev/null 2>&1; then
        dirname "$(readlink -f "$(command -v pg_ctl)")"
        return
    fi
    local d
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    [ -n "$d" ] && [ -x "$d/pg_ctl" ] || die "no PostgreSQL server binaries (pg_ctl, initdb): apt-get install postgresql"
    echo "$d"
}

# run a command as the cluster's owner
as_owner() {
    if [ "$(id -u)" != 0 ]; then
        "$@"
    else
        runuser -u "$OWNER" -- "$@"
    fi
}

cmd=${1:-}
dir=${2:-}
[ -n "$cmd" ] && [ -n "$dir" ] || die "usage: $0 start DIR PORT | stop DIR"
BIN=$(bindir)

OWNER=$(id -un)
if [ "$(id -u)" = 0 ]; then
    OWNER=postgres
    if ! id postgres >/dev/null 2>&1; then
        OWNER=rlhf-sweep-pg
        id "$OWNER" >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin "$OWNER"
    fi
fi

case "$cmd" in
start)
    port=${3:-}
    [ -n "$port" ] || die "usage: $0 start DIR PORT"
    mkdir -p "$dir"
    dir=$(readlink -f "$dir")
    [ -z "$(ls -A "$dir")" ] || die "$dir is not empty"
    # the owner gets DIR; it must also be able to traverse DIR's parents (a directory under /tmp is)
    [ "$(id -u)" = 0 ] && chown "$OWNER" "$dir" && chmod 700 "$dir"
    as_owner test -w "$dir" || die "$OWNER cannot write $dir (a parent directory not traversable? use a directory under /tmp)"
    as_owner "$BIN/initdb" -D "$dir/data" -U postgres --auth=trust --encoding=UTF8 --locale=C --no-sync >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; die "initdb failed"; }
    # loopback only; the socket in DIR (the default /var/run/postgresql may not be writable); fsync off: throwaway
    as_owner "$BIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -F -c max_connections=200" start >/dev/null \
        || { cat "$dir/server.log" >&2; die "the server did not start on 127.0.0.1:$port"; }
    echo "postgresql://postgres@127.0.0.1:$port/postgres"
    ;;
stop)
    dir=$(readlink -f "$dir")
    [ -f "$dir/data/postmaster.pid" ] || exit 0
    as_owner "$BIN/pg_ctl" -D "$dir/data" -m fast -w -t 30 stop >/dev/null
    ;;
*)
    die "usage: $0 start DIR PORT | stop DIR"
    ;;
esac
