#!/usr/bin/env bash
# Writes one backup set of the running stack and prints its path as the last line.
# shellcheck source=../scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
# shellcheck source=backup_lib.sh
. "$STACK_ROOT/db/backup_lib.sh"

usage() {
	cat <<'USAGE'
Usage: db/db_volume_backup.sh [--keep N] [--cold] [--help]

Writes a backup set under BACKUP_DIR (from .env; default ./backups) and prints
its path last. By default the stack keeps serving clients: the database is
dumped with pg_dump (a consistent snapshot), then the bucket is copied, and a
manifest records row counts, objects and a sha256 of every file.

  --keep N  afterwards keep only the newest N sets (safety sets made before a
            restore or an upgrade are never deleted by this)
  --cold    archive the data volumes as they are on disk instead; the stack is
            stopped for the copy and started again
  --help    this text
USAGE
}

KEEP="" COLD=0
while [ $# -gt 0 ]; do
	case "$1" in
		--keep) [ $# -ge 2 ] || usage_error "--keep needs a number"; KEEP="$2"; shift 2 ;;
		--keep=*) KEEP="${1#*=}"; shift ;;
		--cold) COLD=1; shift ;;
		--help|-h) usage; exit 0 ;;
		*) usage_error "unknown option: $1" ;;
	esac
done
if [ -n "$KEEP" ] && ! [[ "$KEEP" =~ ^[1-9][0-9]*$ ]]; then
	usage_error "--keep $KEEP: use a whole number of 1 or more"
fi
keep_args=()
[ -n "$KEEP" ] && keep_args=(--keep "$KEEP")

backup_prepare
if [ "$COLD" = 1 ]; then
	require_own_stores "--cold"
	name="$(backup_cold "${keep_args[@]}")"
else
	require_stores_running
	name="$(backup_job -- backup "${keep_args[@]}")"
fi
echo "$BACKUP_DIR/$name"
