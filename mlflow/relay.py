"""The S3 relay (entrypoint.py `forward`): a loopback port in the server's container relayed to
nginx's S3 port, so that one presigned URL (signed for localhost:S3_PORT) works from the host
and from the server (see entrypoint.s3_relay_target).

Its own module so that asyncio (some 60 ms to import) is loaded by the relay only, not by
every healthcheck the entrypoint answers.
"""

from __future__ import annotations

import asyncio
import random
import socket


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


# A relay target that takes longer than this to accept is taken to be gone.
RELAY_CONNECT_SECONDS = 2


async def _connect_any(host: str, port: int):
    """A connection to one of the name's addresses, in random order, each given
    RELAY_CONNECT_SECONDS: on a swarm the name resolves to nginx on every node,
    and one on a node that was lost stays listed for a while (no reset comes back)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    random.shuffle(infos)
    last: Exception = OSError(f"{host} has no address")
    for family, _type, _proto, _name, address in infos:
        try:
            return await asyncio.wait_for(asyncio.open_connection(address[0], address[1], family=family),
                                          RELAY_CONNECT_SECONDS)
        except (OSError, asyncio.TimeoutError) as exc:
            last = exc
    raise OSError(str(last))


async def _relay(listen_port: int, target_host: str, target_port: int) -> None:
    async def handle(client_r, client_w):
        try:
            up_r, up_w = await _connect_any(target_host, target_port)
        except OSError:
            client_w.close()
            return
        for w in (client_w, up_w):
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.gather(_pipe(client_r, up_w), _pipe(up_r, client_w))

    server = await asyncio.start_server(handle, "127.0.0.1", listen_port)
    async with server:
        await server.serve_forever()


def serve(listen_port: int, target_host: str, target_port: int) -> None:
    asyncio.run(_relay(listen_port, target_host, target_port))
