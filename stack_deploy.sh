#!/usr/bin/env bash
# Deploys the MLflow stack (or re-deploys it: a re-run changes nothing).
# Steps: .env -> preflight -> stand-ins (if chosen) -> build -> the stores outside
# (if any) -> the schema (a backup before an upgrade) -> start and wait until
# healthy -> client settings. On a swarm: the stores first, then the schema, the
# jobs and the rest (step_swarm).
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/scripts/lib.sh"

usage() {
	cat <<'USAGE'
Usage: ./stack_deploy.sh [--variant pip|conda] [--standins] [--swarm] [--yes] [--dry-run] [--help]

Deploys the MLflow stack with Docker Compose (or to a Docker Swarm) and prints
the settings clients need (as export lines).

  --variant pip|conda  MLflow image variant; remembered in .env (default: pip)
  --standins           where no container registry can provide an image, build
                       an offline stand-in for it here and use that: for trying
                       the stack out and for tests, NOT for production.
                       Remembered in .env (STACK_STANDINS=true)
  --swarm              deploy to the Docker Swarm this machine manages, as stack
                       COMPOSE_PROJECT_NAME (docs/swarm.md): images are
                       pushed to STACK_REGISTRY, db and minio run on the node
                       labelled mlflow-stack.data=true, nginx on every node
  --yes                do not ask for confirmation (e.g. switching variant on a
                       running stack)
  --dry-run            check everything and show what would be done; change nothing
  --help               this text

Environment: STACK_ENV_FILE (default ./.env), COMPOSE_PROJECT_NAME
(default mlflow-stack), BUILD_CA_CERT (a CA certificate for image builds
behind a TLS-intercepting proxy; default: the one this machine's pip uses,
if any), DEPLOY_TIMEOUT (seconds, default 900),
and any image override such as POSTGRES_IMAGE (see docs/images.md).
USAGE
}

VARIANT="" DRY_RUN=0 ASSUME_YES=0 STANDINS=0 SWARM=0
while [ $# -gt 0 ]; do
	case "$1" in
		--variant) [ $# -ge 2 ] || usage_error "--variant needs a value: pip or conda"; VARIANT="$2"; shift 2 ;;
		--variant=*) VARIANT="${1#*=}"; shift ;;
		--standins) STANDINS=1; shift ;;
		--swarm) SWARM=1; shift ;;
		--yes|-y) ASSUME_YES=1; shift ;;
		--dry-run) DRY_RUN=1; shift ;;
		--help|-h) usage; exit 0 ;;
		*) usage_error "unknown option: $1" ;;
	esac
done
require_deploy_timeout
case "$VARIANT" in ""|pip|conda) ;; *) usage_error "--variant $VARIANT: use pip or conda" ;; esac
export ASSUME_YES

# The admin's password is printed once, by the deploy that made .env (and on
# request: ./show_all.sh --client-env), not by every re-deploy into its logs.
FIRST_DEPLOY=0

step_env() {
	log "Settings ($STACK_ENV_FILE)"
	[ -f "$STACK_ENV_FILE" ] || FIRST_DEPLOY=1
	local args=()
	[ -n "$VARIANT" ] && args+=(--variant "$VARIANT")
	[ "$STANDINS" = 1 ] && args+=(--standins)
	[ "$DRY_RUN" = 1 ] && args+=(--dry-run)
	if [ -n "$VARIANT" ] && [ "$DRY_RUN" = 0 ]; then
		local exports
		exports="$(stack_py get MLFLOW_VARIANT)"
		eval "$exports"
		if [ -n "$CURRENT_MLFLOW_VARIANT" ] && [ "$CURRENT_MLFLOW_VARIANT" != "$VARIANT" ] \
			&& [ -n "$(compose ps -q mlflow 2>/dev/null)" ]; then
			confirm "Switch the running server from the $CURRENT_MLFLOW_VARIANT to the $VARIANT image?" || die "left as it is"
		fi
	fi
	stack_py env "${args[@]}"
}

step_preflight() {
	log "Preflight checks"
	local args=()
	[ "$STANDINS" = 1 ] && args+=(--standins)
	[ "$DRY_RUN" = 1 ] && args+=(--dry-run)
	[ "$SWARM" = 1 ] && args+=(--swarm)
	stack_py preflight "${args[@]}"
	if [ "$SWARM" = 1 ]; then
		stack_py swarm-preflight
	elif _stack_python swarm-running; then
		die "the stack $COMPOSE_PROJECT_NAME runs on this machine's swarm: deploy it with ./stack_deploy.sh --swarm (or take it down with ./stack_remove.sh first)"
	fi
}

