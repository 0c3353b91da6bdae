# shellcheck shell=bash
# Shared by the stack scripts: strict mode, an error trap that names the
# failing file:line and command, logging, and the calls into the Python side
# (stack/), which owns every value: shell never parses .env, it evals the
# quoted `export` lines Python prints.

set -Eeuo pipefail

STACK_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export STACK_ROOT

on_error() {
	local code=$? file="${BASH_SOURCE[1]:-?}" line="${BASH_LINENO[0]:-?}"
	echo "error: ${file#"$STACK_ROOT"/}:$line: '$BASH_COMMAND' exited with $code" >&2
	exit "$code"
}
trap on_error ERR

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

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

# detect_swarm: STACK_ON_SWARM=1 when the stack runs on the swarm this machine
# manages (the one-off jobs below then run from here on its network), else 0
# (Compose; on a swarm worker, the scripts say the stack is not running here).
detect_swarm() {
	STACK_ON_SWARM=0
	if _stack_python swarm-running; then
		STACK_ON_SWARM=1
	fi
	export STACK_ON_SWARM
}

# job_compose ARGS: Compose for the one-off jobs; on a swarm they join the swarm
# stack's stores network (stack/swarm-one-off.yml) from this manager.
job_compose() {
	if [ "${STACK_ON_SWARM:-0}" = 1 ]; then
		_stack_python swarm-compose "$@"
	else
		compose "$@"
	fi
}

# require_stores_running: the stack's own stores must be up (on Compose or the swarm).
require_stores_running() {
	[ -n "$STACK_OWN_STORES" ] || return 0
	if [ "${STACK_ON_SWARM:-0}" = 1 ]; then
		# shellcheck disable=SC2086 # the stores' service names: single words
		_stack_python swarm-check $STACK_OWN_STORES \
			|| die "the swarm stack's stores are not running as deployed (above): run ./stack_deploy.sh --swarm first"
	else
		# shellcheck disable=SC2086 # the stores' service names: single words
		require_running $STACK_OWN_STORES
	fi
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
