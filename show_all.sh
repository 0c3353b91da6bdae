#!/usr/bin/env bash
# Shows the stack: services, URLs, volumes, versions, MLflow and bucket counts.
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/scripts/lib.sh"

usage() {
	cat <<'USAGE'
Usage: ./show_all.sh [--client-env] [--help]

  --client-env  print only the client settings (export lines, with credentials
                if the artifact mode needs them), as ./stack_deploy.sh did
  --help        this text
USAGE
}

args=()
while [ $# -gt 0 ]; do
	case "$1" in
		--client-env) args+=(--client-env); shift ;;
		--help|-h) usage; exit 0 ;;
		*) usage_error "unknown option: $1" ;;
	esac
done

stack_py show "${args[@]}"
