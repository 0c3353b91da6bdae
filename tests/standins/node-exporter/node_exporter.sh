#!/bin/sh
# /bin/node_exporter of the stand-in: Debian's prometheus-node-exporter with
# the upstream defaults where Debian changed them, unless the arguments set
# them: the systemd collector off (Debian turns it on; without D-Bus in a
# container it fails every scrape) and upstream's mount-points-exclude
# (Debian's also excludes /run, /mnt and /media).
set -eu
systemd=--no-collector.systemd
mounts='--collector.filesystem.mount-points-exclude=^/(dev|proc|run/credentials/.+|sys|var/lib/docker/.+|var/lib/containers/storage/.+)($|/)'
for arg in "$@"; do
	case "$arg" in
		--collector.systemd | --collector.systemd=* | --no-collector.systemd) systemd= ;;
		--collector.filesystem.mount-points-* | --collector.filesystem.ignored-mount-points*) mounts= ;;
	esac
done
exec /usr/bin/prometheus-node-exporter ${systemd:+"$systemd"} ${mounts:+"$mounts"} "$@"
