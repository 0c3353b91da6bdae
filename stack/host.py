"""The name colleagues reach this machine by: what a first deploy writes as
MLFLOW_PUBLIC_HOST when the user chose none, and the names and addresses the
local certificate holds besides it.

On many machines `hostname -f` is a name /etc/hosts maps to 127.0.0.1: printed
to clients, it works only on the machine itself. So the machine's fully
qualified name is taken only when it resolves to another address; else the
address of the default route (the one a colleague's packets come back from).
"""

from __future__ import annotations

import socket

from .common import resolves_to_loopback

# TEST-NET-3 (RFC 5737): connecting a UDP socket to it picks the default route's
# source address and sends nothing.
PROBE = ("203.0.113.1", 9)


def default_route_address() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(PROBE)
            address = sock.getsockname()[0]
    except OSError:
        return None
    return None if address in ("0.0.0.0", "") or resolves_to_loopback(address) else address


def fully_qualified_name() -> str:
    return socket.getfqdn(socket.gethostname())


def reachable_name() -> str | None:
    """The machine's name or address as colleagues reach it; None when it has none but loopback."""
    name = fully_qualified_name()
    if name and name != "localhost" and not resolves_to_loopback(name):
        try:
            socket.getaddrinfo(name, None)
            return name
        except socket.gaierror:
            pass
    return default_route_address()


def machine_names() -> list[str]:
    """Every name and address this machine answers to that a colleague may use."""
    names = [socket.gethostname(), fully_qualified_name(), default_route_address()]
    return [n for n in dict.fromkeys(names) if n and n != "localhost"]
