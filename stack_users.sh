#!/usr/bin/env bash
# Manages MLflow user accounts (authentication is on by default).
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/scripts/lib.sh"

usage() {
	cat <<'USAGE'
Usage: ./stack_users.sh add NAME [--admin] [--password-stdin]
       ./stack_users.sh passwd NAME [--password-stdin]
       ./stack_users.sh grant NAME EXPERIMENT READ|USE|EDIT|MANAGE|DENY
       ./stack_users.sh delete NAME
       ./stack_users.sh list
       ./stack_users.sh failures
       ./stack_users.sh unlock NAME
       ./stack_users.sh token create NAME --user ACCOUNT [--expires 90d]
       ./stack_users.sh token list [--user ACCOUNT]
       ./stack_users.sh token revoke ID

Manages the accounts of the stack's MLflow server, as its admin (credentials
from .env). Without --password-stdin a strong password is generated and
printed once. EXPERIMENT is an experiment id or name. Users get
MLFLOW_DEFAULT_PERMISSION (from .env) on experiments they did not create and
MANAGE on their own. failures lists the failed logins of the last hour (by
account, address and both) and how long each holds a login; unlock NAME
forgets an account's, when its owner is held out (docs/security.md).
token create makes an access token for a script or CI (MLFLOW_TRACKING_TOKEN;
printed once, stored as a digest only) acting as ACCOUNT;
token list shows tokens with their last use; token revoke stops one.
USAGE
}

case "${1:-}" in
	--help|-h) usage; exit 0 ;;
	"") usage_error "which action? add, passwd, grant, delete, list, failures, unlock or token" ;;
	-*) usage_error "unknown option: $1" ;;
esac
stack_py users "$@"