# Images: the offline stand-ins when STACK_STANDINS=true (stack/standins.py
# records them; load_compose_env exports them), then the stack's own images
# (mlflow, and backup when scheduled): each build's output goes to a log file,
# and a failure ends with what to do.
step_build() {
	stack_py standins
	load_compose_env
	stack_py build
}

# step_network: the backend network is internal with the stack's own stores and
# has a route out with a store outside; on a swarm it is attachable (the one-off
# jobs join it). Neither Compose nor Swarm changes that on an existing network,
# so a switch needs the stack taken down.
step_network() {
	local net="${COMPOSE_PROJECT_NAME}_backend" internal
	internal="$(docker network inspect --format '{{.Internal}}' "$net" 2>/dev/null)" || return 0
	[ "$internal" = "$STACK_BACKEND_INTERNAL" ] \
		|| die "POSTGRES_HOST, S3_ENDPOINT_URL or PITR_S3_ENDPOINT_URL changed between stores on this machine and stores outside it (which need a route out of the stack's network), and the stack's network $net was made for the other way: take the stack down first with ./stack_remove.sh (data volumes are kept), then run ./stack_deploy.sh again"
	[ "$SWARM" = 0 ] || require_swarm_network
}

# step_stores: the stores outside the stack (POSTGRES_HOST, S3_ENDPOINT_URL) must
# answer with its credentials, asked from a container (the way the services
# will reach them), before anything starts. The check runs as a scratch project
# (jobs_target), so the stack's networks are left as they are.
step_stores() {
	local service
	for service in db minio; do
		if [[ " $STACK_OWN_STORES " != *" $service "* ]] \
			&& docker volume inspect "${COMPOSE_PROJECT_NAME}_$service-data" >/dev/null 2>&1; then
			log "Note: the volume ${COMPOSE_PROJECT_NAME}_$service-data (the stack's own $service) is kept but not used while a store outside replaces it; docs/external-stores.md says how to move its data"
		fi
	done
	[ -n "$STACK_OUTSIDE_STORES" ] || return 0
	log "Checking the stores outside the stack: $STACK_OUTSIDE_STORES"
	local status=0
	# shellcheck disable=SC2086 # the stores' names: single words
	STACK_JOBS_ON=scratch job_compose run --rm --no-deps -T -e STACK_CONNECTIONS_NEEDED migrate \
		check-stores $STACK_OUTSIDE_STORES >&2 \
		|| status=$?
	scratch_down
	[ "$status" = 0 ] \
		|| die "fix the settings above in $STACK_ENV_FILE (or the store), then run ./stack_deploy.sh again; nothing was started"
}

# step_schema NOTE_VAR: an existing database whose schema is older than the
# MLflow being deployed is backed up before the migrate job upgrades it (MLflow
# has no downgrade); NOTE_VAR receives what to tell the user afterwards. On a
# swarm the stores run already (step_swarm deploys them first) and the check is
# a one-off job from this manager (jobs_target).
# shellcheck disable=SC2034 # note is a nameref: assigning it sets the caller's variable
step_schema() {
	local -n note="$1"
	note=""
	if [ "$SWARM" = 1 ]; then
		jobs_target --swarm-deploy
	else
		jobs_target --compose-deploy
	fi
	if [[ " $STACK_OWN_STORES " == *" db "* ]]; then
		if [ "$SWARM" = 0 ]; then
			docker volume inspect "${COMPOSE_PROJECT_NAME}_db-data" >/dev/null 2>&1 || return 0
			log "Checking the database schema against MLflow in the new image"
			compose up -d --wait db >&2
		else
			log "Checking the database schema against MLflow in the new image"
		fi
	else
		log "Checking the database schema at $STACK_POSTGRES_HOST against MLflow in the new image"
	fi
	local out status from to
	out="$(job_compose run --rm --no-deps -T migrate schema-status)" \
		|| die "the schema check job failed (its output is above); nothing was changed. Fix the cause and run ./stack_deploy.sh again"
	read -r status from to <<<"$out"
	case "$status" in
		empty|current) log "Schema: $status" ;;
		outdated)
			log "Schema upgrade needed ($from -> $to): taking a pre-upgrade backup first"
			# shellcheck source=db/backup_lib.sh
			. "$STACK_ROOT/db/backup_lib.sh"
			backup_prepare
			if [ "$SWARM" = 0 ] && [ -n "$STACK_OWN_STORES" ]; then
				# shellcheck disable=SC2086 # the stores' service names: single words
				compose up -d --wait $STACK_OWN_STORES >&2
			fi
			local name
			name="$(backup_job -- backup --kind pre-upgrade)"
			note="Upgraded the MLflow schema from $from to $to. Pre-upgrade backup: $BACKUP_DIR/$name
    To roll back: deploy the previous version, then db/db_volume_restore.sh $BACKUP_DIR/$name"
			;;
		newer)
			die "the database schema ($from) is newer than this MLflow knows ($to): deploy the MLflow version that wrote it, or restore a backup made with this one (db/db_volume_restore.sh)" ;;
		*) die "could not read the schema state (got: '$status $from $to')" ;;
	esac
}

