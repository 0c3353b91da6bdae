#!/usr/bin/env bash
# Shows the stack: services, URLs, volumes, versions, MLflow and bucket counts.
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/scripts/lib.sh"

usage() {
	cat <<'USAGE'
Usage: ./show_all.sh [--client-env | --client-bundle DIR [--user NAME] | --test-alert | --recovery-kit DIR]
                     [--help] [--version]

  --client-env     print only the client settings (export lines, with the admin's
                   login and, in direct mode, the store's keys), as the first deploy did
  --client-bundle DIR
                   write a folder to hand to a colleague: mlflow.env (settings for
                   their own login NAME, no admin password, no path of this machine)
                   and the CA files beside it
  --recovery-kit DIR
                   copy what a restore on a new machine needs and no backup holds
                   (.env, the local CA) into the new folder DIR, to keep off this machine
  --test-alert     send a test alert through Alertmanager (profile monitoring) and
                   say whether each receiver .env names (ALERT_*) took it
  --help           this text
USAGE
}

args=()
while [ $# -gt 0 ]; do
	case "$1" in
		--client-env) args+=(--client-env); shift ;;
		--test-alert) args+=(--test-alert); shift ;;
		--client-bundle|--user|--recovery-kit)
			[ $# -ge 2 ] || usage_error "$1 needs a value"
			args+=("$1" "$2"); shift 2 ;;
		--help|-h) usage; exit 0 ;;
		*) usage_error "unknown option: $1" ;;
	esac
done

case " ${args[*]} " in
	*" --user "*) [[ " ${args[*]} " == *" --client-bundle "* ]] || usage_error "--user goes with --client-bundle DIR" ;;
esac
stack_py show "${args[@]}"
