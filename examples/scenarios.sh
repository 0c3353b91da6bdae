#!/usr/bin/env bash
# One command per tracking scenario of docs/tutorial.md: starts what the
# scenario needs, runs the quickstart in a fresh folder, shows what was
# written where, and stops what it started. See --help.
set -Eeuo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
TOOLS="$HERE/_scenario_tools.py"
QUICKSTART="$HERE/quickstart/mlflow_tracking.py"

on_error() {
	local code=$? line="${BASH_LINENO[0]:-?}"
	echo "error: examples/scenarios.sh:$line: '$BASH_COMMAND' exited with $code" >&2
	exit "$code"
}
trap on_error ERR

log() { printf '\n==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
# A wrong command line: the usage, the error, exit 2 (as the stack's scripts).
usage_error() { usage >&2; printf 'error: %s\n' "$*" >&2; exit 2; }

usage() {
	cat <<'USAGE'
Usage: examples/scenarios.sh SCENARIO [--workdir DIR] [--keep] [--help]

Runs examples/quickstart/mlflow_tracking.py in one tracking scenario and shows
what ended up where (docs/tutorial.md explains each one):

  1      no server; the client writes a local file store (./mlruns)
  2      no server; entities in SQLite (sqlite:///mlruns.db), artifacts in ./mlruns
  3a     a local `mlflow server` on a file store, started on a free port of
         127.0.0.1 with --no-serve-artifacts --default-artifact-root ./mlruns
  3b     the same server on SQLite (sqlite:///mlruns.db)
  stack  the deployed stack of this repository: MLFLOW_TRACKING_URI from the
         environment, else from ./show_all.sh --client-env

Options:
  --workdir DIR  run in DIR (created if missing; must be empty) and keep it.
                 Default: a new temporary folder, removed at the end
  --keep         keep the temporary folder (its path is printed)
  --help         this text

Environment: MLFLOW_EXPERIMENT_NAME (default quickstart), PYTHON (the Python
with MLflow installed; default python3).

The quickstart is the same in every scenario; only MLFLOW_TRACKING_URI (and,
for the file store, MLFLOW_ALLOW_FILE_STORE=true) changes. Anything started
here (the MLflow server of 3a/3b) is stopped on exit, also after an error or
Ctrl-C.
USAGE
}

scenario=""
workdir=""
keep=0
while [ $# -gt 0 ]; do
	case "$1" in
		--workdir)
			[ $# -ge 2 ] || die "--workdir needs a folder"
			workdir="$2"; shift 2 ;;
		--workdir=*) workdir="${1#*=}"; shift ;;
		--keep) keep=1; shift ;;
		--help|-h) usage; exit 0 ;;
		1|2|3a|3b|stack)
			[ -z "$scenario" ] || die "one scenario at a time (got $scenario and $1)"
			scenario="$1"; shift ;;
		-*) usage_error "unknown option: $1" ;;
		*) usage_error "unknown scenario: $1 (use 1, 2, 3a, 3b or stack)" ;;
	esac
done
[ -n "$scenario" ] || usage_error "name a scenario: 1, 2, 3a, 3b or stack"

PYTHON="${PYTHON:-python3}"
command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found: install Python 3.9+ or set PYTHON"
"$PYTHON" -c 'import mlflow' >/dev/null 2>&1 ||
	die "MLflow is not installed for $PYTHON: pip install 'mlflow==3.17.2' (or use this repo's test venv: PATH=\$PWD/.venv/bin:\$PATH)"

tool() { "$PYTHON" "$TOOLS" "$@"; }

# --- the working folder ------------------------------------------------------
remove_workdir=0
if [ -n "$workdir" ]; then
	mkdir -p "$workdir"
	workdir="$(cd "$workdir" && pwd)"
	if [ -n "$(ls -A "$workdir")" ]; then
		die "$workdir is not empty: give a new or empty folder (each run starts from nothing)"
	fi
else
	workdir="$(mktemp -d "${TMPDIR:-/tmp}/mlflow-scenario-$scenario.XXXXXX")"
	[ "$keep" = 1 ] || remove_workdir=1
fi
output="$(mktemp "${TMPDIR:-/tmp}/mlflow-quickstart-output.XXXXXX")"

