#!/usr/bin/env bash
# Removes the stack's containers and networks. Data volumes stay unless --purge.
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/scripts/lib.sh"

usage() {
	cat <<'USAGE'
Usage: ./stack_remove.sh [--purge] [--yes] [--help]

Stops and removes the MLflow stack's containers and networks, or its services,
networks, configs and secrets when it runs on this machine's swarm. The data
(PostgreSQL and MinIO volumes) and .env are kept, so ./stack_deploy.sh brings
everything back.

  --purge  also delete the data volumes: every experiment, run and artifact
           (asks for confirmation). On a swarm: the volumes on this node;
           those on other nodes are named, to remove there
  --yes    do not ask for confirmation
  --help   this text
USAGE
}

PURGE=0 ASSUME_YES=0
while [ $# -gt 0 ]; do
	case "$1" in
		--purge) PURGE=1; shift ;;
		--yes|-y) ASSUME_YES=1; shift ;;
		--help|-h) usage; exit 0 ;;
		*) usage_error "unknown option: $1" ;;
	esac
done
export ASSUME_YES

# remove_swarm_stack: `docker stack rm`, then wait until its tasks and networks are
# gone (a re-deploy straight after would collide with them).
remove_swarm_stack() {
	log "Removing stack $COMPOSE_PROJECT_NAME from the swarm (services, networks, configs, secrets)"
	docker stack rm "$COMPOSE_PROJECT_NAME" >&2
	local _ left label="label=com.docker.stack.namespace=$COMPOSE_PROJECT_NAME"
	for _ in $(seq 1 180); do
		left="$(docker ps --filter "$label" --format '{{.Names}} ({{.Status}})'
			docker network ls --filter "$label" --format 'network {{.Name}}')"
		if [ -z "$left" ]; then
			# Swarm leaves the containers of finished job tasks behind.
			docker ps -aq --filter "$label" | xargs -r docker rm -f >/dev/null
			return 0
		fi
		sleep 1
	done
	die "after 180 s these are still there: $(tr '\n' ' ' <<<"$left"); see docker stack ps $COMPOSE_PROJECT_NAME, then run ./stack_remove.sh again"
}

if _stack_python swarm-worker && [ -z "$(compose --profile '*' ps -aq 2>/dev/null)" ]; then
	die "this machine is a swarm worker and runs no Compose stack $COMPOSE_PROJECT_NAME: run ./stack_remove.sh on a manager node to remove the swarm stack"
fi
if _stack_python swarm-running; then
	if [ "$PURGE" = 1 ]; then
		confirm "Delete the swarm stack '$COMPOSE_PROJECT_NAME' AND its data volumes (all experiments, runs and artifacts)?" \
			|| die "nothing removed"
	fi
	remove_swarm_stack
	if [ "$PURGE" = 1 ]; then
		mapfile -t volumes < <(stack_py swarm-volumes)
		[ "${#volumes[@]}" -eq 0 ] || docker volume rm "${volumes[@]}" >&2
		log "Removed the volumes on this node. On every other node of the swarm that ran it: docker volume ls --filter label=com.docker.stack.namespace=$COMPOSE_PROJECT_NAME, then docker volume rm them"
	fi
	log "Done."
	exit 0
fi

if [ "$PURGE" = 1 ]; then
	confirm "Delete the stack '$COMPOSE_PROJECT_NAME' AND its data volumes (all experiments, runs and artifacts)?" \
		|| die "nothing removed"
	log "Removing containers, networks and data volumes"
	compose --profile '*' down --remove-orphans --volumes
else
	log "Removing containers and networks (data volumes are kept)"
	compose --profile '*' down --remove-orphans
fi
log "Done."
