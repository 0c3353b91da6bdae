#!/usr/bin/env bash
# Like MinIO's entrypoint: anything that is not "minio" gets "minio" prepended.
set -Eeo pipefail
if [ "${1:-}" != minio ] && [ -n "${1:-}" ]; then
	set -- minio "$@"
fi
exec "$@"
