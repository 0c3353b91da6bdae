# shellcheck shell=bash
# Shared by the backup and restore scripts: runs the backup job image
# (db/Dockerfile, service "backup") against this stack.

# backup_prepare: Compose's values (BACKUP_DIR among them, absolute), the job
# image, where the jobs run (jobs_target), and what the stack runs (for
# versions.json; asked once here, not per job, and handed to every job through
# the environment).
backup_prepare() {
	load_compose_env
	mkdir -p "$BACKUP_DIR"
	jobs_target
	log "Preparing the backup job image"
	compose --progress quiet build --quiet backup >/dev/null
	if [ "$STACK_JOBS_ON" = swarm ]; then
		local exports
		exports="$(stack_py swarm-backup-env)"
		eval "$exports"
	else
		STACK_IMAGES="$(compose ps --format '{{.Service}}={{.Image}}' 2>/dev/null | paste -sd, - || true)"
		STACK_MLFLOW_VERSION="$(compose exec -T mlflow python3 -c 'import mlflow; print(mlflow.__version__)' 2>/dev/null || true)"
	fi
	export STACK_IMAGES STACK_MLFLOW_VERSION
}

# backup_job [DOCKER_RUN_OPTION...] -- ARGS...: one run of the backup job (e.g.
# `-v SRC:DEST` mounts before the --); its stdout is the result.
backup_job() {
	local opts=()
	while [ "$#" -gt 0 ] && [ "$1" != -- ]; do opts+=("$1"); shift; done
	[ "$#" -gt 0 ] || die "backup_job: missing -- before the job's arguments"
	shift
	job_compose --progress quiet run --rm --no-deps -T -e STACK_IMAGES -e STACK_MLFLOW_VERSION -e STACK_VERSION \
		"${opts[@]}" backup "$@"
}

# require_own_stores WHAT: a cold copy is of the stack's own volumes, so both
# stores must be the stack's (not POSTGRES_HOST / S3_ENDPOINT_URL).
require_own_stores() {
	[ -z "$STACK_OUTSIDE_STORES" ] \
		|| die "$1: a cold copy is of the stack's own data volumes, but POSTGRES_HOST or S3_ENDPOINT_URL in .env names a store outside the stack; use the default online backup (and your provider's snapshots for that store)"
	[ "${STACK_JOBS_ON:-compose}" = compose ] \
		|| die "$1: cold copies are of data volumes on this machine, but the stack runs on the swarm (its volumes are on the data node): use online backups (the default) there"
}

volume_name() { echo "${COMPOSE_PROJECT_NAME}_$1"; }

# volume_mounts MODE: docker-run options mounting both data volumes under /volumes.
volume_mounts() {
	local mode="$1"
	echo "-v" "$(volume_name db-data):/volumes/db-data$mode" "-v" "$(volume_name minio-data):/volumes/minio-data$mode"
}

# backup_cold ARGS...: stop the stack, archive its volumes, start it again.
backup_cold() {
	local was_running name status=0
	was_running="$(compose ps --status running --services 2>/dev/null || true)"
	log "Stopping the stack for a cold copy of its volumes"
	compose stop >&2
	# shellcheck disable=SC2046 # volume_mounts prints separate words, none with spaces
	name="$(backup_job $(volume_mounts :ro) -- cold "$@")" || status=$?
	if [ -n "$was_running" ]; then
		log "Starting the stack again"
		compose up -d --wait >&2
	fi
	[ "$status" = 0 ] || die "the cold backup failed (see above); the stack was restarted"
	echo "$name"
}
