#!/usr/bin/env bash
# Removes for good what users deleted long enough ago (runs, experiments,
# logged models, and their artifacts), once, by hand.
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/scripts/lib.sh"

usage() {
	cat <<'USAGE'
Usage: ./stack_gc.sh [--dry-run] [--older-than DAYS] [--yes]

Deleting a run, an experiment or a logged model in MLflow only marks it
deleted: its rows and artifacts stay (and it can be restored). This removes
for good everything deleted more than DAYS ago (default GC_OLDER_THAN_DAYS
from .env, 30), its artifacts in the bucket included, and prints each item.

  --dry-run          list what would be removed; change nothing
  --older-than DAYS  another age; 0 takes everything deleted so far
  --yes              do not ask first (it asks unless --dry-run)

Files of registered model versions are never removed, even when the run or
experiment that holds them goes.

It waits while a backup is running (and a backup waits for it). For a
schedule, set COMPOSE_PROFILES=gc in .env (GC_INTERVAL_HOURS) and deploy.
USAGE
}

args=()
dry_run=0
while [ "$#" -gt 0 ]; do
	case "$1" in
		--help|-h) usage; exit 0 ;;
		--yes|-y) ASSUME_YES=1 ;;
		--dry-run) args+=(--dry-run); dry_run=1 ;;
		--older-than)
			[ "$#" -ge 2 ] || usage_error "--older-than needs a number of days"
			args+=(--older-than "$2")
			shift ;;
		*) usage_error "unknown argument: $1" ;;
	esac
	shift
done

load_compose_env
jobs_target
require_stores_running
if [ "$dry_run" = 0 ]; then
	confirm "Remove for good, with their artifacts, the runs, experiments and logged models deleted that long ago? (./stack_gc.sh --dry-run lists them)" \
		|| die "nothing changed"
fi
job_compose run --rm --no-deps -T gc gc "${args[@]}"
