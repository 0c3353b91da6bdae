"""The server's input checks (mlflow/stack_guard.py), without a server."""

import asyncio
import base64
import importlib.util
import json
import os
import sys

import pytest

from stack.paths import ROOT

# The image's other modules (stack_logins, entrypoint), as the image has them on its path.
sys.path.insert(0, str(ROOT / "mlflow"))

_spec = importlib.util.spec_from_file_location("stack_guard", ROOT / "mlflow" / "stack_guard.py")
guard = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(guard)

BATCH = "/api/2.0/mlflow/runs/log-batch"
JSON = "application/json"


def metric(value=1.0, ts=1, step=0, key="loss"):
    return {"key": key, "value": value, "timestamp": ts, "step": step}


def body(**kw):
    return json.dumps({"run_id": "r", **kw}).encode()


@pytest.mark.parametrize("payload", [
    body(metrics=[metric(), metric(value="NaN"), metric(value=3, ts="1700000000000", step="-2")]),
    body(params=[{"key": "p", "value": "x" * 6000}], tags=[{"key": "t", "value": "y" * 8000}]),
    body(metrics=[metric(step=i) for i in range(1000)]),
])
def test_good_batches_pass(payload):
    guard.validate(BATCH, JSON, payload)


@pytest.mark.parametrize("payload, status, fragment", [
    (b'{"run_id": "r", "metrics": [', 400, "malformed JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (body(metrics=[metric(value="abc")]), 400, "must be a number"),
    (body(metrics=[metric(value=True)]), 400, "must be a number"),
    (body(metrics=[metric(ts=-5)]), 400, "must be >= 0"),
    (body(metrics=[{"key": "m", "value": 1}]), 400, "no timestamp"),
    (body(metrics=[metric(step="one")]), 400, "must be an integer"),
    (body(metrics=[metric(step=i) for i in range(1001)]), 400, "at most 1000 metrics"),
    (body(params=[{"key": f"p{i}", "value": "v"} for i in range(101)]), 400, "at most 100 params"),
    (body(params=[{"key": "p", "value": "x" * 6001}]), 400, "refused rather than truncated"),
    (body(tags=[{"key": "t", "value": "x" * 8001}]), 400, "limit is 8000"),
    (body(metrics=[metric(key="")]), 400, "non-empty"),
    (body(metrics="lots"), 400, "must be a list"),
])
def test_bad_batches_are_refused(payload, status, fragment):
    with pytest.raises(guard.Invalid) as info:
        guard.validate(BATCH, JSON, payload)
    assert info.value.status == status and fragment in str(info.value)


def test_single_writes_are_checked_too():
    with pytest.raises(guard.Invalid, match="must be a number"):
        guard.validate("/ajax-api/2.0/mlflow/runs/log-metric", JSON, body(**metric(value="abc")))
    with pytest.raises(guard.Invalid, match="6001 characters"):
        guard.validate("/api/2.0/mlflow/runs/log-parameter", JSON, body(key="p", value="x" * 6001))


def test_wrong_content_type_on_a_checked_endpoint_is_415():
    with pytest.raises(guard.Invalid) as info:
        guard.validate(BATCH, "text/plain", body(metrics=[metric()]))
    assert info.value.status == 415


def test_other_endpoints_only_need_well_formed_json():
    guard.validate("/api/2.0/mlflow/experiments/create", JSON, b'{"name": "x"}')
    guard.validate("/api/2.0/mlflow-artifacts/artifacts/x", "application/octet-stream", b"\x00\x01")
    with pytest.raises(guard.Invalid, match="malformed"):
        guard.validate("/api/2.0/mlflow/experiments/create", JSON, b"{nope")


def _call(app, path, payload, headers=None, method="POST"):
    """headers: a dict, or a list of (name, value) pairs (a name may come twice)."""
    sent = []
    messages = [{"type": "http.request", "body": payload[:5], "more_body": True},
                {"type": "http.request", "body": payload[5:], "more_body": False}]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    pairs = headers.items() if isinstance(headers, dict) else headers or []
    scope = {"type": "http", "method": method, "path": path,
             "headers": [(k.encode(), v.encode()) for k, v in pairs]}
    asyncio.run(app(scope, receive, send))
    return sent


def test_middleware_answers_mlflow_style_errors_and_replays_good_bodies():
    seen = []

    async def inner(scope, receive, send):
        data, more = b"", True
        while more:
            message = await receive()
            data, more = data + message.get("body", b""), message.get("more_body", False)
        seen.append(data)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    app = guard.Guard(inner, auth=True, max_body=64 << 20)
    auth = {"authorization": "Basic eDp5", "content-type": JSON}
    good = body(metrics=[metric()])
    assert _call(app, BATCH, good, auth)[0]["status"] == 200
    assert seen == [good]
    bad = _call(app, BATCH, body(metrics=[metric(value="abc")]), auth)
    assert bad[0]["status"] == 400
    assert json.loads(bad[1]["body"])["error_code"] == "INVALID_PARAMETER_VALUE"
    assert len(seen) == 1, "a refused request reached MLflow"
    # Without credentials the auth layer answers first (401), whatever the body.
    _call(app, BATCH, b"{broken", {"content-type": JSON})
    assert seen[-1] == b"{broken"


@pytest.mark.parametrize("location", ["file:///etc", "/etc", "s3://other-bucket/x", "s3://mlflow/artifacts/../../etc",
                                      "mlflow-artifacts:/%2e%2e/%2e%2e/x", "mlflow-artifacts:/%252e%252e/x",
                                      "mlflow-artifacts:/x#frag", "http://169.254.169.254/latest"])
def test_artifact_locations_outside_the_store_are_refused(location, monkeypatch):
    monkeypatch.setenv("MLFLOW_BUCKET", "mlflow")
    with pytest.raises(guard.Invalid):
        guard.validate("/api/2.0/mlflow/experiments/create", JSON, json.dumps({"name": "e", "artifact_location": location}).encode())


@pytest.mark.parametrize("location", ["", "mlflow-artifacts:/team-a", "s3://mlflow/artifacts/team-a"])
def test_artifact_locations_inside_the_store_pass(location, monkeypatch):
    monkeypatch.setenv("MLFLOW_BUCKET", "mlflow")
    guard.validate("/api/2.0/mlflow/experiments/create", JSON, json.dumps({"name": "e", "artifact_location": location}).encode())


def test_checks_follow_the_base_path():
    """Under MLFLOW_BASE_PATH the same writes are checked; nothing is skipped silently."""
    async def inner(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    app = guard.Guard(inner, auth=False, max_body=64 << 20, base_path="/mlflow")
    bad = body(metrics=[metric(value="abc")])
    for path, status in (("/mlflow" + BATCH, 400), ("/mlflow/ajax-api/2.0/mlflow/runs/log-batch", 400),
                         (BATCH, 200)):  # outside the prefix: MLflow itself answers 404
        assert _call(app, path, bad, {"content-type": JSON})[0]["status"] == status, path


@pytest.mark.parametrize("method,path,reaches", [
    ("PUT", "/mlflow/api/2.0/mlflow-artifacts/artifacts/1/r/artifacts/big.bin", "/api/2.0/mlflow-artifacts/artifacts/1/r/artifacts/big.bin"),
    ("GET", "/mlflow/ajax-api/2.0/mlflow-artifacts/artifacts/1/r/a%20b.txt", "/ajax-api/2.0/mlflow-artifacts/artifacts/1/r/a%20b.txt"),
    # Routes MLflow serves under the prefix itself keep it.
    ("DELETE", "/mlflow/api/2.0/mlflow-artifacts/artifacts/1/r/x", "/mlflow/api/2.0/mlflow-artifacts/artifacts/1/r/x"),
    ("GET", "/mlflow/api/2.0/mlflow-artifacts/artifacts", "/mlflow/api/2.0/mlflow-artifacts/artifacts"),
    ("POST", "/mlflow/api/2.0/mlflow-artifacts/mpu/create/1/r/x", "/mlflow/api/2.0/mlflow-artifacts/mpu/create/1/r/x"),
])
def test_artifact_streams_reach_mlflows_streaming_route_under_the_base_path(method, path, reaches):
    """Under a prefix, artifact GET/PUT go to MLflow's streaming route (mounted at the
    root), not to the prefixed Flask twin that buffers a whole upload in memory."""
    seen = []

    async def inner(scope, receive, send):
        seen.append((scope["path"], scope["raw_path"]))
        await send({"type": "http.response.start", "status": 200, "headers": []})

    app = guard.Guard(inner, auth=False, max_body=64 << 20, base_path="/mlflow")
    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    decoded = path.replace("%20", " ")
    scope = {"type": "http", "method": method, "path": decoded, "raw_path": path.encode(), "headers": []}
    asyncio.run(app(scope, receive, send))
    assert seen == [(reaches.replace("%20", " "), reaches.encode())]


def _admin_check(app, header=None, path="/_stack/admin"):
    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    headers = [(b"authorization", header.encode())] if header else []
    asyncio.run(app({"type": "http", "method": "GET", "path": path, "headers": headers}, receive, send))
    return sent[0]["status"], dict(sent[0]["headers"])


def test_admin_check_answers_nginx_for_admins_users_and_strangers(monkeypatch):
    """The auth_request behind the admin-only pages: MLflow's own login check decides."""
    import base64

    from mlflow.server import auth

    logins = {("root", "pw-root"): True, ("ann", "pw-ann"): False}
    monkeypatch.setattr(auth, "_authenticate_cached", lambda u, p: (
        type("User", (), {"is_admin": logins[(u, p)]})() if (u, p) in logins else None))

    async def inner(scope, receive, send):  # MLflow's routes are never reached
        raise AssertionError("reached MLflow")

    app = guard.Guard(inner, auth=True, max_body=1 << 20, base_path="/mlflow")
    basic = lambda u, p: "Basic " + base64.b64encode(f"{u}:{p}".encode()).decode()  # noqa: E731
    assert _admin_check(app, basic("root", "pw-root"), "/mlflow/_stack/admin")[0] == 204
    assert _admin_check(app, basic("ann", "pw-ann"), "/mlflow/_stack/admin")[0] == 403
    status, headers = _admin_check(app, basic("root", "wrong"), "/mlflow/_stack/admin")
    assert status == 401 and headers[b"www-authenticate"].startswith(b"Basic")
    assert _admin_check(app, None, "/mlflow/_stack/admin")[0] == 401
    assert _admin_check(app, "Basic !!!", "/mlflow/_stack/admin")[0] == 401
    assert _admin_check(app, "Basic " + base64.b64encode(b"no-colon").decode(), "/mlflow/_stack/admin")[0] == 401
    # Without authentication the whole stack is open (the deploy warns); so is this.
    assert _admin_check(guard.Guard(inner, auth=False, max_body=1 << 20), None)[0] == 204


def test_an_expired_login_is_checked_once_while_concurrent_requests_wait(monkeypatch):
    """MLflow's own login cache, with a store that counts password checks: 16
    requests with an expired login make one check, not 16, and 8 at once with
    the same wrong password share one answer too. Other logins are not held up
    meanwhile, and a wrong password tried again later is checked again."""
    import threading
    import time

    from cachetools import TTLCache
    from mlflow.server import auth

    checks, started, user_b_in, release_c = [], threading.Barrier(16), threading.Event(), threading.Event()

    class Store:
        def authenticate_user(self, username, password):
            checks.append(username)
            if username == "a":
                # While a's password is being checked, b's check still runs.
                assert user_b_in.wait(5), "another login waited for this one"
            if username == "b":
                user_b_in.set()
            if username == "c":
                release_c.wait(5)
            return password == "right"

        def get_user(self, username):
            return type("User", (), {"username": username, "is_admin": False})()

    monkeypatch.setattr(auth, "store", Store())
    monkeypatch.setattr(auth, "_USER_AUTH_CACHE", TTLCache(maxsize=100, ttl=600))
    monkeypatch.setattr(auth, "_authenticate_cached", auth._authenticate_cached)
    guard.single_flight_logins()
    guard.single_flight_logins()  # a second app in the same process wraps nothing twice
    results = {}

    def login(i, username, password, barrier=None):
        if barrier:
            barrier.wait(5)
        results[i] = auth._authenticate_cached(username, password)

    def run(threads):
        for t in threads:
            t.start()
        return threads

    threads = run([threading.Thread(target=login, args=(i, "a", "right", started)) for i in range(16)]
                  + [threading.Thread(target=login, args=(16, "b", "right"))])
    for t in threads:
        t.join(10)
    assert sorted(results) == list(range(17))
    assert all(results[i].username == "a" for i in range(16)) and results[16].username == "b"
    assert checks.count("a") == 1 and checks.count("b") == 1

    wrong = threading.Barrier(8)
    threads = run([threading.Thread(target=login, args=(100 + i, "c", "wrong", wrong)) for i in range(8)])
    time.sleep(1)  # the 8 meet the first one's check, which waits for this
    release_c.set()
    for t in threads:
        t.join(10)
    assert [results[100 + i] for i in range(8)] == [None] * 8
    assert checks.count("c") <= 2  # 8 without the shared answer, one after another

    for i in range(3):
        assert auth._authenticate_cached("a", "wrong") is None
    assert checks.count("a") == 1 + 3


def test_the_admin_flag_comes_from_the_login_cache(monkeypatch):
    """MLflow's Flask routes ask whether the caller is an admin: answered from the
    login just checked, without a query; a change takes effect once the login
    cache forgets the login (MLflow does that at once in the worker that made it)."""
    from cachetools import TTLCache
    from mlflow.server import auth

    admin = {"root": True}
    queries = []

    class Store:
        def authenticate_user(self, username, password):
            return password == "right"

        def get_user(self, username):
            queries.append(username)
            return type("User", (), {"username": username, "is_admin": admin[username]})()

    login = type("Login", (), {"username": "root", "password": "right"})()
    monkeypatch.setattr(auth, "store", Store())
    monkeypatch.setattr(auth, "_USER_AUTH_CACHE", TTLCache(maxsize=100, ttl=600))
    monkeypatch.setattr(auth, "authenticate_request", lambda: login)
    monkeypatch.setattr(auth, "sender_is_admin", auth.sender_is_admin)
    guard.admin_flag_from_login_cache()
    guard.admin_flag_from_login_cache()
    assert auth._authenticate_cached("root", "right").is_admin  # the request's own login check
    queries.clear()
    assert [auth.sender_is_admin() for _ in range(5)] == [True] * 5
    assert queries == []
    admin["root"] = False
    auth._invalidate_user_auth_cache("root")
    assert auth.sender_is_admin() is False


def test_connections_accepted_on_a_socket_made_as_uvicorns_workers_make_it_get_tcp_nodelay(monkeypatch):
    """uvicorn with several workers listens on socket.socket(AF_INET) (proto 0):
    asyncio's own rule leaves TCP_NODELAY off there; the server's turns it on."""
    import asyncio
    import asyncio.base_events
    import socket

    def nodelay_of_an_accepted_connection() -> int:
        async def main():
            listener = socket.socket(socket.AF_INET)
            listener.bind(("127.0.0.1", 0))
            accepted = asyncio.get_running_loop().create_future()

            class Server(asyncio.Protocol):
                def connection_made(self, transport):
                    accepted.set_result(transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP,
                                                                                       socket.TCP_NODELAY))
                    transport.close()

            server = await asyncio.get_running_loop().create_server(Server, sock=listener)
            _, writer = await asyncio.open_connection(*listener.getsockname())
            try:
                return await asyncio.wait_for(accepted, 5)
            finally:
                writer.close()
                server.close()
        return asyncio.run(main())

    monkeypatch.setattr(asyncio.base_events, "_set_nodelay", asyncio.base_events._set_nodelay)
    assert nodelay_of_an_accepted_connection() == 0  # asyncio's own rule: the stall
    guard.tcp_nodelay_on_accepted_connections()
    guard.tcp_nodelay_on_accepted_connections()
    assert nodelay_of_an_accepted_connection() != 0


UPLOAD = "/api/2.0/mlflow-artifacts/artifacts/1/abc/artifacts/model.bin"


def _server_error_then_raise(exc):
    """MLflow's app as Starlette runs it: an uncaught error is answered with a
    bare 500 (ServerErrorMiddleware), then raised on to the server."""
    async def inner(scope, receive, send):
        await send({"type": "http.response.start", "status": 500, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"Internal Server Error"})
        raise exc
    return inner


def _full_store_error():
    try:
        try:
            raise RuntimeError("An error occurred (XMinioStorageFull) when calling the UploadPart operation: "
                               "Storage backend has reached its minimum free drive threshold.")
        except RuntimeError as inner:
            raise ValueError("Failed to upload /tmp/x/model.bin to mlflow/artifacts/1/abc/model.bin") from inner
    except ValueError as exc:
        return exc


@pytest.mark.parametrize("base_path", ["", "/mlflow"])
def test_a_full_store_answers_507_with_the_reason(base_path, capsys):
    app = guard.Guard(_server_error_then_raise(_full_store_error()), auth=False, max_body=1 << 20,
                      base_path=base_path)
    sent = _call(app, base_path + UPLOAD, b"0123456789", method="PUT")
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 507
    error = json.loads(sent[1]["body"])
    assert error["error_code"] == "RESOURCE_EXHAUSTED"
    assert "artifact store is full" in error["message"] and "Nothing was stored" in error["message"]
    assert "refused with 507" in capsys.readouterr().err


def test_a_full_server_disk_answers_507_too():
    app = guard.Guard(_server_error_then_raise(OSError(28, "No space left on device")), auth=False, max_body=1 << 20)
    sent = _call(app, UPLOAD, b"x", method="PUT")
    assert sent[0]["status"] == 507 and "server's disk is full" in json.loads(sent[1]["body"])["message"]


def _upload_raising(inner, exc_type):
    """A PUT to the streamed artifact route whose app raises exc_type; what was sent before."""
    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"x", "more_body": False}

    with pytest.raises(exc_type):
        asyncio.run(guard.Guard(inner, auth=False, max_body=1 << 20)(
            {"type": "http", "method": "PUT", "path": UPLOAD, "headers": []}, receive, send))
    return sent


