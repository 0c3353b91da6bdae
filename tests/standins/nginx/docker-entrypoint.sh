#!/usr/bin/env bash
# Like the official entrypoint: run /docker-entrypoint.d hooks, then nginx.
set -Eeo pipefail
if [ "${1:-}" = nginx ] || [ "${1:-}" = nginx-debug ]; then
	for f in /docker-entrypoint.d/*.sh; do
		[ -x "$f" ] || continue
		echo "$0: Launching $f"
		"$f"
	done
	echo "$0: Configuration complete; ready for start up"
fi
exec "$@"