# --- cleanup: whatever was started is stopped, on success, error or Ctrl-C ---
server_pid=""
server_group=0
stop_server() {
	[ -n "$server_pid" ] || return 0
	local pid="$server_pid"
	server_pid=""
	if [ "$server_group" = 1 ]; then
		kill -TERM -- "-$pid" 2>/dev/null || true
	else
		kill -TERM "$pid" 2>/dev/null || true
	fi
	local waited=0
	while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt 40 ]; do
		sleep 0.25; waited=$((waited + 1))
	done
	if kill -0 "$pid" 2>/dev/null; then
		if [ "$server_group" = 1 ]; then kill -KILL -- "-$pid" 2>/dev/null || true
		else kill -KILL "$pid" 2>/dev/null || true; fi
	fi
	wait "$pid" 2>/dev/null || true
	echo "==> stopped the MLflow server (pid $pid)" >&2
}
cleanup() {
	local code=$?
	trap - ERR
	stop_server
	rm -f "$output"
	if [ "$remove_workdir" = 1 ]; then
		rm -rf "$workdir"
	fi
	exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start_server BACKEND_URI [VAR=VALUE...]: `mlflow server` in $workdir on a
# free port of 127.0.0.1, with VAR=VALUE in its environment only. Clients
# write artifacts themselves (--no-serve-artifacts).
start_server() {
	local backend="$1" port logfile
	shift
	port="$(tool free-port)"
	logfile="$workdir/mlflow-server.log"
	local cmd=(env "$@" "$PYTHON" -m mlflow server --host 127.0.0.1 --port "$port" --workers 1
		--backend-store-uri "$backend" --no-serve-artifacts --default-artifact-root ./mlruns)
	log "Starting the tracking server in $workdir (log: mlflow-server.log):"
	echo "    ${*:+$* }mlflow server ${cmd[*]:$(($# + 5))}" >&2
	if command -v setsid >/dev/null 2>&1; then
		server_group=1
		(cd "$workdir" && exec setsid "${cmd[@]}" >"$logfile" 2>&1 </dev/null) &
	else
		(cd "$workdir" && exec "${cmd[@]}" >"$logfile" 2>&1 </dev/null) &
	fi
	server_pid=$!
	tool wait-server "http://127.0.0.1:$port" "$server_pid" "$logfile" ||
		die "the MLflow server did not start (see above)"
	echo "    listening on http://127.0.0.1:$port (pid $server_pid)" >&2
	export MLFLOW_TRACKING_URI="http://127.0.0.1:$port"
}

# The client never contacts MLflow's telemetry host from these examples.
export MLFLOW_DISABLE_TELEMETRY="${MLFLOW_DISABLE_TELEMETRY:-true}"
# The server of 3a/3b: no job runner (about 1 GiB less memory, faster start).
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false

case "$scenario" in
	1)
		log "Scenario 1: no server; the client writes a local file store"
		# MLflow 3.17 refuses the file store (it is in maintenance mode) unless asked for.
		export MLFLOW_ALLOW_FILE_STORE=true
		export MLFLOW_TRACKING_URI=./mlruns
		echo "    note: MLflow 3.17 refuses the file store unless MLFLOW_ALLOW_FILE_STORE=true;" >&2
		echo "    it is in maintenance mode: prefer SQLite (scenario 2). See docs/tutorial.md." >&2 ;;
	2)
		log "Scenario 2: no server; entities in SQLite, artifacts in ./mlruns"
		export MLFLOW_TRACKING_URI=sqlite:///mlruns.db ;;
	3a)
		log "Scenario 3a: a local tracking server on a file store; the client writes artifacts"
		echo "    note: the server's file store needs MLFLOW_ALLOW_FILE_STORE=true in MLflow 3.17" >&2
		start_server ./mlruns MLFLOW_ALLOW_FILE_STORE=true ;;
	3b)
		log "Scenario 3b: a local tracking server on SQLite; the client writes artifacts"
		start_server sqlite:///mlruns.db ;;
	stack)
		log "Scenario 4 (stack): the deployed stack (PostgreSQL, MinIO, MLflow, nginx)"
		if [ -z "${MLFLOW_TRACKING_URI:-}" ]; then
			# Only its standard output is evaluated: warnings (a loopback address, say) go to ours.
			said="$(mktemp)"
			if ! client_env="$("$ROOT/show_all.sh" --client-env 2>"$said")"; then
				reason="$(tail -n 1 "$said")"
				rm -f "$said"
				die "the stack is not deployed ($reason). Deploy it with ./stack_deploy.sh, or export the MLFLOW_TRACKING_URI it printed"
			fi
			sed 's/^/    /' "$said" >&2
			rm -f "$said"
			grep -q '^export MLFLOW_TRACKING_URI=' <<<"$client_env" ||
				die "./show_all.sh --client-env printed no MLFLOW_TRACKING_URI"
			echo "    settings from ./show_all.sh --client-env:" >&2
			sed -n 's/^export \(MLFLOW_TRACKING_URI=.*\)/      \1/p' <<<"$client_env" >&2
			eval "$client_env"
		fi
		tool check-server "$MLFLOW_TRACKING_URI" >/dev/null || exit 1
		export MLFLOW_TRACKING_URI ;;
esac

log "Running the quickstart in $workdir:"
echo "    MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI${MLFLOW_ALLOW_FILE_STORE:+ MLFLOW_ALLOW_FILE_STORE=$MLFLOW_ALLOW_FILE_STORE} python $QUICKSTART" >&2
status=0
(cd "$workdir" && "$PYTHON" "$QUICKSTART") >"$output" 2>&1 || status=$?
sed 's/^/    /' "$output"
[ "$status" = 0 ] || die "the quickstart failed with exit status $status (its output is above)"
run_id="$(tool run-id "$output")"

log "What the run left in $workdir:"
tool show-dir "$workdir"
if [ -f "$workdir/mlruns.db" ]; then
	log "The SQLite database mlruns.db (entities; artifacts are files under mlruns/):"
	tool show-sqlite "$workdir/mlruns.db"
fi

log "The run, read back by a second process:"
(cd "$workdir" && tool show-run "$run_id")

stop_server

case "$scenario" in
	1) ui="MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri $workdir/mlruns --port 5000" ;;
	2) ui="mlflow ui --backend-store-uri sqlite:///$workdir/mlruns.db --default-artifact-root $workdir/mlruns --port 5000" ;;
	3a) ui="cd $workdir && MLFLOW_ALLOW_FILE_STORE=true mlflow server --backend-store-uri ./mlruns --no-serve-artifacts --default-artifact-root ./mlruns --port 5000" ;;
	3b) ui="cd $workdir && mlflow server --backend-store-uri sqlite:///mlruns.db --no-serve-artifacts --default-artifact-root ./mlruns --port 5000" ;;
	stack) ui="open $MLFLOW_TRACKING_URI in a browser" ;;
esac
log "Done: scenario $scenario, run $run_id"
if [ "$remove_workdir" = 1 ] && [ "$scenario" != stack ]; then
	echo "    $workdir is removed now; use --keep or --workdir DIR to keep it and browse it with:" >&2
	echo "    $ui" >&2
else
	echo "    to browse it: $ui" >&2
fi
echo "run_id=$run_id"
