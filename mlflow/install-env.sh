#!/usr/bin/env bash
# Builds the server's Python environment at PREFIX; run by mlflow/Dockerfile.
# Usage: install-env.sh pip|conda PREFIX [MLFLOW_VERSION]
# Both variants install requirements.txt with constraints.txt; an explicit
# MLFLOW_VERSION (to test upgrades) replaces the pinned MLflow and drops the
# lock, which belongs to the pinned release.
set -Eeuo pipefail
variant="$1" prefix="$2" version="${3:-}"
cd "$(dirname "${BASH_SOURCE[0]}")"
export PIP_CERT=/etc/ssl/certs/ca-certificates.crt

if [ -n "$version" ]; then
	sed -i "s/^mlflow\[auth\]==.*/mlflow[auth]==${version}/" requirements.txt
	: > constraints.txt
fi
case "$variant" in
	pip)
		python3 -m venv "$prefix"
		"$prefix/bin/pip" install -r requirements.txt -c constraints.txt
		;;
	conda)
		conda env create --yes --prefix "$prefix" --file conda.yml
		conda clean --all --yes
		;;
	*)
		echo "install-env.sh: MLFLOW_VARIANT=$variant: use pip or conda" >&2
		exit 2
		;;
esac
"$prefix/bin/pip" check
