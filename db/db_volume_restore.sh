#!/usr/bin/env bash
# Restores a backup set into the deployed stack, after checking it is whole.
# shellcheck source=../scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
# shellcheck source=backup_lib.sh
. "$STACK_ROOT/db/backup_lib.sh"

usage() {
	cat <<'USAGE'
Usage: db/db_volume_restore.sh SET [--yes] [--help]
       db/db_volume_restore.sh --to-time TIME [--yes] [--skip-flush] [--from-archive BUCKET]

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

--to-time TIME restores the database to its state at TIME from the
point-in-time archive (PITR_BUCKET): UTC ("2026-12-06 16:59:30") or with an
offset ("2026-12-06 17:59:30+01:00"), within the last PITR_RETENTION_DAYS.
The current data is kept as a safety set first (as above); the archive is
brought up to date before the database is replaced, so a later restore may
still go to any moment before this one. The bucket is left as it is: it holds
every artifact logged until now (those of runs deleted by gc in between are
gone; see docs/backups.md). --skip-flush goes on when the archive does not
take the current writes (an archive that belongs to another database, see
docs/backups.md): they are then kept in the safety set only.

--from-archive BUCKET restores from another archive on the same store: a lost
machine's (docs/backups.md, "A lost machine"), whose stack now archives to a
new PITR_BUCKET. The current database's writes stay out of that archive (as
with --skip-flush); its data is kept in the safety set.
USAGE
}

SET="" ASSUME_YES=0 TO_TIME="" SKIP_FLUSH=0 FROM_ARCHIVE=""
while [ $# -gt 0 ]; do
	case "$1" in
		--yes|-y) ASSUME_YES=1; shift ;;
		--to-time) [ $# -ge 2 ] || usage_error "--to-time needs a time"; TO_TIME="$2"; shift 2 ;;
		--to-time=*) TO_TIME="${1#*=}"; shift ;;
		--skip-flush) SKIP_FLUSH=1; shift ;;
		--from-archive) [ $# -ge 2 ] || usage_error "--from-archive needs a bucket"; FROM_ARCHIVE="$2"; shift 2 ;;
		--from-archive=*) FROM_ARCHIVE="${1#*=}"; shift ;;
		--help|-h) usage; exit 0 ;;
		-*) usage_error "unknown option: $1" ;;
		*) [ -z "$SET" ] || usage_error "one set at a time"; SET="$1"; shift ;;
	esac
done
require_deploy_timeout
export ASSUME_YES
if [ -n "$TO_TIME" ]; then
	[ -z "$SET" ] || usage_error "a set or --to-time, not both"
	if [ -n "$FROM_ARCHIVE" ]; then
		[[ "$FROM_ARCHIVE" =~ ^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$ ]] \
			|| usage_error "--from-archive $FROM_ARCHIVE: give the bucket's name (3-63 lower-case letters, digits, '.' or '-')"
		# Another database's archive takes no writes of this one.
		SKIP_FLUSH=1
	fi
elif [ "$SKIP_FLUSH" = 1 ] || [ -n "$FROM_ARCHIVE" ]; then
	usage_error "--skip-flush and --from-archive go with --to-time"
else
	[ -n "$SET" ] || usage_error "which set? give its folder (or --to-time TIME)"
	[ -d "$SET" ] || die "$SET is not a folder: give the path db/db_volume_backup.sh printed"
	SET="$(cd "$SET" && pwd)"
	NAME="$(basename "$SET")"
	# The set's folder, read-only, for every job below.
	SET_MOUNT=(-v "$(dirname "$SET"):/restore:ro")
fi

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
	timeout "${DEPLOY_TIMEOUT}" docker service scale --detach=false "${SWARM_SERVERS[@]/%=*/=0}" >/dev/null \
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
	if ! timeout "${DEPLOY_TIMEOUT}" docker service update --detach=false --force "${COMPOSE_PROJECT_NAME}_migrate" >/dev/null \
		|| ! timeout "${DEPLOY_TIMEOUT}" docker service scale --detach=false "${SWARM_SERVERS[@]}" >/dev/null \
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
	local counts exports safety=""
	counts="$(backup_job -- counts)"
	exports="$(stack_py holds-data "$counts")"
	eval "$exports"
	if [ "$STACK_HOLDS_DATA" = yes ]; then
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

# pitr_job ARGS...: one run of the point-in-time tool (db/pitr.py) beside the stack.
pitr_job() {
	job_compose --progress quiet run --rm --no-deps -T "${ARCHIVE_OPTS[@]}" "${PITR_OPTS[@]}" pitr "$@"
}
# The archive read: PITR_BUCKET, or --from-archive's.
ARCHIVE_OPTS=()
[ -z "$FROM_ARCHIVE" ] || ARCHIVE_OPTS=(-e "PITR_BUCKET=$FROM_ARCHIVE" -e PITR_FROM_ARCHIVE=1)
PITR_OPTS=()

