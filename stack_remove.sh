#!/usr/bin/env bash
# Removes the stack's containers and networks. Data volumes stay unless --purge.
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/scripts/lib.sh"

usage() {
	cat <<'USAGE'
Usage: ./stack_remove.sh [--purge] [--yes] [--help]

Stops and removes the MLflow stack's containers and networks. The data
(PostgreSQL and MinIO volumes) and .env are kept, so ./stack_deploy.sh brings
everything back.

  --purge  also delete the data volumes: every experiment, run and artifact
           (asks for confirmation)
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
		*) usage >&2; die "unknown option: $1" ;;
	esac
done
export ASSUME_YES

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
