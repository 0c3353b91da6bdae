"""Where a call cut by a server crash came from, and that it is closed: nginx (Debian's, on
this machine; .ci/run installs it) in front of two uvicorn servers, as the stack runs its
replicas. One of them answers a log-metric call with its headers at once and its body a
moment later, as a Flask answer can leave through a thread; it is killed in between.

Without the server's guard, nginx has already passed the headers on, so it can neither answer
502 nor send the call to the other server: the client's connection is cut and it gets no
answer (the e2e replica test saw this once in ~1,600 calls). Through the guard
(mlflow/stack_guard.py, whole_small_answers) the headers wait for the body, nginx sees the
server die before any answer and sends the call to the other one: the client gets a 200."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests

from stack.paths import ROOT

APP = '''
import asyncio, os, sys
sys.path.insert(0, os.path.join(os.environ["STACK_ROOT"], "mlflow"))
import stack_guard

async def raw(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"2")]})
    if os.environ.get("DIES_MIDWAY"):
        open(os.environ["DIES_MIDWAY"], "w").close()  # the call is here, its headers sent: kill me
        await asyncio.sleep(30)
    await send({"type": "http.response.body", "body": b"{}"})

app = stack_guard.Guard(raw, auth=False, max_body=1 << 20) if os.environ.get("GUARDED") else raw
'''

NGINX = '''
daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log info;
events {{}}
http {{
  access_log off;
  client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy; fastcgi_temp_path {tmp}/fcgi;
  uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
  upstream servers {{ server 127.0.0.1:{dying}; server 127.0.0.1:{healthy}; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      # As the stack's location for the writes that may be sent twice (nginx/templates).
      proxy_next_upstream error timeout non_idempotent;
      proxy_next_upstream_tries 2;
      proxy_pass http://servers;
    }}
  }}
}}
'''

CALL = "/api/2.0/mlflow/runs/log-metric"
METRIC = {"run_id": "r", "key": "loss", "value": 0.5, "timestamp": 1, "step": 0}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_listening(port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on {port}")


def call_while_a_server_dies(tmp_path, guarded: bool):
    """(status or None, error text) of one call sent to the server that dies midway."""
    (tmp_path / "app.py").write_text(APP)
    dying, healthy, port = free_port(), free_port(), free_port()
    environ = {**os.environ, "STACK_ROOT": str(ROOT), "PYTHONPATH": f"{ROOT}:{tmp_path}",
               **({"GUARDED": "1"} if guarded else {})}
    arrived = tmp_path / "arrived"
    servers = [subprocess.Popen([sys.executable, "-m", "uvicorn", "app:app", "--port", str(p), "--log-level",
                                 "warning"], cwd=tmp_path, env={**environ, **extra})
               for p, extra in ((dying, {"DIES_MIDWAY": str(arrived)}), (healthy, {}))]
    (tmp_path / "nginx.conf").write_text(NGINX.format(tmp=tmp_path, dying=dying, healthy=healthy, port=port))
    nginx = subprocess.Popen(["nginx", "-c", str(tmp_path / "nginx.conf")], stderr=subprocess.PIPE)
    try:
        for p in (dying, healthy, port):
            wait_listening(p)
        # nginx tries the servers in turn: the first call goes to the first, the dying one,
        # which is killed once the call has reached it.
        killer = subprocess.Popen(["bash", "-c", f"until [ -e {arrived} ]; do sleep 0.02; done; "
                                                 f"kill -9 {servers[0].pid}"])
        try:
            answer = requests.post(f"http://127.0.0.1:{port}{CALL}", json=METRIC, timeout=20)
            seen = answer.status_code, answer.text
        except requests.RequestException as exc:
            seen = None, f"{type(exc).__name__}: {exc}"
        finally:
            killer.wait(timeout=10)
        assert arrived.exists(), "the call never reached the server that dies"
        return seen, (tmp_path / "error.log").read_text()
    finally:
        nginx.send_signal(signal.SIGQUIT)
        nginx.wait(timeout=10)
        for server in servers:
            server.kill()
            server.wait(timeout=10)


@pytest.fixture(autouse=True)
def need_nginx():
    assert shutil.which("nginx"), "nginx is not installed: .ci/run installs Debian's (apt-get install nginx-light)"


def test_without_the_guard_the_client_is_cut_off(tmp_path):
    (status, text), log = call_while_a_server_dies(tmp_path, guarded=False)
    assert status is None and ("IncompleteRead" in text or "aborted" in text), (status, text)
    # nginx had the headers (and had passed them on) when the server died.
    assert "upstream prematurely closed connection while reading upstream" in log, log[-2000:]


def test_through_the_guard_the_call_goes_to_the_other_server(tmp_path):
    seen, log = call_while_a_server_dies(tmp_path, guarded=True)
    assert seen == (200, "{}")
    # The server died before any of its answer reached nginx, which sent the call on.
    assert "upstream prematurely closed connection while reading response header" in log, log[-2000:]
