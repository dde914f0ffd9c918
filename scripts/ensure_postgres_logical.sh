#!/usr/bin/env bash
# Make the local PostgreSQL ready for the CDC service (built-in pgoutput plugin): installed,
# wal_level=logical, running and accepting connections. Idempotent.
#
# Read before running it on a machine of yours:
# - it RESTARTS PostgreSQL (every connection dropped) when wal_level or max_replication_slots
#   must change (ALTER SYSTEM, then pg_ctlcluster restart), and starts it if it is down;
# - it runs as root (apt-get, su postgres) and configures no authentication: the tests and the
#   README connect as postgres@127.0.0.1 without a password, which needs `trust` for
#   127.0.0.1 in pg_hba.conf (as on the CI machines); elsewhere give the DSNs a password.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
apt_updated=0
apt_install() {
    if [ "$apt_updated" = 0 ]; then
        apt-get update -qq
        apt_updated=1
    fi
    apt-get install -y -qq "$@" >/dev/null
}

if ! command -v pg_ctlcluster >/dev/null 2>&1 || [ -z "$(ls /etc/postgresql 2>/dev/null)" ]; then
    echo "ensure_postgres_logical: installing PostgreSQL"
    apt_install postgresql
fi

version="$(ls /etc/postgresql | sort -V | tail -n 1)"
run_psql() { su postgres -c "psql -X -qAt -d postgres -c \"$1\""; }

# Start the cluster if it is down (a fresh CI machine may not have it running).
if ! pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main" {print $4}' | grep -q online; then
    pg_ctlcluster --skip-systemctl-redirect "$version" main start
fi

wait_ready() {
    for _ in $(seq 1 60); do
        if su postgres -c "pg_isready -q -h 127.0.0.1 -p 5432" && run_psql "select 1" >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.5
    done
    echo "ensure_postgres_logical: PostgreSQL ${version} does not accept connections" >&2
    return 1
}
wait_ready

changed=0
# `show` reports the running value, so a setting altered earlier but never restarted for
# is altered again and the restart happens now.
if [ "$(run_psql "show wal_level")" != "logical" ]; then
    run_psql "alter system set wal_level = logical" >/dev/null
    changed=1
fi
if [ "$(run_psql "show max_replication_slots")" -lt 10 ]; then
    run_psql "alter system set max_replication_slots = 10" >/dev/null
    changed=1
fi

if [ "$changed" = 1 ]; then
    echo "ensure_postgres_logical: restarting PostgreSQL ${version} for wal_level=logical"
    pg_ctlcluster --skip-systemctl-redirect "$version" main restart
    wait_ready
fi

if [ "$(run_psql "show wal_level")" != "logical" ]; then
    echo "ensure_postgres_logical: wal_level is still not logical" >&2
    exit 1
fi
echo "ensure_postgres_logical: PostgreSQL ${version} ready (wal_level=logical)"
