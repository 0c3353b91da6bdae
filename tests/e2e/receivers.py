"""Where the stack's Alertmanager sends alerts in the tests: a webhook receiver and a
real SMTP server (aiosmtpd), both on this machine, reached from the containers
through the address of Docker's default bridge (the host's side of it)."""

from __future__ import annotations

import email
import email.policy
import fcntl
import json
import secrets
import socket
import struct
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from pki import make_ca, make_server


def host_address() -> str:
    """This machine as containers on any bridge network reach it: the address of Docker's
    default bridge (the host's side), from its IPAM gateway or, where the engine leaves that
    field empty (seen on Debian's 20.10 on a fresh machine), from the bridge interface itself."""
    def inspect(template: str) -> str:
        return subprocess.run(["docker", "network", "inspect", "bridge", "--format", template],
                              capture_output=True, text=True, check=True).stdout.strip()

    for gateway in inspect("{{range .IPAM.Config}}{{.Gateway}} {{end}}").split():
        if "." in gateway:  # the IPv4 one (an IPv6 bridge lists its own too)
            return gateway
    name = inspect('{{index .Options "com.docker.network.bridge.name"}}') or "docker0"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:  # SIOCGIFADDR: the interface's IPv4 address
            answer = fcntl.ioctl(sock.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))
        except OSError as exc:
            raise AssertionError(f"no IPv4 address on Docker's bridge {name}: {exc}") from exc
    return socket.inet_ntoa(answer[20:24])


class Webhook:
    """Records every JSON body POSTed to its secret path; answers 500 while `failing` is set."""

    def __init__(self):
        self.token = secrets.token_urlsafe(16)
        self.messages: list[dict] = []
        self.failing = threading.Event()
        self.refused = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path != f"/hook/{outer.token}":
                    self.send_response(404)
                elif outer.failing.is_set():
                    outer.refused += 1
                    self.send_response(500)
                else:
                    outer.messages.append(json.loads(body))
                    self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("0.0.0.0", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, host: str) -> str:
        return f"http://{host}:{self.server.server_address[1]}/hook/{self.token}"

    def alerts(self, status: str, alertname: str, **labels: str) -> list[dict]:
        """Alerts of that name and labels in the messages whose status was `status`."""
        return [a for m in self.messages if m.get("status") == status for a in m.get("alerts", [])
                if a["labels"].get("alertname") == alertname
                and all(a["labels"].get(k) == v for k, v in labels.items())]

    def close(self):
        self.server.shutdown()


class Mailbox:
    """An SMTP server that takes mail only over STARTTLS and after a login, with a
    certificate for `host` issued by a CA of its own (ca.crt in `folder`: what
    ALERT_SMTP_CA_FILE names), and keeps each message."""

    def __init__(self, folder: Path, host: str):
        import ssl

        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import AuthResult

        make_ca(folder, "ca")
        cert, key = make_server(folder, "ca", names=f"IP:{host}")
        self.ca_file = folder / "ca.crt"
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(cert, key)

        self.username, self.password = "alerts", secrets.token_urlsafe(16)
        self.messages: list[email.message.EmailMessage] = []
        self.logins: list[str] = []
        outer = self

        class Handler:
            async def handle_DATA(self, server, session, envelope):
                outer.messages.append(email.message_from_bytes(envelope.content, policy=email.policy.default))
                return "250 OK"

        def authenticate(server, session, envelope, mechanism, auth_data):
            ok = (getattr(auth_data, "login", b"") == self.username.encode()
                  and getattr(auth_data, "password", b"") == self.password.encode())
            outer.logins.append(f"{mechanism}:{'ok' if ok else 'refused'}")
            return AuthResult(success=ok)

        with socket.socket() as probe:
            probe.bind(("0.0.0.0", 0))
            self.port = probe.getsockname()[1]
        self.controller = Controller(Handler(), hostname="0.0.0.0", port=self.port, authenticator=authenticate,
                                     auth_required=True, tls_context=tls, require_starttls=True,
                                     # aiosmtpd's LOGIN prompts ("User Name\0") are not the "Username:"
                                     # that mail servers send and Alertmanager expects: PLAIN only.
                                     auth_exclude_mechanism=["LOGIN"])
        self.controller.start()

    def subjects(self) -> list[str]:
        return [str(m["Subject"]) for m in self.messages]

    def close(self):
        self.controller.stop()
