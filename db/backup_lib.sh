# shellcheck shell=bash
# Shared by the backup and restore scripts: runs the backup job image
# (db/Dockerfile, service "backup") against this stack.

backup_prepare() {
	require_python
	local exports
	# Secret files, TLS paths and the project name, as ./stack_deploy.sh sets them.
	exports="$(stack_py compose-env)"
	eval "$exports"
	local dir
	dir="$(sed -n 's/^BACKUP_DIR=//p' "$(env_file)")"
	dir="${BACKUP_DIR:-${dir:-./backups}}"
	case "$dir" in /*) ;; *) dir="$STACK_ROOT/${dir#./}" ;; esac
	mkdir -p "$dir"
	BACKUP_DIR="$(cd "$dir" && pwd)"
	export BACKUP_DIR
	log "Preparing the backup job image"
	compose --progress quiet build --quiet backup >/dev/null
	STACK_CONTEXT=(-e "STACK_IMAGES=$(stack_images)" -e "STACK_MLFLOW_VERSION=$(running_mlflow_version)")
}

# require_running SERVICE...: the services must be up (the stack deployed).
require_running() {
	local running service
	running="$(compose ps --status running --services 2>/dev/null || true)"
	for service in "$@"; do
		grep -qx "$service" <<<"$running" \
			|| die "the $service service is not running: deploy the stack first (./stack_deploy.sh)"
	done
}

stack_images() {
	compose ps --format '{{.Service}}={{.Image}}' 2>/dev/null | paste -sd, - || true
}

running_mlflow_version() {
	compose exec -T mlflow python3 -c 'import mlflow; print(mlflow.__version__)' 2>/dev/null || true
}

# What the stack runs, for versions.json: asked once, in backup_prepare, not
# per job (jobs run in command substitutions, which could not keep it).
STACK_CONTEXT=()

# backup_job ARGS...: one run of the backup job; its stdout is the result.
backup_job() {
	compose --progress quiet run --rm --no-deps -T "${STACK_CONTEXT[@]}" "${BACKUP_MOUNTS[@]}" backup "$@"
}

BACKUP_MOUNTS=()

volume_name() { echo "${COMPOSE_PROJECT_NAME:-mlflow-stack}_$1"; }

# backup_cold ARGS...: stop the stack, archive its volumes, start it again.
backup_cold() {
	local was_running
	was_running="$(compose ps --status running --services 2>/dev/null || true)"
	log "Stopping the stack for a cold copy of its volumes"
	compose stop >&2
	BACKUP_MOUNTS=(-v "$(volume_name db-data):/volumes/db-data:ro" -v "$(volume_name minio-data):/volumes/minio-data:ro")
	local name status=0
	name="$(backup_job cold "$@")" || status=$?
	BACKUP_MOUNTS=()
	if [ -n "$was_running" ]; then
		log "Starting the stack again"
		compose up -d --wait >&2
	fi
	[ "$status" = 0 ] || die "the cold backup failed (see above); the stack was restarted"
	echo "$name"
}
