#!/usr/bin/env bash
# Start a throwaway PostgreSQL server on 127.0.0.1 for the arena's PostgreSQL tests and print the
# URL to export as MERGEARENA_TEST_POSTGRES_URL. Installs Debian's server package if it is missing
# (CI runs as root). Usage: export MERGEARENA_TEST_POSTGRES_URL=$(bash scripts/start_postgres.sh)
set -euo pipefail
PORT="${PGPORT_TEST:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) >&2
fi
BIN=$(dirname "$(ls /usr/lib/postgresql/*/bin/initdb | sort -V | tail -n 1)")
DIR=$(mktemp -d /tmp/mergearena-pg-XXXXXX)
RUN=()
if [ "$(id -u)" = 0 ]; then  # the server refuses to run as root
    chown postgres "$DIR"
    RUN=(su postgres -s /bin/sh -c)
else
    RUN=(sh -c)
fi
"${RUN[@]}" "$BIN/initdb -D $DIR/data -A trust -U postgres >/dev/null" >&2
"${RUN[@]}" "$BIN/pg_ctl -D $DIR/data -l $DIR/log -w -o '-p $PORT -k $DIR -c listen_addresses=127.0.0.1' start >/dev/null" >&2
echo "postgresql+psycopg://postgres@127.0.0.1:$PORT/postgres"