step_up() {
	log "Starting services and waiting until all are healthy (up to ${DEPLOY_TIMEOUT} s)"
	up_and_wait "Fix it and run ./stack_deploy.sh again (data volumes are kept)" \
		--remove-orphans --wait-timeout "${DEPLOY_TIMEOUT}"
	# Compose leaves the services of a profile that was turned off running.
	local off
	mapfile -t off < <(stack_py inactive)
	if [ "${#off[@]}" -gt 0 ] && [ -n "${off[0]}" ]; then
		compose --profile '*' rm --stop --force "${off[@]}" >&2
	fi
}

# On a swarm: the images built here go to STACK_REGISTRY, the stack file is made
# from docker-compose.yml (stack/swarm.py), and `docker stack deploy` rolls the
# services to it, one task at a time: first the stores alone (the schema is
# checked, and backed up before an upgrade), then the jobs (the schema is current
# before any new server starts), then everything; then every service must run
# as deployed, and configs and secrets no longer named are removed.
step_swarm() {
	stack_py swarm-push
	local files upgrade_note
	mapfile -t files < <(stack_py swarm-file)
	log "Deploying stack $COMPOSE_PROJECT_NAME to the swarm (${files[2]}): the stores, then the jobs, then the rest; waiting until every service runs healthy (up to ${DEPLOY_TIMEOUT} s each)"
	local failed="the stack did not settle on the swarm; the tasks above say why (docker service logs ${COMPOSE_PROJECT_NAME}_SERVICE for more). Fix it and run ./stack_deploy.sh --swarm again (data volumes are kept)"
	if [ -n "$STACK_OWN_STORES" ] && ! swarm_deploy "${files[0]}"; then
		swarm_failed "$failed"
	fi
	step_schema upgrade_note
	[ "$STACK_JOBS_ON" != scratch ] || scratch_down
	if ! swarm_deploy "${files[1]}" || ! swarm_deploy "${files[2]}" --prune || ! _stack_python swarm-check; then
		swarm_failed "$failed"
	fi
	stack_py swarm-prune
	[ -z "$upgrade_note" ] || log "$upgrade_note"
}

# swarm_deploy FILE [ARGS...]: docker stack deploy, then wait for the services in FILE
# (stack/swarm.py: not --detach=false, which waits out each service's 20 s update
# monitor in turn, changed or not).
swarm_deploy() {
	local file="$1"
	shift
	timeout "${DEPLOY_TIMEOUT}" docker stack deploy --detach=true --resolve-image changed \
		--with-registry-auth "$@" -c "$file" "$COMPOSE_PROJECT_NAME" >&2 || return
	_stack_python swarm-wait --timeout "${DEPLOY_TIMEOUT}" "$file"
}

step_client_env() {
	log "Deployed. Clients connect with:"
	if [ "$FIRST_DEPLOY" = 1 ]; then
		stack_py client-env
	else
		stack_py client-env --without-password
	fi
}

main() {
	step_env
	step_preflight
	if [ "$DRY_RUN" = 1 ]; then
		if [ -f "$STACK_ENV_FILE" ]; then
			compose config --quiet
		fi
		if [ "$SWARM" = 1 ]; then
			log "Dry run: would build the stand-ins the checks above name (if any) and the MLflow image, push them to STACK_REGISTRY, then 'docker stack deploy'; nothing was changed"
		else
			log "Dry run: would build the stand-ins the checks above name (if any), the MLflow image, then 'docker compose up -d --wait'; nothing was changed"
		fi
		return 0
	fi
	step_build
	step_network
	step_stores
	if [ "$SWARM" = 1 ]; then
		step_swarm
		step_client_env
		stack_py release-deployed
		stack_py standins --reminder
		return 0
	fi
	local upgrade_note
	step_schema upgrade_note
	step_up
	[ -z "$upgrade_note" ] || log "$upgrade_note"
	step_client_env
	stack_py release-deployed
	stack_py standins --reminder
}

main
