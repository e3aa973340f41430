#!/bin/sh
# Every container of the image starts here (web, worker, webhooks, beat, migrate, one-off
# `docker compose run` commands), then runs its command.
set -eu

# The compose file passes SECRET_KEY through as it is (empty when unset), so that `docker
# compose down`, `logs` and `ps` work without it; a container that would serve or sign
# anything refuses to start without one, in one line.
if [ -z "${SECRET_KEY:-}" ]; then
    echo "sagarunner: SECRET_KEY is not set; set it in the environment or in .env next to docker-compose.yml (python3 -c 'import secrets; print(secrets.token_urlsafe(50))')" >&2
    exit 78  # EX_CONFIG
fi

# prometheus_client's multiprocess files name the pid that wrote them, and containers reuse
# the same low pids: each container keeps its own directory (not shared with any other) and
# empties it at start, so files of an earlier start never count again.
if [ -n "${PROMETHEUS_MULTIPROC_DIR:-}" ]; then
    mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
    find "$PROMETHEUS_MULTIPROC_DIR" -mindepth 1 -delete
fi

exec "$@"
