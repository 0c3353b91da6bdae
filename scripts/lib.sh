# shellcheck shell=bash
# Shared by the stack scripts: strict mode, an error trap that names the
# failing file:line and command, logging, and the calls into the Python side
# (stack/), which owns every value: shell never parses .env, it evals the
# quoted `export` lines Python prints.

set -Eeuo pipefail

STACK_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export STACK_ROOT

# Every script: --version prints this release of the stack (VERSION).
if [ "${1:-}" = --version ]; then
	printf '%s %s\n' "${0##*/}" "$(cat "$STACK_ROOT/VERSION")"
	exit 0
fi

on_error() {
	local code=$? file="${BASH_SOURCE[1]:-?}" line="${BASH_LINENO[0]:-?}"
	echo "error: ${file#"$STACK_ROOT"/}:$line: '$BASH_COMMAND' exited with $code" >&2
	exit "$code"
}
trap on_error ERR

log() { printf '==> %s\n' "$*" >&2; }

die() { printf 'error: %s\n' "$*" >&2; exit 1; }
# DEPLOY_TIMEOUT: seconds a deploy, a restore or a swarm step waits for services to be
# healthy, from the caller's environment (not .env); its one default. The scripts that
# wait check it (require_deploy_timeout) once their command line is read.
DEPLOY_TIMEOUT="${DEPLOY_TIMEOUT:-900}"
export DEPLOY_TIMEOUT
require_deploy_timeout() {
	[[ "$DEPLOY_TIMEOUT" =~ ^[1-9][0-9]*$ ]] || die "DEPLOY_TIMEOUT must be a whole number of seconds, got '$DEPLOY_TIMEOUT'"
}

# usage_error MESSAGE: a wrong command line. Every script alike (and the Python side,
# argparse): the usage on stderr, the error, exit status 2; other failures exit 1.
usage_error() { usage >&2; printf 'error: %s\n' "$*" >&2; exit 2; }

# require_running SERVICE...: the services must be up (the stack deployed).
require_running() {
	local running service
	running="$(compose ps --status running --services 2>/dev/null || true)"
	for service in "$@"; do
		grep -qx "$service" <<<"$running" \
			|| die "the $service service is not running: deploy the stack first (./stack_deploy.sh)"
	done
}

# up_and_wait HINT [ARGS...]: start the stack and wait until it is healthy; if it
# is not, show each service's state and last log lines, then die with HINT.
up_and_wait() {
	local hint="$1"
	shift
	if ! compose up -d --wait "$@" >&2; then
		echo >&2
		compose ps -a >&2 || true
		echo >&2 "--- last log lines of each service ---"
		compose logs --no-color --tail 30 >&2 || true
		die "the stack did not become healthy; the logs above say why. $hint"
	fi
}

require_python() {
	command -v python3 >/dev/null 2>&1 || die "python3 (3.9 or later) is needed to run this script: install it (e.g. apt-get install python3)"
	python3 -c 'import sys; sys.exit(sys.version_info < (3, 9))' || die "python3 is older than 3.9: install a newer one"
}

_stack_python() {
	PYTHONPATH="$STACK_ROOT${PYTHONPATH:+:$PYTHONPATH}" python3 -m stack "$@"
}

# stack_py ARGS: the Python side of the scripts. Its errors already say what
# to do, so a failure exits with its status and no trap noise.
stack_py() {
	_stack_python "$@" || exit $?
}

# compose ARGS: docker compose on this stack (project, files and values from
# stack/paths.py and stack/compose.py); returns Compose's status.
compose() {
	_stack_python compose "$@"
}

# load_compose_env: export what Compose needs (makes the TLS material and the
# secret files), as ./stack_deploy.sh does before building or starting.
load_compose_env() {
	local exports
	exports="$(stack_py compose-env)"
	eval "$exports"
}