def test_other_upload_failures_pass_unchanged():
    sent = _upload_raising(_server_error_then_raise(RuntimeError("boom")), RuntimeError)
    assert sent[0]["status"] == 500 and sent[1]["body"] == b"Internal Server Error"

    # A handled error's body is read too (MLflow's own JSON 5xx), and passed on when it is not about space.
    async def json_500(scope, receive, send):
        await send({"type": "http.response.start", "status": 503, "headers": []})
        await send({"type": "http.response.body", "body": b'{"message": "Artifact serving is disabled"}'})

    sent = _call(guard.Guard(json_500, auth=False, max_body=1 << 20), UPLOAD, b"x", method="PUT")
    assert sent[0]["status"] == 503 and b"disabled" in sent[1]["body"]


def test_a_successful_upload_streams_through():
    async def ok(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    sent = _call(guard.Guard(ok, auth=False, max_body=1 << 20), UPLOAD, b"x", method="PUT")
    assert sent[0]["status"] == 200


def test_a_handled_5xx_that_names_a_full_store_becomes_507():
    async def handled(scope, receive, send):
        await send({"type": "http.response.start", "status": 500, "headers": []})
        await send({"type": "http.response.body", "body": b'{"message": "An error occurred (XMinioStorageFull)"}'})

    sent = _call(guard.Guard(handled, auth=False, max_body=1 << 20), UPLOAD, b"x", method="PUT")
    assert sent[0]["status"] == 507 and "artifact store is full" in json.loads(sent[1]["body"])["message"]


def test_an_error_after_a_200_began_is_raised_not_rewritten():
    async def late(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise _full_store_error()

    assert [m.get("status") for m in _upload_raising(late, ValueError)] == [200]


@pytest.fixture
def artifact_routes(monkeypatch):
    """MLflow's artifact download routes, restored after the test."""
    from mlflow.server import artifact_router

    routes = [r for r in artifact_router.artifact_router.routes if "GET" in getattr(r, "methods", ())]
    for route in routes:
        monkeypatch.setattr(route, "endpoint", route.endpoint)
    return routes


def test_downloads_stay_mlflows_when_the_store_is_outside_the_stack(artifact_routes):
    before = [r.endpoint for r in artifact_routes]
    guard.artifact_downloads_by_nginx({"S3_INTERNAL_ENDPOINT": "https://s3.example.com",
                                       "S3_ENDPOINT_URL": "https://s3.example.com"})
    assert [r.endpoint for r in artifact_routes] == before


class _Request:
    def __init__(self, headers):
        self.headers = headers


def test_downloads_of_the_own_store_are_handed_to_nginx(artifact_routes, monkeypatch):
    originals = [r.endpoint for r in artifact_routes]
    assert {f.__name__ for f in originals} == {"download_artifact"}
    signed = ("/mlflow/artifacts/1/run/artifacts/model.pkl", "AWS4-HMAC-SHA256 Credential=k/...", "20261127T000000Z",
              "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
    located = {"1/run/artifacts/model.pkl": ("model.pkl", signed)}
    monkeypatch.setattr(guard.NginxFetch, "locate", lambda self, path: located.get(path))
    fallback = []

    async def mlflows(artifact_path):
        fallback.append(artifact_path)
        return "mlflow's answer"

    from mlflow.server import artifact_router

    monkeypatch.setattr(artifact_router, "download_artifact", mlflows)
    for route in artifact_routes:
        monkeypatch.setattr(route, "endpoint", mlflows)
    env = {"S3_INTERNAL_ENDPOINT": "http://minio:9000", "S3_ENDPOINT_URL": ""}
    guard.artifact_downloads_by_nginx(env)
    guard.artifact_downloads_by_nginx(env)  # a second app in the process: replaced once
    endpoint = artifact_routes[0].endpoint
    assert endpoint is not mlflows and endpoint.replaced_by_stack
    assert all(r.endpoint is endpoint for r in artifact_routes) and len(artifact_routes) == 2

    nginx = _Request({})

    def as_nginx(call):
        async def run():
            guard.FROM_NGINX_REQUEST.set(True)  # as the guard sets it for a request with nginx's token
            return await call
        return asyncio.run(run())

    answer = as_nginx(endpoint("1/run/artifacts/model.pkl", nginx))
    assert answer.status_code == 200 and answer.body == b""
    assert answer.headers["x-accel-redirect"] == guard.NGINX_FETCH == "/_stack/s3-fetch"
    assert [answer.headers[h] for h in guard.FETCH_HEADERS] == list(signed)
    assert answer.headers["content-disposition"] == "attachment; filename=model.pkl"
    # Not an object in the store (missing, a folder, another store): MLflow answers.
    assert as_nginx(endpoint("1/run/artifacts/folder", nginx)) == "mlflow's answer"
    # Nor does a caller that is not nginx get an answer meant for nginx (an empty body).
    assert asyncio.run(endpoint("1/run/artifacts/model.pkl", _Request({}))) == "mlflow's answer"
    assert fallback == ["1/run/artifacts/folder", "1/run/artifacts/model.pkl"]
    # Through FastAPI, as MLflow's app includes the router: the path and the request resolve.
    from fastapi import FastAPI

    api = FastAPI()
    api.include_router(artifact_router.artifact_router)
    # Through the guard, which admits nginx's token and takes it off the request.
    app = guard.Guard(api, auth=False, max_body=1 << 20, nginx_token="t0ken-of-nginx-xyz")

    def get(path, headers=(), client=("nginx", 1)):
        sent = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": path, "raw_path": path.encode(), "query_string": b"",
                 "headers": [(k.lower().encode(), v.encode()) for k, v in headers], "scheme": "http",
                 "server": ("mlflow", 5000), "client": client, "root_path": "", "http_version": "1.1"}
        asyncio.run(app(scope, receive, send))
        return sent[0]["status"], dict((k.decode(), v.decode()) for k, v in sent[0]["headers"]), sent[1]["body"]

    url = "/api/2.0/mlflow-artifacts/artifacts/1/run/artifacts/model.pkl"
    for path in (url, url.replace("/api/", "/ajax-api/")):
        status, headers, _ = get(path, [(guard.FROM_NGINX, "t0ken-of-nginx-xyz")])
        assert (status, headers.get("x-accel-redirect")) == (200, guard.NGINX_FETCH), (path, status, headers)
    assert get(url)[0] == 403  # not nginx: not answered at all
    # The container's own loopback is answered, by MLflow (no answer meant for nginx).
    assert get(url, client=("127.0.0.1", 1))[2] == b'"mlflow\'s answer"'
    assert get(url, [(guard.FROM_NGINX, "forged")], client=("127.0.0.1", 1))[2] == b'"mlflow\'s answer"'
    # nginx's location has the same name, reads the same headers and sets the marker.
    template = (ROOT / "nginx/templates/mlflow.conf.template").read_text()
    assert f"location = {guard.NGINX_FETCH} {{" in template
    for header in guard.FETCH_HEADERS:
        assert f"$upstream_http_{header.lower().replace('-', '_')};" in template, header
    assert f"proxy_set_header {guard.FROM_NGINX} $stack_nginx_token;" in template


def test_nginx_fetches_exactly_the_object_with_a_valid_signature(monkeypatch):
    """The key is MLflow's (destination prefix + path), missing objects fall back, and
    the signature is SigV4 over the path nginx sends (recomputed here independently)."""
    import hashlib
    import hmac

    from botocore.stub import Stubber
    from mlflow.server import artifact_router
    from mlflow.store.artifact.s3_artifact_repo import S3ArtifactRepository

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "stack-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "stack-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    repo = S3ArtifactRepository("s3://mlflow/artifacts")
    monkeypatch.setattr(artifact_router, "_is_serving_proxied_artifacts", lambda: True)
    monkeypatch.setattr(artifact_router, "_get_artifact_repo", lambda: repo)
    monkeypatch.setattr(artifact_router, "_get_workspace_scoped_path", lambda path: path)
    fetch = guard.NginxFetch("http://minio:9000/")
    with Stubber(fetch.client()) as stub:
        stub.add_response("head_object", {}, {"Bucket": "mlflow", "Key": "artifacts/1/r/artifacts/a b+c=ï%~.bin"})
        stub.add_client_error("head_object", "404", http_status_code=404)
        name, (path, authorization, date, digest) = fetch.locate("1/r/artifacts/a b+c=ï%~.bin")
        assert fetch.locate("1/r/artifacts/folder") is None
    # The store's canonical form (AWS and MinIO alike): UTF-8 bytes and all but A-Za-z0-9-._~/ escaped.
    assert name == "a b+c=ï%~.bin" and path == "/mlflow/artifacts/1/r/artifacts/a%20b%2Bc%3D%C3%AF%25~.bin"
    assert authorization.startswith(f"AWS4-HMAC-SHA256 Credential=stack-key/{date[:8]}/eu-west-3/s3/aws4_request, "
                                    "SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature=")

    assert digest == hashlib.sha256(b"").hexdigest()  # a GET's empty body
    canonical = "\n".join(["GET", path, "", "host:minio:9000", f"x-amz-content-sha256:{digest}",
                            f"x-amz-date:{date}", "", "host;x-amz-content-sha256;x-amz-date", digest])
    scope = f"{date[:8]}/eu-west-3/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = b"AWS4stack-secret"
    for part in (date[:8], "eu-west-3", "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    assert authorization.endswith("Signature=" + hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest())
    # A path MLflow refuses keeps MLflow's answer, without asking the store.
    monkeypatch.setattr(fetch, "client", lambda: pytest.fail("the store was asked about a refused path"))
    assert fetch.locate("../../etc/passwd") is None


# Run in a process of its own: MLflow puts its host and origin checks on its
# Flask app only when mlflow.server is first imported in a server process
# (here: with the store set in the environment, as `mlflow server` sets it).
_DIRECT_SCRIPT = r'''
import asyncio, importlib.util, json, os, sys, tempfile
work = tempfile.mkdtemp()
os.environ["_MLFLOW_SERVER_FILE_STORE"] = f"sqlite:///{work}/mlflow.db"
os.environ["_MLFLOW_SERVER_ARTIFACT_ROOT"] = f"{work}/artifacts"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
spec = importlib.util.spec_from_file_location("stack_guard", sys.argv[1])
guard = importlib.util.module_from_spec(spec)
spec.loader.exec_module(guard)
from mlflow.server.fastapi_app import create_fastapi_app

class Counting:
    """MLflow's whole app, counting the calls that reach it."""
    def __init__(self, app):
        self.app, self.routes, self.calls = app, app.routes, 0
    async def __call__(self, scope, receive, send):
        self.calls += 1
        await self.app(scope, receive, send)

full = Counting(create_fastapi_app())
direct = guard.FlaskCallsDirect(full)

def call(app, method, path, payload=None, **headers):
    path, _, query = path.partition("?")
    body = json.dumps(payload).encode() if payload is not None else b""
    headers = {"host": "localhost:5000", "content-type": "application/json",
               "content-length": str(len(body)), **headers}
    scope = {"type": "http", "http_version": "1.1", "method": method, "scheme": "http", "path": path,
             "raw_path": path.encode(), "root_path": "", "query_string": query.encode(),
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
             "server": ("localhost", 5000), "client": ("127.0.0.1", 40000)}
    sent, messages = [], [{"type": "http.request", "body": body, "more_body": False}]
    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}
    async def send(message):
        sent.append(message)
    before = full.calls
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    data = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return {"status": start["status"], "body": data.decode(), "via_fastapi": full.calls > before,
            "headers": sorted(k.decode().lower() for k, _ in start["headers"])}

out = {"flask_found": direct.flask is not None}
exp = json.loads(call(full, "POST", "/api/2.0/mlflow/experiments/create", {"name": "e"})["body"])["experiment_id"]
run = json.loads(call(direct, "POST", "/api/2.0/mlflow/runs/create",
                      {"experiment_id": exp, "start_time": 1})["body"])["run"]["info"]["run_id"]
point = {"run_id": run, "key": "loss", "value": 0.5, "timestamp": 7, "step": 3}
out["log_metric"] = call(direct, "POST", "/api/2.0/mlflow/runs/log-metric", point)
history = f"/api/2.0/mlflow/metrics/get-history?run_id={run}&metric_key=loss"
out["history"] = [call(app, "GET", history) for app in (full, direct)]
for name, headers in {"forged_host": {"host": "evil.example.com"},
                      "cross_origin": {"origin": "https://evil.example.com"}}.items():
    out[name] = [call(app, "POST", "/api/2.0/mlflow/runs/log-metric", dict(point, value=9.0), **headers)
                 for app in (full, direct)]
out["after_refusals"] = call(direct, "GET", history)
out["missing"] = [call(app, "POST", "/api/2.0/mlflow/runs/no-such-call", {}) for app in (full, direct)]
out["native"] = call(direct, "POST", "/v1/traces", {})
out["preflight"] = call(direct, "OPTIONS", "/api/2.0/mlflow/runs/log-metric",
                        origin="http://localhost:3000", **{"access-control-request-method": "POST"})
print(json.dumps(out))
'''


def test_calls_flask_serves_skip_fastapis_layer_and_get_the_same_answers_and_checks(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _DIRECT_SCRIPT, str(ROOT / "mlflow" / "stack_guard.py")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["flask_found"]
    assert out["log_metric"]["status"] == 200 and not out["log_metric"]["via_fastapi"]
    via_fastapi, direct = out["history"]
    assert via_fastapi["via_fastapi"] and not direct["via_fastapi"]
    # The same headers, but Vary: FastAPI's CORS layer sends "Vary: Origin" on a call without an
    # Origin too; Flask's does so once origins are configured (the stack configures its UI's).
    assert set(direct["headers"]) - {"vary"} == set(via_fastapi["headers"]) - {"vary"}
    assert json.loads(direct["body"]) == json.loads(via_fastapi["body"]) == {"metrics": [
        {"key": "loss", "value": 0.5, "timestamp": 7, "step": 3}]}
    # Flask's own checks refuse what FastAPI's refuse, and nothing is written.
    for name, message in (("forged_host", "Invalid Host header"), ("cross_origin", "Cross-origin request blocked")):
        via_fastapi, direct = out[name]
        assert (via_fastapi["status"], direct["status"]) == (403, 403), name
        assert message in via_fastapi["body"] and message in direct["body"], name
        assert not direct["via_fastapi"], name
        assert "x-content-type-options" in direct["headers"], name
    assert json.loads(out["after_refusals"]["body"])["metrics"] == [
        {"key": "loss", "value": 0.5, "timestamp": 7, "step": 3}]
    assert [m["status"] for m in out["missing"]] == [404, 404]
    # FastAPI's own routes and CORS preflights still take MLflow's way.
    assert out["native"]["via_fastapi"] and out["preflight"]["via_fastapi"]


def test_without_flasks_own_checks_every_call_takes_mlflows_way(monkeypatch):
    from mlflow.server import app as flask_app
    from mlflow.server.fastapi_app import _EfficientWSGIMiddleware
    from starlette.routing import Mount

    class App:
        routes = [Mount("/", _EfficientWSGIMiddleware(flask_app))]

    def add_security_headers(response):
        return response

    # Here (no server process) MLflow has not put its checks on Flask; a server has.
    monkeypatch.setitem(flask_app.after_request_funcs, None,
                        [f for f in flask_app.after_request_funcs.get(None, []) if f.__name__ != "add_security_headers"])
    assert guard.FlaskCallsDirect(App()).flask is None
    monkeypatch.setitem(flask_app.after_request_funcs, None, [add_security_headers])
    assert guard.FlaskCallsDirect(App()).flask is App.routes[0]


def test_the_routes_remembered_stay_bounded(monkeypatch):
    from mlflow.server import app as flask_app
    from mlflow.server.fastapi_app import _EfficientWSGIMiddleware
    from starlette.routing import Mount

    def add_security_headers(response):
        return response

    monkeypatch.setitem(flask_app.after_request_funcs, None, [add_security_headers])

    class App:
        routes = [Mount("/", _EfficientWSGIMiddleware(flask_app))]

    direct = guard.FlaskCallsDirect(App())
    monkeypatch.setattr(direct, "MAX_REMEMBERED", 3)
    for i in range(5):
        app, _scope = direct.route({"type": "http", "method": "GET", "path": f"/api/2.0/mlflow/x/{i}",
                                    "root_path": ""})
        assert app is App.routes[0].app
    assert [key[1] for key in direct._reaches_flask] == [f"/api/2.0/mlflow/x/{i}" for i in (2, 3, 4)]


def _metric_cases():
    plain = [{"key": "loss", "value": 0.5, "timestamp": 1700000000000, "step": 3},
             {"key": "acc", "value": 1, "timestamp": 0},
             {"key": "nan", "value": "NaN", "timestamp": 5, "step": -2},
             {"key": "inf", "value": "Infinity", "timestamp": 5, "step": 1},
             {"key": "-inf", "value": "-Infinity", "timestamp": 5, "step": (1 << 63) - 1},
             {"key": "big", "value": 1e308, "timestamp": -(1 << 63), "step": 0}]
    unusual = [{"key": "s", "value": "1.5", "timestamp": 1}, {"key": "s", "value": 1.0, "timestamp": "17"},
               {"key": "s", "value": 1.0, "timestamp": 1, "step": "4"}, {"key": "s", "value": True, "timestamp": 1},
               {"key": "s", "value": 1.0, "timestamp": 1.0}, {"key": "s", "value": 1.0, "timestamp": 1 << 63},
               {"key": "s", "value": 1 << 60, "timestamp": 1}, {"key": "s", "value": 1.0, "timestamp": 1,
                                                                  "model_id": "m", "runId": "r"},
               {"key": 5, "value": 1.0, "timestamp": 1}, {"value": 1.0, "timestamp": 1}, "not a metric",
               {"key": "s", "value": None, "timestamp": 1}, {"key": "s", "value": "abc", "timestamp": 1}]
    yield {"run_id": "r1", "metrics": plain}
    yield {"run_id": "r1", "metrics": plain, "params": [{"key": "p", "value": "v"}], "tags": [{"key": "t"}],
           "unknown_field": 1}
    for item in unusual:
        yield {"run_id": "r1", "metrics": [plain[0], item]}
    yield {"run_id": 7, "metrics": plain}
    yield {"runId": "r2", "metrics": []}
    yield {"run_id": "r1", "metrics": "x"}


@pytest.mark.parametrize("request_json", list(_metric_cases()))
def test_log_batch_metrics_built_directly_are_the_messages_parsedict_makes(request_json):
    from mlflow.protos.service_pb2 import LogBatch
    from mlflow.server import handlers
    from mlflow.utils.proto_json_utils import parse_dict as mlflows

    def outcome(parse):
        message = LogBatch()
        try:
            parse(json.loads(json.dumps(request_json)), message)
        except Exception as exc:  # noqa: BLE001 - the same failure either way is the point
            return type(exc).__name__, str(exc)
        return message.SerializeToString(deterministic=True)

    before = handlers.parse_dict
    try:
        guard.fast_log_batch_parsing()
        fast = handlers.parse_dict
        assert fast is not mlflows and fast.replaced_by_stack
        assert outcome(fast) == outcome(mlflows)
    finally:
        handlers.parse_dict = before


def test_the_plain_form_is_built_directly_and_the_rest_goes_to_parsedict():
    assert len(guard.fast_metrics([{"key": "k", "value": 1, "timestamp": 2}])) == 1
    for item in ({"key": "k", "value": 1, "timestamp": 2, "model_id": "m"}, {"key": "k", "value": "1", "timestamp": 2},
                 {"key": "k", "value": 1, "timestamp": "2"}, {"key": "k", "value": 1, "timestamp": 2, "step": False}):
        assert guard.fast_metrics([item]) is None, item


# Authorization on what is executed: the auth layer reads the snake_case names, the handlers
# take camelCase aliases too (mlflow/stack_guard.py, AUTH_READS).
ALIAS_WRITES = ["runs/log-metric", "runs/set-tag", "runs/log-parameter", "runs/log-batch", "runs/update",
                "runs/delete"]


@pytest.mark.parametrize("endpoint", ALIAS_WRITES)
@pytest.mark.parametrize("prefix", ["/api/2.0/mlflow/", "/ajax-api/2.0/mlflow/"])
def test_a_camel_case_id_the_auth_layer_does_not_read_is_refused(prefix, endpoint):
    payload = {"run_uuid": "mine", "runId": "victims", "key": "k", "value": "1", "timestamp": 1}
    with pytest.raises(guard.Invalid, match="spell it 'run_id'"):
        guard.validate(prefix + endpoint, JSON, json.dumps(payload).encode())


@pytest.mark.parametrize("payload", [
    {"experimentId": "1", "name": "x"},
    {"run_id": "a", "run_uuid": "b"},
    {"runUuid": "b"},
    {"name": "m", "modelId": "m-1"},
])
def test_ids_spelled_otherwise_or_twice_differently_are_refused(payload):
    with pytest.raises(guard.Invalid) as info:
        guard.validate("/api/3.0/mlflow/anything", JSON, json.dumps(payload).encode())
    assert info.value.status == 400


@pytest.mark.parametrize("payload", [
    {"run_id": "a", "run_uuid": "a", "key": "k", "value": "v"},
    {"experiment_ids": ["1"], "max_results": 5, "order_by": [], "viewType": "ALL"},
    {"name": "e", "tags": [{"key": "runId", "value": "x"}]},
])
def test_the_spellings_mlflows_clients_send_pass(payload):
    guard.validate("/api/2.0/mlflow/runs/set-tag" if "key" in payload else "/api/2.0/mlflow/experiments/search",
                   JSON, json.dumps(payload).encode())


@pytest.mark.parametrize("location", ["file:///run/secrets", "s3://other-bucket/x"])
def test_the_artifact_location_check_reads_the_camel_case_spelling_too(location, monkeypatch):
    monkeypatch.setenv("MLFLOW_BUCKET", "mlflow")
    with pytest.raises(guard.Invalid, match="artifact"):
        guard.validate("/api/2.0/mlflow/experiments/create", JSON,
                       json.dumps({"name": "e", "artifactLocation": location}).encode())


@pytest.mark.parametrize("path, query", [
    ("/api/2.0/mlflow-artifacts/artifacts/./1/r/artifacts/x", b""),
    ("/api/2.0/mlflow-artifacts/artifacts/%2E/1/r/artifacts/x", b""),
    ("/api/2.0/mlflow-artifacts/artifacts/%252E%252E/1/x", b""),
    ("/api/2.0/mlflow-artifacts/artifacts/1/r/..\\..\\x", b""),
    ("/mlflow/api/2.0/mlflow-artifacts/artifacts/1/./x", b""),
    ("/api/2.0/mlflow-artifacts/artifacts", b"path=./1/r"),
    ("/api/2.0/mlflow-artifacts/artifacts", b"path=%252E/1"),
    ("/get-artifact", b"path=a/../../x&run_uuid=r"),
    ("/ajax-api/2.0/mlflow/upload-artifact", b"run_id=mine&run_uuid=victims&path=x"),
    ("/api/2.0/mlflow/runs/get", b"runId=victims"),
])
def test_dot_segments_and_disagreeing_ids_in_the_target_are_refused(path, query):
    with pytest.raises(guard.Invalid):
        guard.check_target(path, query)


@pytest.mark.parametrize("path, query", [
    ("/api/2.0/mlflow-artifacts/artifacts/1/r/artifacts/.hidden/a..b", b""),
    ("/api/2.0/mlflow-artifacts/artifacts", b"path=1/r/artifacts"),
    ("/ajax-api/2.0/mlflow/upload-artifact", b"run_uuid=r&path=x.txt"),
    ("/api/2.0/mlflow/runs/get", b"run_id=r&run_uuid=r"),
    ("/api/2.0/mlflow/experiments/search", b"max_results=5&experiment_ids=1&experiment_ids=2"),
])
def test_ordinary_targets_pass(path, query):
    guard.check_target(path, query)


def test_the_auth_layer_reads_no_name_the_guard_does_not_know():
    """AUTH_READS against the pinned MLflow's auth module: a name it reads from the
    request that is missing here would let its camelCase alias through."""
    import re

    import mlflow.server.auth as auth

    source = open(auth.__file__).read()
    read = set(re.findall(r'(?:_get_request_param|_get_int_request_param|args\.get|getlist|body\.get|'
                          r'\.get)\("([a-z_]+)"', source))
    assert read, "the pattern no longer finds what the auth layer reads"
    assert {n for n in read if "_" in n} <= guard.AUTH_READS, sorted({n for n in read if "_" in n} - guard.AUTH_READS)


@pytest.mark.parametrize("method, content_types, status", [
    ("DELETE", ["text/plain"], 415),
    ("PATCH", ["application/x-www-form-urlencoded"], 415),
    ("GET", [JSON], 400),
    # Flask joins a repeated header with commas: `text/plain,application/json` is not JSON to the
    # auth layer, which then reads the query string, while the handler parses the body.
    ("DELETE", ["text/plain", JSON], 415),
])
def test_bodies_the_auth_layer_would_not_read_are_refused(method, content_types, status):
    seen = []

    async def inner(scope, receive, send):
        seen.append(scope["path"])

    app = guard.Guard(inner, auth=True, max_body=1 << 20)
    payload = json.dumps({"name": "victims-model"}).encode()
    headers = [("authorization", "Basic eDp5"), *[("content-type", c) for c in content_types],
               ("content-length", str(len(payload)))]
    sent = _call(app, "/api/2.0/mlflow/registered-models/delete", payload, headers, method=method)
    assert sent[0]["status"] == status and not seen, sent


def test_an_answers_headers_leave_with_its_body():
    order = []

    async def send(message):
        order.append(message["type"])

    async def answer():
        whole = guard.whole_small_answers(send)
        await whole({"type": "http.response.start", "status": 200, "headers": []})
        assert order == [], "the headers went out before the body"
        await whole({"type": "http.response.body", "body": b"{}"})

    asyncio.run(answer())
    assert order == ["http.response.start", "http.response.body"]


@pytest.mark.parametrize("path, content_type", [("/ajax-api/2.0/mlflow/upload-artifact", "text/plain"),
                                                ("/api/2.0/mlflow/users/create-ui", "application/x-www-form-urlencoded")])
def test_the_two_api_routes_that_take_other_bodies_still_do(path, content_type):
    guard.validate(path, content_type, b"username=a&password=b")


# --- Only nginx reaches the server; logins checked (and throttled) before a body is read.

def _scoped_call(app, path, payload=b"", headers=(), method="POST", client=("172.18.0.9", 40000)):
    sent, reads = [], []

    async def receive():
        reads.append(1)
        return {"type": "http.request", "body": payload, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "client": client,
             "headers": [(k.encode(), v.encode()) for k, v in headers]}
    asyncio.run(app(scope, receive, send))
    return sent, reads


def test_only_nginx_and_the_containers_own_loopback_are_answered():
    seen = []

    async def inner(scope, receive, send):
        seen.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    app = guard.Guard(inner, auth=False, max_body=1 << 20, nginx_token="t0ken-of-nginx-xyz")
    for headers in ([], [(guard.FROM_NGINX, "1")], [(guard.FROM_NGINX, "t0ken-of-nginx-xy")],
                    [(guard.FROM_NGINX, "t0ken-of-nginx-xyz" + "z")]):
        sent, reads = _scoped_call(app, "/api/2.0/mlflow/experiments/search", b"{}", headers)
        assert sent[0]["status"] == 403 and not seen and not reads, headers
        assert b"nginx only" in sent[1]["body"]
    sent, _ = _scoped_call(app, "/health", method="GET", headers=[(guard.FROM_NGINX, "t0ken-of-nginx-xyz")])
    assert sent[0]["status"] == 200
    sent, _ = _scoped_call(app, "/health", method="GET", client=("127.0.0.1", 5555))
    assert sent[0]["status"] == 200 and seen == ["/health", "/health"]
    # The metrics port asks for Prometheus's token the same way.
    import entrypoint

    metrics = entrypoint.bearer_only(lambda environ, start: (start("200 OK", []), [b"up 1\n"])[1], "m3trics-token")
    answers = []
    for given in ("", "Bearer m3trics-toke", "Bearer m3trics-token", "Basic m3trics-token"):
        body = metrics({"HTTP_AUTHORIZATION": given}, lambda status, headers: answers.append(status))
        assert (b"up 1\n" in body) == (given == "Bearer m3trics-token")
    assert answers == ["401 Unauthorized", "401 Unauthorized", "200 OK", "401 Unauthorized"]


class _Logins:
    """Stands in for guard.Logins: a verdict per login, and the calls it got."""

    def __init__(self, verdicts):
        self.verdicts, self.asked = verdicts, []

    async def verify(self, scope, headers, header):
        import stack_logins

        credentials = guard.basic_credentials(header)
        if credentials is None:
            return None
        self.asked.append((credentials[0], guard.client_address(scope, headers)))
        return self.verdicts.get(credentials, stack_logins.Verdict(False, failures=1))


def _basic(user, password):
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize("path,method", [(BATCH, "POST"), ("/api/2.0/mlflow-artifacts/artifacts/1/x.bin", "PUT"),
                                         ("/v1/traces", "POST"), ("/", "GET")])
def test_a_wrong_or_held_login_is_answered_before_its_body_is_read(path, method):
    import stack_logins

    seen = []

    async def inner(scope, receive, send):
        seen.append(scope["path"])
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    logins = _Logins({("ann", "good"): stack_logins.Verdict(True), ("ann", "held"): stack_logins.Verdict(False, held=7)})
    app = guard.Guard(inner, auth=True, max_body=1 << 20, logins=logins)
    payload = body(metrics=[metric()])
    sent, reads = _scoped_call(app, path, payload, [("authorization", _basic("ann", "wrong")), ("content-type", JSON),
                                                    ("x-real-ip", "203.0.113.7")], method=method)
    assert sent[0]["status"] == 401 and not reads and not seen
    assert (b"www-authenticate", b'Basic realm="mlflow"') in sent[0]["headers"]
    sent, reads = _scoped_call(app, path, payload, [("authorization", _basic("ann", "held")), ("content-type", JSON)],
                               method=method)
    assert sent[0]["status"] == 429 and (b"retry-after", b"7") in sent[0]["headers"] and not reads and not seen
    assert json.loads(sent[1]["body"])["error_code"] == "RESOURCE_EXHAUSTED"
    sent, reads = _scoped_call(app, path, payload, [("authorization", _basic("ann", "good")), ("content-type", JSON)],
                               method=method)
    assert sent[0]["status"] == 200 and reads and seen
    # The client's address is nginx's X-Real-IP, else the peer's.
    assert logins.asked == [("ann", "203.0.113.7"), ("ann", "172.18.0.9"), ("ann", "172.18.0.9")]


def test_nginx_asks_for_a_login_verdict_before_it_reads_a_large_body():
    import stack_logins

    async def inner(scope, receive, send):
        raise AssertionError("reached MLflow")

    logins = _Logins({("ann", "good"): stack_logins.Verdict(True), ("ann", "held"): stack_logins.Verdict(False, held=9)})
    app = guard.Guard(inner, auth=True, max_body=1 << 20, base_path="/mlflow", logins=logins)
    status = lambda header: _scoped_call(app, "/mlflow/_stack/login", method="GET",  # noqa: E731
                                         headers=[("authorization", header)] if header else [])[0][0]
    assert status(_basic("ann", "good"))["status"] == 204
    assert status(_basic("ann", "wrong"))["status"] == 401
    assert status(None)["status"] == 401
    held = status(_basic("ann", "held"))
    assert held["status"] == 403 and (b"x-stack-retry-after", b"9") in held["headers"]
    # The admin check is throttled the same way.
    admin = _scoped_call(app, "/mlflow/_stack/admin", method="GET", headers=[("authorization", _basic("ann", "held"))])
    assert admin[0][0]["status"] == 403
    assert guard.Guard(inner, auth=False, max_body=1, logins=logins).logins is None


def test_basic_credentials_are_read_as_mlflow_reads_them():
    """Whatever MLflow (Werkzeug, or its FastAPI code) would check as a login, the throttle sees too."""
    assert guard.basic_credentials(_basic("ann", "p:w")) == ("ann", "p:w")
    assert guard.basic_credentials("basic " + base64.b64encode(b"ann:").decode()) == ("ann", "")
    # No colon: an empty password; base64 with stray characters is read as Python reads it.
    assert guard.basic_credentials("Basic " + base64.b64encode(b"no-colon").decode()) == ("no-colon", "")
    assert guard.basic_credentials(_basic("ann", "pw") + "!") == ("ann", "pw")
    assert guard.basic_credentials("Basic  " + base64.b64encode(b"ann:pw").decode() + " ") == ("ann", "pw")
    for header in ("", "Bearer x", "Basic " + base64.b64encode(b"\xff:x").decode(), "Basic abc"):
        assert guard.basic_credentials(header) is None, header
    # On the gateway's routes MLflow reads X-MLflow-Authorization first (Authorization holds the
    # provider's key there); elsewhere only Authorization.
    both = {"authorization": "Bearer sk-provider", guard.GATEWAY_LOGIN: _basic("ann", "pw")}
    assert guard.login_header("/gateway/openai/v1/chat/completions", both) == _basic("ann", "pw")
    assert guard.login_header("/api/2.0/mlflow/runs/create", both) == "Bearer sk-provider"
    assert guard.login_header("/gateway/x", {"authorization": _basic("bo", "x"), guard.GATEWAY_LOGIN: " "}) \
        == _basic("bo", "x")


def test_a_login_is_held_longer_after_each_failure_beyond_the_free_ones():
    import stack_logins

    holds = [stack_logins.hold_seconds(n, 5, 300) for n in range(1, 17)]
    assert holds == [0, 0, 0, 0, 0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]
    assert stack_logins.hold_seconds(10 ** 6, 5, 300) == 300
    # What the setting's documentation says of the defaults: 9 tries after the free ones in about 4 minutes.
    assert sum(holds[5:13]) == 255


def test_unchecked_logins_of_one_account_are_checked_one_at_a_time(monkeypatch):
    """Guesses sent side by side must not all pass the throttle before the first failure counts;
    other accounts are not held up by it. A login found in MLflow's cache costs nothing."""
    import threading
    import time

    import stack_logins
    from mlflow.server import auth

    monkeypatch.setattr(guard.Logins, "cached", staticmethod(lambda u, p: "cached-user" if p == "cached" else None))
    lock, running, most = threading.Lock(), {}, {}

    class Throttle:
        def check(self, account, address, authenticate):
            with lock:
                running[account] = running.get(account, 0) + 1
                most[account] = max(most.get(account, 0), running[account])
                most["both"] = max(most.get("both", 0), sum(running.values()))
            time.sleep(0.05)
            with lock:
                running[account] -= 1
            return stack_logins.Verdict(False, failures=1)

    monkeypatch.setattr(auth, "_authenticate_cached", lambda u, p: None)
    logins = guard.Logins(Throttle())

    async def many():
        calls = [logins.verify({"client": ("10.0.0.1", 1)}, {}, _basic(user, f"guess-{i}"))
                 for i in range(6) for user in ("ann", "bob")]
        cached = logins.verify({}, {}, _basic("ann", "cached"))
        return await asyncio.gather(cached, *calls)

    verdicts = asyncio.run(many())
    assert verdicts[0].ok and verdicts[0].user == "cached-user"
    assert all(not v.ok for v in verdicts[1:])
    assert most == {"ann": 1, "bob": 1, "both": 2}, most
    assert logins._checking == {}


def test_a_hold_once_answered_is_answered_again_without_asking_the_database(monkeypatch):
    import stack_logins
    from mlflow.server import auth

    monkeypatch.setattr(guard.Logins, "cached", staticmethod(lambda u, p: None))
    monkeypatch.setattr(auth, "_authenticate_cached", lambda u, p: None)
    asked = []

    class Throttle:
        def check(self, account, address, authenticate):
            asked.append((account, address))
            return stack_logins.Verdict(False, failures=6, holds_for=30)

    logins = guard.Logins(Throttle())
    verify = lambda user, address: asyncio.run(logins.verify(  # noqa: E731
        {"client": (address, 1)}, {}, _basic(user, "guess")))
    first = verify("ann", "10.0.0.1")
    assert not first.ok and first.holds_for == 30 and not first.held
    again = verify("ann", "10.0.0.1")
    assert again.held and 29 <= again.held <= 30
    verify("ann", "10.0.0.2")
    verify("bob", "10.0.0.1")
    assert asked == [("ann", "10.0.0.1"), ("ann", "10.0.0.2"), ("bob", "10.0.0.1")]


def test_the_gateways_login_is_throttled_nginxs_token_goes_no_further_and_loopback_is_not_held():
    import stack_logins

    seen = []

    async def inner(scope, receive, send):
        seen.append(dict(scope["headers"]))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    logins = _Logins({("ann", "good"): stack_logins.Verdict(True)})
    app = guard.Guard(inner, auth=True, max_body=1 << 20, logins=logins, nginx_token="t0ken-of-nginx-xyz")
    token = (guard.FROM_NGINX, "t0ken-of-nginx-xyz")
    # A guess in the gateway's own login header is refused (and counted) like any other.
    sent, _ = _scoped_call(app, "/gateway/openai/v1/chat/completions", b"{}",
                           [token, ("authorization", "Bearer sk-provider"), (guard.GATEWAY_LOGIN, _basic("ann", "x"))])
    assert sent[0]["status"] == 401 and not seen and logins.asked == [("ann", "172.18.0.9")]
    sent, _ = _scoped_call(app, "/gateway/openai/v1/chat/completions", b"{}",
                           [token, ("authorization", "Bearer sk-provider"), (guard.GATEWAY_LOGIN, _basic("ann", "good"))])
    assert sent[0]["status"] == 200
    # What MLflow (and the provider, through its gateway) gets has no token of nginx's.
    assert guard.FROM_NGINX_KEY.encode() not in seen[-1] and seen[-1][b"authorization"] == b"Bearer sk-provider"
    # The container's own processes (healthcheck, MLflow's job runner) are not throttled.
    sent, _ = _scoped_call(app, "/api/2.0/mlflow/experiments/search", b"{}", [("authorization", _basic("bo", "x")),
                                                                              ("content-type", JSON)],
                           client=("127.0.0.1", 9))
    assert sent[0]["status"] == 200 and len(logins.asked) == 2


def test_a_login_is_still_checked_when_the_throttles_database_fails(monkeypatch, capsys):
    from mlflow.server import auth

    monkeypatch.setattr(guard.Logins, "cached", staticmethod(lambda u, p: None))
    monkeypatch.setattr(auth, "_authenticate_cached", lambda u, p: "ann's user" if p == "good" else None)

    class Down:
        def check(self, account, address, authenticate):
            raise OSError("connection refused")

    logins = guard.Logins(Down())
    good = asyncio.run(logins.verify({"client": ("10.0.0.1", 1)}, {}, _basic("ann", "good")))
    bad = asyncio.run(logins.verify({"client": ("10.0.0.1", 1)}, {}, _basic("ann", "bad")))
    assert good.ok and good.user == "ann's user" and not bad.ok and not bad.held
    assert "login throttle unavailable" in capsys.readouterr().err


def test_which_count_holds_which_login():
    """An unknown address is held by the pair's, the account's and (at 10x) the address's
    count; a known one by its pair's only, at 4x (typing mistakes). Holds run from the last failure."""
    import stack_logins

    throttle = stack_logins.Throttle(None, free=5, cap=300)
    assert throttle.wait("pair", 6, 0.0, known=False) == 1 and throttle.wait("account", 7, 0.5, known=False) == 1.5
    assert throttle.wait("address", 50, 0.0, known=False) <= 0 < throttle.wait("address", 51, 0.0, known=False)
    assert throttle.wait("account", 100, 0.0, known=True) == 0
    assert throttle.wait("pair", 20, 0.0, known=True) <= 0 < throttle.wait("pair", 21, 0.0, known=True)
    assert throttle.wait("pair", 30, 400.0, known=False) < 0  # a hold of 300 s, long over
    # An IPv6 client is one address per /64; IPv4 and names as they are.
    assert stack_logins.Throttle.address_key("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert stack_logins.Throttle.address_key("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert stack_logins.Throttle.address_key("203.0.113.7") == "203.0.113.7"
    assert stack_logins.Throttle.address_key("unknown") == "unknown"


def test_admins_see_and_clear_failed_logins_others_do_not(monkeypatch):
    import stack_logins
    from mlflow.server import auth

    users = {("root", "pw"): type("U", (), {"is_admin": True})(), ("ann", "pw"): type("U", (), {"is_admin": False})()}
    monkeypatch.setattr(guard.Logins, "cached", staticmethod(lambda u, p: users.get((u, p))))
    monkeypatch.setattr(auth, "_authenticate_cached", lambda u, p: None)
    cleared = []

    class Throttle:
        def check(self, account, address, authenticate):
            return stack_logins.Verdict(False, failures=1)

        def recent(self):
            return [{"scope": "account", "subject": "bo", "failures": 9, "last_failure": "t", "held_for": 8}]

        def clear(self, account):
            cleared.append(account)
            return 2

    async def inner(scope, receive, send):
        raise AssertionError("reached MLflow")

    logins = guard.Logins(Throttle())
    logins.remember_hold("bo", "10.0.0.1", 60)
    app = guard.Guard(inner, auth=True, max_body=1 << 20, base_path="/mlflow", logins=logins)
    call = lambda path, who, method="GET", payload=b"": _scoped_call(  # noqa: E731
        app, "/mlflow" + path, payload, ([("authorization", _basic(*who))] if who else [])
        + [("content-type", "application/json")], method=method)[0]
    listed = call(guard.LOGIN_FAILURES, ("root", "pw"))
    assert listed[0]["status"] == 200 and json.loads(listed[1]["body"])["failures"][0]["subject"] == "bo"
    assert call(guard.LOGIN_FAILURES, ("ann", "pw"))[0]["status"] == 403
    assert call(guard.LOGIN_FAILURES, None)[0]["status"] == 401
    assert call(guard.LOGIN_FAILURES, ("root", "wrong"))[0]["status"] == 401
    assert call(guard.LOGIN_UNLOCK, ("ann", "pw"), "POST", b'{"username": "bo"}')[0]["status"] == 403 and not cleared
    assert call(guard.LOGIN_UNLOCK, ("root", "pw"), "POST", b'{"user": "bo"}')[0]["status"] == 400
    # JSON only: a cross-site form cannot clear counts with an admin's remembered login.
    form = _scoped_call(app, "/mlflow" + guard.LOGIN_UNLOCK, b"username=bo", [("authorization", _basic("root", "pw")),
                        ("content-type", "application/x-www-form-urlencoded")], method="POST")[0]
    assert form[0]["status"] == 415 and not cleared
    done = call(guard.LOGIN_UNLOCK, ("root", "pw"), "POST", b'{"username": "bo"}')
    assert done[0]["status"] == 200 and json.loads(done[1]["body"]) == {"cleared": 2} and cleared == ["bo"]
    assert ("bo", "10.0.0.1") not in logins._holds