# restore_to_time TIME: the database as it was at TIME, from the archive.
restore_to_time() {
	[ "$STACK_JOBS_ON" = compose ] \
		|| die "--to-time: the stack runs on a swarm, where the database's volume is on the data node; restoring to a point in time there is not supported yet (restore a logical set instead)"
	[[ " $STACK_OWN_STORES " == *" db "* ]] \
		|| die "--to-time restores the stack's own PostgreSQL from its archive, but POSTGRES_HOST names a server outside the stack: use that server's own point-in-time recovery (your provider's), then db/db_volume_restore.sh is not needed"
	[ -z "$FROM_ARCHIVE" ] || [ "$FROM_ARCHIVE" != "$PITR_BUCKET" ] \
		|| die "--from-archive $FROM_ARCHIVE is this stack's own PITR_BUCKET: for its own archive leave --from-archive out; for a lost machine's, set PITR_BUCKET in .env to a new bucket and deploy first (docs/backups.md, 'A lost machine')"
	require_stores_running
	servers_deployed || die "the stack is not deployed: run ./stack_deploy.sh first, then restore"
	log "Finding the base backup a restore to $1 starts from"
	local plan exports safety=""
	plan="$(pitr_job plan "$1")" || die "nothing was changed"
	exports="$(stack_py restore-plan "$plan")"
	eval "$exports"
	local target="$PLAN_TARGET" target_iso="$PLAN_TARGET_ISO" backup_id="$PLAN_BACKUP_ID" timeline="$PLAN_TIMELINE"
	confirm "Replace the database with its state at $target_iso (from base backup $backup_id)? Every run, metric, model and account change since, by every user, goes back too; a safety backup is taken first" \
		|| die "nothing changed"
	stop_servers
	log "Safety backup of the current data"
	if ! safety="$(backup_job -- backup --kind pre-restore)"; then
		start_servers "The safety backup failed (see above) and nothing was restored; fix the cause"
		die "the safety backup failed (see above); nothing was restored, and the server runs again"
	fi
	log "Safety set: $BACKUP_DIR/$safety"
	local back="To go back: db/db_volume_restore.sh $BACKUP_DIR/$safety --yes"
	if [ -n "$FROM_ARCHIVE" ]; then
		log "Restoring from the archive in $FROM_ARCHIVE: the current data is in the safety set only"
	elif [ "$SKIP_FLUSH" = 1 ]; then
		log "Not sending the last writes to the archive (--skip-flush): they are in the safety set only"
	else
		log "Sending the last writes to the archive"
		if ! pitr_job flush; then
			start_servers "Nothing was restored; fix the cause"
			die "the archive did not take the latest writes (above); nothing was restored, and the server runs again. If the archive belongs to another database (docs/backups.md), --skip-flush restores anyway, the current data kept in $BACKUP_DIR/$safety"
		fi
	fi
	# Again, now that the archive is as current as it gets: WAL given up since the first plan
	# (the safety set may have taken long) would stop the replay half-way.
	local again
	if ! again="$(pitr_job plan "$1")" || ! exports="$(stack_py restore-plan "$again")" || ! eval "$exports" \
		|| [ "$PLAN_BACKUP_ID" != "$backup_id" ]; then
		start_servers "Nothing was restored; fix the cause"
		die "the archive changed since the restore was planned (above): nothing was restored, and the server runs again; the current data is also in $BACKUP_DIR/$safety. Run the restore again"
	fi
	log "Stopping the database"
	compose stop pitr db >&2
	log "Replacing the database's files with base backup $backup_id"
	# Writable, and beside the service's read-only mount of the same volume.
	PITR_OPTS=(-v "$(volume_name db-data):/restore-data" -e PGDATA=/restore-data)
	# From here on the database's files are being replaced: going back means a new, empty
	# database first (the volume's content is a half-restored copy), then the safety set.
	back="To go back: docker compose -p $COMPOSE_PROJECT_NAME rm -sf db && docker volume rm $(volume_name db-data) && ./stack_deploy.sh && db/db_volume_restore.sh $BACKUP_DIR/$safety --yes"
	pitr_job restore "$target" "$backup_id" "$timeline" || die "the restore failed (see above); the database stays stopped. $back"
	PITR_OPTS=()
	log "Replaying the archive up to $target_iso"
	compose up -d --no-deps db >&2
	pitr_job wait-recovered \
		|| die "the database did not recover (see above, and: docker compose logs db); the server stays stopped. $back"
	local copy_back="python3 -m stack compose run --rm --no-deps -T -e PITR_BUCKET=$FROM_ARCHIVE pitr artifacts-restore"
	[ -n "$FROM_ARCHIVE" ] && [ "${STACK_PITR_OFF_SITE:-}" = true ] && [ "${PITR_ARTIFACT_COPY_MINUTES:-0}" != 0 ] \
		|| copy_back=""
	start_servers "The database is restored to $target_iso${copy_back:+ (the artifacts are not copied back yet: after the fix, $copy_back)}; fix the cause"
	if [ -n "$copy_back" ]; then
		# With the server up: a large bucket takes long, and files come back as they are copied.
		log "Copying the artifacts back from the archive's store (the server runs meanwhile)"
		pitr_job artifacts-restore >/dev/null \
			|| die "the database is restored and the server runs, but copying the artifacts back failed (see above): fix the cause, then copy them again (nothing is copied twice): $copy_back"
	fi
	log "Restored the database to $target_iso (safety set: $BACKUP_DIR/$safety)"
}

backup_prepare
if [ -n "$TO_TIME" ]; then
	restore_to_time "$TO_TIME"
	exit 0
fi
log "Checking $NAME against its manifest"
summary="$(backup_job "${SET_MOUNT[@]}" -- verify "/restore/$NAME")" || die "$NAME cannot be restored (see above); nothing was changed"
log "The set is whole: $summary"
if [[ "$summary" == kind=cold* ]]; then
	restore_cold
else
	restore_live
fi
