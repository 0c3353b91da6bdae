#!/bin/sh
# REGISTRY_FORWARD=PORT:HOST:HOSTPORT makes the test registry this node's
# 127.0.0.1:PORT, the address the stack's images are named by (a registry on
# every node's loopback, as Docker's swarm tutorial has it; a loopback
# registry needs no TLS).
set -eu
if [ -n "${REGISTRY_FORWARD:-}" ]; then
	port="${REGISTRY_FORWARD%%:*}" target="${REGISTRY_FORWARD#*:}"
	socat "TCP-LISTEN:$port,bind=127.0.0.1,fork,reuseaddr" "TCP:$target" &
fi
# A node stopped and started again (the test's lost node) keeps /var/run: its old
# pid files would stop dockerd from starting.
rm -f /var/run/docker.pid /var/run/docker/containerd/containerd.pid
exec dockerd --host unix:///var/run/docker.sock "$@"