# jobs_target [--compose-deploy|--swarm-deploy]: where the one-off jobs
# (backups, restores, gc, the schema check) run, in STACK_JOBS_ON, decided once
# per script run:
#   compose  beside the Compose stack, on its network;
#   swarm    from this manager, on the swarm stack's attachable stores network
#            (stack/swarm-one-off.yml);
#   scratch  in a throwaway Compose project of their own (scratch_down removes
#            its network): the check of stores outside the stack (step_stores),
#            and a swarm deploy whose stores are all outside, before its network
#            exists.
# A deploy says which it is; the other scripts find the stack where it runs.
jobs_target() {
	[ -z "${STACK_JOBS_ON:-}" ] || return 0
	case "${1:-}" in
		--compose-deploy) STACK_JOBS_ON=compose ;;
		--swarm-deploy)
			STACK_JOBS_ON=scratch
			if docker network inspect "${COMPOSE_PROJECT_NAME}_backend" >/dev/null 2>&1; then
				STACK_JOBS_ON=swarm
			fi
			;;
		*)
			if _stack_python swarm-running; then
				STACK_JOBS_ON=swarm
			elif _stack_python swarm-worker && [ -z "$(compose --profile '*' ps -aq 2>/dev/null)" ]; then
				die "this machine is a worker of a swarm: run this on a manager of the swarm that runs the stack (never deploy the stack with Compose on its data node while the swarm runs it)"
			else
				STACK_JOBS_ON=compose
			fi
			;;
	esac
	export STACK_JOBS_ON
}
# Decided here, never taken from the caller's environment.
unset STACK_JOBS_ON

SCRATCH_SUFFIX=-jobs

# job_compose ARGS: Compose for the one-off jobs, where jobs_target says.
job_compose() {
	case "${STACK_JOBS_ON:-compose}" in
		swarm) _stack_python swarm-compose "$@" ;;
		scratch) COMPOSE_PROJECT_NAME="$COMPOSE_PROJECT_NAME$SCRATCH_SUFFIX" compose "$@" ;;
		*) compose "$@" ;;
	esac
}

# scratch_down: remove the network the scratch jobs made (their containers went
# with `run --rm`). Only that network, by name: a busy one is left alone.
scratch_down() {
	docker network rm "$COMPOSE_PROJECT_NAME${SCRATCH_SUFFIX}_backend" >/dev/null 2>&1 || true
}

# require_swarm_network: the one-off jobs must be able to join the swarm stack's
# stores network (one made by an earlier version is not attachable).
require_swarm_network() {
	local net="${COMPOSE_PROJECT_NAME}_backend"
	[ "$(docker network inspect --format '{{.Attachable}}' "$net" 2>/dev/null)" = true ] \
		|| die "the swarm stack's network $net was made by an earlier version, which one-off jobs (backups, restores, gc, the schema check) cannot join: take the stack down with ./stack_remove.sh (data volumes are kept), then run ./stack_deploy.sh --swarm again"
}

# require_stores_running: the stack's own stores must be up (on Compose or the
# swarm), and on a swarm its network must take the jobs.
require_stores_running() {
	if [ "${STACK_JOBS_ON:-compose}" = swarm ]; then
		require_swarm_network
		[ -n "$STACK_OWN_STORES" ] || return 0
		# shellcheck disable=SC2086 # the stores' service names: single words
		_stack_python swarm-check $STACK_OWN_STORES \
			|| die "the swarm stack's stores are not running as deployed (above): run ./stack_deploy.sh --swarm first"
	elif [ -n "$STACK_OWN_STORES" ]; then
		# shellcheck disable=SC2086 # the stores' service names: single words
		require_running $STACK_OWN_STORES
	fi
}

# swarm_failed HINT: show the swarm stack's tasks (their errors say why), then die.
swarm_failed() {
	echo >&2
	docker stack ps --no-trunc --format '{{.Name}} on {{.Node}}: {{.CurrentState}} {{.Error}}' "$COMPOSE_PROJECT_NAME" >&2 || true
	die "$1"
}

# confirm PROMPT: yes when ASSUME_YES=1; refuses without a terminal to ask on.
confirm() {
	[ "${ASSUME_YES:-0}" = 1 ] && return 0
	if [ ! -t 0 ]; then
		die "$1: no terminal to confirm on; re-run with --yes"
	fi
	local answer
	read -r -p "$1 [y/N] " answer
	[[ "$answer" =~ ^[Yy]([Ee][Ss])?$ ]]
}

require_python
# STACK_ENV_FILE and COMPOSE_PROJECT_NAME, resolved once (stack/paths.py).
eval "$(stack_py paths)"
