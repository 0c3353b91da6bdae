#!/usr/bin/env bash
# Restores a backup set into the deployed stack, after checking it is whole.
# shellcheck source=../scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
# shellcheck source=backup_lib.sh
. "$STACK_ROOT/db/backup_lib.sh"

usage() {
	cat <<'USAGE'
Usage: db/db_volume_restore.sh SET [--yes] [--help]

Restores the backup set in folder SET (as printed by db/db_volume_backup.sh)
into the deployed stack:

  1. checks the set against its manifest (a damaged or partial set stops here,
     and nothing is touched);
  2. asks for confirmation if the stack holds data (unless --yes);
  3. stops the MLflow server and takes a safety backup of the current data
     (kind pre-restore);
  4. replaces the database and the bucket, and checks row counts and every
     object's sha256 against the manifest;
  5. starts the server again (an older schema is upgraded on the way).

Works into a freshly deployed, empty stack and into one with data. A cold set
(--cold) is restored into the stopped stack's volumes instead.
USAGE
}

SET="" ASSUME_YES=0
while [ $# -gt 0 ]; do
	case "$1" in
		--yes|-y) ASSUME_YES=1; shift ;;
		--help|-h) usage; exit 0 ;;
		-*) usage_error "unknown option: $1" ;;
		*) [ -z "$SET" ] || usage_error "one set at a time"; SET="$1"; shift ;;
	esac
done
[ -n "$SET" ] || usage_error "which set? give its folder"
[ -d "$SET" ] || die "$SET is not a folder: give the path db/db_volume_backup.sh printed"
export ASSUME_YES

SET="$(cd "$SET" && pwd)"
NAME="$(basename "$SET")"
# The set's folder, read-only, for every job below.
SET_MOUNT=(-v "$(dirname "$SET"):/restore:ro")

# restore_cold: a cold set replaces the volumes of the stopped stack.
restore_cold() {
	require_own_stores "$NAME is a cold set"
	confirm "Replace ALL data of the stack with the cold set $NAME? The stack is stopped meanwhile" \
		|| die "nothing changed"
	log "Safety copy of the current volumes first"
	local safety
	# shellcheck disable=SC2119 # no --keep: a safety set is never rotated
	safety="$(backup_cold)"
	log "Safety set: $BACKUP_DIR/$safety"
	compose stop >&2
	# shellcheck disable=SC2046 # volume_mounts prints separate words, none with spaces
	backup_job "${SET_MOUNT[@]}" $(volume_mounts "") -- restore-cold "/restore/$NAME" \
		|| die "restoring the volumes failed; restore $BACKUP_DIR/$safety the same way"
	up_and_wait "The volumes hold $NAME; fix the cause and run ./stack_deploy.sh"
	log "Restored $NAME (cold)"
}

# The server tier (and scheduled garbage collection) stops during a live
# restore: with Compose by `compose stop`; on a swarm by scaling its services to
# 0 (nginx, global, stays and answers 502 meanwhile), and back afterwards to the
# replicas the deployed stack file gives them (also after an earlier failure).
SWARM_SERVERS=()
SWARM_FIX="run ./stack_deploy.sh --swarm (it starts the servers again as deployed)"

servers_deployed() {
	if [ "$STACK_JOBS_ON" = swarm ]; then
		docker service inspect "${COMPOSE_PROJECT_NAME}_mlflow" >/dev/null 2>&1
	else
		[ -n "$(compose ps -aq mlflow 2>/dev/null)" ]
	fi
}

stop_servers() {
	log "Stopping the MLflow server (and scheduled garbage collection) during the restore"
	if [ "$STACK_JOBS_ON" != swarm ]; then
		compose --profile gc stop nginx mlflow gc >&2
		return 0
	fi
	timeout "${DEPLOY_TIMEOUT:-900}" docker service scale --detach=false "${SWARM_SERVERS[@]/%=*/=0}" >/dev/null \
		|| swarm_failed "the servers did not stop; nothing was restored. To start them again: $SWARM_FIX"
}

# start_servers HINT: start what stop_servers stopped and wait until healthy.
start_servers() {
	log "Starting the server again"
	if [ "$STACK_JOBS_ON" != swarm ]; then
		up_and_wait "$1 and run ./stack_deploy.sh"
		return 0
	fi
	# The migrate job runs again first: a set from an older MLflow is upgraded.
	if ! timeout "${DEPLOY_TIMEOUT:-900}" docker service update --detach=false --force "${COMPOSE_PROJECT_NAME}_migrate" >/dev/null \
		|| ! timeout "${DEPLOY_TIMEOUT:-900}" docker service scale --detach=false "${SWARM_SERVERS[@]}" >/dev/null \
		|| ! _stack_python swarm-check; then
		swarm_failed "the servers did not come back (the tasks above say why; docker service logs ${COMPOSE_PROJECT_NAME}_migrate). $1 and $SWARM_FIX"
	fi
}

# restore_live: a pg_dump set replaces the database and the bucket of the
# running stores, with the MLflow server stopped from the safety backup on (so
# nothing logged after it is lost).
restore_live() {
	require_stores_running
	servers_deployed || die "the stack is not deployed: run ./stack_deploy.sh first, then restore"
	if [ "$STACK_JOBS_ON" = swarm ]; then
		local servers
		servers="$(stack_py swarm-servers)"
		mapfile -t SWARM_SERVERS <<<"$servers"
		[ -n "${SWARM_SERVERS[0]}" ] || die "the swarm stack file names no server service; run ./stack_deploy.sh --swarm here first"
	fi
	local counts runs safety=""
	counts="$(backup_job -- counts)"
	runs="$(python3 -c 'import json,sys; c=json.loads(sys.argv[1]); print(c.get("runs", 0) + max(c.get("experiments", 0) - 1, 0))' "$counts")"
	if [ "$runs" -gt 0 ]; then
		confirm "The stack holds data; replace it with $NAME? (a safety backup is taken first)" \
			|| die "nothing changed"
	fi
	stop_servers
	if [ "$counts" != "{}" ]; then
		log "Safety backup of the current data"
		if ! safety="$(backup_job -- backup --kind pre-restore)"; then
			start_servers "The safety backup failed (see above) and nothing was restored; fix the cause"
			die "the safety backup failed (see above); nothing was restored, and the server runs again"
		fi
		log "Safety set: $BACKUP_DIR/$safety"
	fi
	if ! backup_job "${SET_MOUNT[@]}" -- restore "/restore/$NAME"; then
		local hint="the server stays stopped."
		[ -n "$safety" ] && hint="$hint To go back: db/db_volume_restore.sh $BACKUP_DIR/$safety --yes"
		die "the restore failed (see above); $hint"
	fi
	start_servers "The data of $NAME is restored; fix the cause"
	log "Restored $NAME"
}

backup_prepare
log "Checking $NAME against its manifest"
summary="$(backup_job "${SET_MOUNT[@]}" -- verify "/restore/$NAME")" || die "$NAME cannot be restored (see above); nothing was changed"
log "The set is whole: $summary"
if [[ "$summary" == kind=cold* ]]; then
	restore_cold
else
	restore_live
fi
