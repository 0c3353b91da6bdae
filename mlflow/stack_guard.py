"""The tracking server's app in this stack: MLflow (with basic-auth when it is on)
behind a check of what clients write.

The stock server accepts some bad input silently or fails on it: malformed JSON
to runs/log-batch gives a 500 (TypeError), a metric value "abc" is stored as
0.0 at timestamp 0, an over-long param is truncated. Here such requests get a
400 with an MLflow-style error body, and nothing is stored.

Registered as the MLflow app "stack" (entry point group mlflow.app), run by
`mlflow server --app-name stack` under uvicorn.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import hmac
import json
import math
import os
import sys
import threading
import time
import urllib.parse

from stack import common
from stack.common import STORE_FULL_ADVICE, STORE_FULL_CODE

MAX_METRICS, MAX_PARAMS, MAX_TAGS, MAX_ITEMS = 1000, 100, 100, 1000
MAX_PARAM_VALUE, MAX_TAG_VALUE, MAX_KEY = 6000, 8000, 250
MAX_BODY = 1 << 20  # MLflow's own log-batch limit
SPECIAL_FLOATS = {"NaN", "Infinity", "-Infinity"}
API_PREFIXES = ("/api/2.0/mlflow/", "/ajax-api/2.0/mlflow/", "/api/3.0/mlflow/", "/ajax-api/3.0/mlflow/")
# nginx asks here whether a login is an MLflow admin's (admin-only pages: Prometheus).
ADMIN_CHECK = "/_stack/admin"
# nginx asks here whether a login is good before it reads a large body (auth_request).
LOGIN_CHECK = "/_stack/login"
# The throttle's counts, for MLflow admins (./stack_users.sh failures | unlock NAME).
LOGIN_FAILURES = "/api/2.0/stack/login-failures"
LOGIN_UNLOCK = "/api/2.0/stack/login-failures/clear"
# Access tokens (mlflow/stack_tokens.py): a user's own, an admin's for anyone.
TOKENS = "/api/2.0/stack/tokens"
TOKENS_CREATE = "/api/2.0/stack/tokens/create"
TOKENS_REVOKE = "/api/2.0/stack/tokens/revoke"
# What a token may not do: change accounts (an admin's token could otherwise make itself
# an admin account with a password of its own: a leaked token would become an account).
PASSWORD_ONLY = tuple(f"{prefix}/2.0/mlflow/users/{action}" for prefix in ("/api", "/ajax-api")
                      for action in ("create", "create-ui", "update-password", "update-admin", "delete"))
# MLflow's own answer to a wrong login (make_basic_auth_response).
NOT_AUTHENTICATED = (b"You are not authenticated. Please see https://www.mlflow.org/docs/latest/auth/"
                     b"index.html#authenticating-to-mlflow on how to authenticate.")
# MLflow 3.17 streams proxied artifact up/downloads in a native route that it
# mounts at the root even under --static-prefix; the prefixed twin is Flask's,
# which holds a whole upload in memory. Its auth layer checks the root form.
STREAMED_ARTIFACTS = ("/api/2.0/mlflow-artifacts/artifacts/", "/ajax-api/2.0/mlflow-artifacts/artifacts/")


class Invalid(Exception):
    def __init__(self, message: str, status: int = 400, code: str = "INVALID_PARAMETER_VALUE"):
        super().__init__(message)
        self.status, self.code = status, code


def _int(value, name: str, minimum: int | None = None) -> int:
    # Protobuf's JSON form allows int64 as a number or a decimal string.
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise Invalid(f"{name} must be an integer, got {json.dumps(value)[:40]}")
    try:
        number = int(value)
    except ValueError:
        raise Invalid(f"{name} must be an integer, got {json.dumps(value)[:40]}") from None
    if minimum is not None and number < minimum:
        raise Invalid(f"{name} must be >= {minimum}, got {number}")
    return number


def _key(item: dict, what: str) -> str:
    key = item.get("key")
    if not isinstance(key, str) or not key:
        raise Invalid(f"{what} key must be a non-empty string")
    if len(key) > MAX_KEY:
        raise Invalid(f"{what} key '{key[:40]}...' is longer than {MAX_KEY} characters")
    return key


def check_metric(item) -> None:
    if not isinstance(item, dict):
        raise Invalid("a metric must be an object")
    key = _key(item, "metric")
    value = item.get("value")
    if isinstance(value, bool) or not (isinstance(value, (int, float)) or value in SPECIAL_FLOATS):
        raise Invalid(f"metric '{key}' value must be a number, got {json.dumps(value)[:40]}")
    if "timestamp" not in item:
        raise Invalid(f"metric '{key}' has no timestamp")
    _int(item["timestamp"], f"metric '{key}' timestamp", minimum=0)
    if "step" in item:
        _int(item["step"], f"metric '{key}' step")


def _check_string(item, what: str, limit: int) -> None:
    if not isinstance(item, dict):
        raise Invalid(f"a {what} must be an object")
    key = _key(item, what)
    value = item.get("value", "")
    if not isinstance(value, str):
        raise Invalid(f"{what} '{key}' value must be a string")
    if len(value) > limit:
        raise Invalid(f"{what} '{key}' value has {len(value)} characters; the limit is {limit}. "
                      "It is refused rather than truncated")


def check_param(item) -> None:
    _check_string(item, "param", MAX_PARAM_VALUE)


def check_tag(item) -> None:
    _check_string(item, "tag", MAX_TAG_VALUE)


def _list(body: dict, name: str, limit: int) -> list:
    items = body.get(name, [])
    if not isinstance(items, list):
        raise Invalid(f"'{name}' must be a list")
    if len(items) > limit:
        raise Invalid(f"a batch may hold at most {limit} {name}, got {len(items)}")
    return items


def check_log_batch(body: dict) -> None:
    metrics = _list(body, "metrics", MAX_METRICS)
    params = _list(body, "params", MAX_PARAMS)
    tags = _list(body, "tags", MAX_TAGS)
    if len(metrics) + len(params) + len(tags) > MAX_ITEMS:
        raise Invalid(f"a batch may hold at most {MAX_ITEMS} items in all")
    for m in metrics:
        check_metric(m)
    for p in params:
        check_param(p)
    for t in tags:
        check_tag(t)


def check_experiment(body: dict) -> None:
    """A client-chosen artifact_location must stay inside the stack's store: no
    local paths, other buckets or hosts, no dot-segments or URL tricks."""
    location = spelled_either_way(body, "artifact_location")
    if location in (None, ""):
        return
    if not isinstance(location, str):
        raise Invalid("artifact_location must be a string")
    decoded = urllib.parse.unquote(urllib.parse.unquote(location))
    segments = decoded.replace("\\", "/").split("/")
    if ".." in segments or "." in segments[1:] or any(ch in decoded for ch in "#?\x00"):
        raise Invalid("artifact_location may not contain '..', '.', '#', '?' or encoded forms of them")
    bucket = os.environ.get("MLFLOW_BUCKET", "")
    allowed = ("mlflow-artifacts:/", f"s3://{bucket}/artifacts/") if bucket else ("mlflow-artifacts:/",)
    if not decoded.startswith(allowed):
        raise Invalid(f"artifact_location must be inside the stack's artifact store ({' or '.join(allowed)}); "
                      "leave it empty to let the server choose")


def camel_case(name: str) -> str:
    """A proto field's JSON name, as protobuf derives it: run_id -> runId."""
    first, *rest = name.split("_")
    return first + "".join(part[:1].upper() + part[1:] for part in rest)


def spelled_either_way(body: dict, name: str):
    """A field's value as the handler will see it: protobuf takes its proto name or its
    camelCase JSON name (and MLflow refuses a body with both)."""
    return body[name] if name in body else body.get(camel_case(name))


# What MLflow's auth layer reads from the raw request (query string, JSON body, form),
# by proto name, to decide whether the caller may go on. The handlers parse the same
# body with protobuf, which also takes a field's camelCase JSON name: a body naming a
# resource only as `runId` is authorized on another id (or none) and executed on it.
# MLflow refuses only a body that spells one field both ways. So the camelCase
# spellings of these are refused here, at any depth the auth layer does not parse.
# tests/unit/test_stack_guard.py checks this set against the pinned MLflow's auth module.
AUTH_READS = frozenset({
    "artifact_path", "comparator", "creator", "current_password", "dataset_id", "description",
    "endpoint", "endpoint_id", "experiment_id", "experiment_ids", "experiment_name", "filter",
    "filter_string", "input", "is_admin", "issue_id", "job_id", "key", "log_assessments", "model",
    "model_definition_id", "model_id", "name", "new_name", "next_page_token", "order_by", "password",
    "path", "permission", "queue_id", "reflection_model", "request_id", "resource_id", "resource_pattern",
    "resource_type", "role_id", "role_permission_id", "run_id", "run_uuid", "schema_id", "scorer_ids",
    "scorer_name", "secret_id", "server_alias", "server_name", "server_version", "trace_id", "type",
    "username", "workspace", "workspace_name", "max_results", "run_ids", "trace_ids",
    # names in the answers it filters, which the unit test's pattern finds too
    "access_endpoints", "mcp_access_endpoints", "mcp_servers",
})
AUTH_ALIASES = {camel_case(name): name for name in AUTH_READS if camel_case(name) != name}
# Two fields for one thing: the auth layer reads run_id first, some handlers run_uuid
# first (upload-artifact), others `run_id or run_uuid` (an empty run_id).
SAME_THING = (("run_id", "run_uuid"),)
# API routes whose body is not JSON: a file (the UI's upload, up to 10 MB) and the
# sign-up form (admins only). Their auth reads the query string or the form.
NOT_JSON = ("upload-artifact", "users/create-ui")


def check_names(fields: dict, where: str) -> None:
    """fields: the request's names and their values (a JSON object or a query string)."""
    for name in fields:
        if name in AUTH_ALIASES:
            raise Invalid(f"'{name}' in the {where} is not accepted: spell it '{AUTH_ALIASES[name]}' "
                          "(the server authorizes a request by the snake_case names)")
    for first, second in SAME_THING:
        if first in fields and second in fields and fields[first] != fields[second]:
            raise Invalid(f"'{first}' and '{second}' in the {where} name different things: give one of them")


def dot_segment(text: str) -> bool:
    """Whether a path holds a '.' or '..' segment, as it is or once percent-decoded up to
    three times (MLflow decodes artifact paths again; '\\' counts as '/')."""
    for _ in range(4):
        segments = text.replace("\\", "/").split("/")
        if "." in segments or ".." in segments:
            return True
        decoded = urllib.parse.unquote(text)
        if decoded == text:
            return False
        text = decoded
    return True  # still encoded after three rounds: nobody's real path


def check_target(path: str, query_string: bytes) -> None:
    """The request's path and query string: no '.' or '..' segments in the path or an
    artifact path (MLflow's auth takes the experiment from the path's first segment:
    `./1/x` names none and falls back to the default permission), and the names MLflow's
    auth reads spelled as it reads them."""
    if dot_segment(path):
        raise Invalid("the path may not contain '.' or '..' segments, nor encoded forms of them")
    if not query_string:
        return
    query: dict = {}
    for name, value in urllib.parse.parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
        query.setdefault(name, value)
    for name in ("path", "artifact_path"):
        if dot_segment(query.get(name, "")):
            raise Invalid(f"'{name}' may not contain '.' or '..' segments, nor encoded forms of them")
    check_names(query, "query string")


CHECKS = {
    "experiments/create": check_experiment,
    "runs/log-batch": check_log_batch,
    "runs/log-metric": check_metric,
    "runs/log-parameter": check_param,
    "runs/set-tag": check_tag,
}


def validate(path: str, content_type: str, body: bytes) -> None:
    """Raise Invalid for a write MLflow would mishandle or authorize on other ids than
    it executes on; return for anything else."""
    endpoint = next((path[len(p):] for p in API_PREFIXES if path.startswith(p)), None)
    if endpoint is None:
        return
    endpoint = endpoint.rstrip("/")
    check = CHECKS.get(endpoint)
    is_json = content_type.split(";")[0].strip().lower() == "application/json"
    if check is not None and not is_json:
        raise Invalid("Content-Type must be application/json", status=415, code="BAD_REQUEST")
    if not body.strip() or endpoint in NOT_JSON:
        return
    if not is_json:
        # The auth layer reads a body only when it says it is JSON, while the handlers of
        # DELETE and PATCH parse it whatever it says.
        raise Invalid("a request body must be JSON (Content-Type: application/json)", status=415,
                      code="BAD_REQUEST")
    if len(body) > MAX_BODY and check is not None:
        raise Invalid(f"request body over {MAX_BODY} bytes", status=413, code="BAD_REQUEST")
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Invalid(f"malformed JSON: {exc}", code="MALFORMED_REQUEST") from None
    if not isinstance(parsed, dict):
        raise Invalid("the request body must be a JSON object", code="MALFORMED_REQUEST")
    check_names(parsed, "body")
    if check is not None:
        check(parsed)


class Guard:
    """ASGI middleware: buffer JSON write bodies, validate, then hand them on untouched."""

    def __init__(self, app, auth: bool, max_body: int, base_path: str = "", logins: "Logins | None" = None,
                 nginx_token: str | None = None, tokens: "TokenOwners | None" = None):
        self.app = app
        self.auth = auth
        # Access tokens (None: authentication is off).
        self.tokens = tokens if auth else None
        # Failed logins throttled, and logins checked before a body is read (None: MLflow checks them).
        self.logins = logins if auth else None
        # Only nginx may call (STACK_NGINX_TOKEN), and the container's own healthcheck.
        self.nginx_token = nginx_token
        # MLflow serves everything under MLFLOW_BASE_PATH (--static-prefix):
        # the checks match the paths below it.
        self.base_path = base_path
        # Any API body (not only the checked writes): the same limit as nginx's.
        self.max_body = max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = joined_headers(scope)
        by_nginx = sent_by_nginx(headers, self.nginx_token)
        # Only nginx is answered, and the container's own processes (its healthcheck). And
        # MLflow's version, which the scheduled backup records: no secret, and with
        # authentication on MLflow asks for a login there too.
        if not (self.nginx_token is None or by_nginx or loopback(scope)
                or scope.get("path") == self.base_path + "/version"):
            return await _status(send, 403, b"This port answers nginx only: use the stack's HTTPS address.\n")
        if FROM_NGINX_KEY in headers:
            # Checked: nginx's token goes no further (MLflow's gateway passes a request's
            # headers on to the provider). Whether nginx sent it is remembered instead.
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k.lower() != FROM_NGINX_KEY]}
            FROM_NGINX_REQUEST.set(by_nginx)
        path = scope.get("path", "")
        if self.base_path:
            path = path[len(self.base_path):] if path.startswith(self.base_path + "/") else ""
            if scope["method"] in ("GET", "PUT") and path.startswith(STREAMED_ARTIFACTS):
                scope = unprefixed(scope, path, self.base_path)
        if self.tokens is not None:
            scope, refused = await self.token_logins(scope, headers, path)
            if refused is not None:
                return await _status(send, *refused)
            headers = joined_headers(scope)
        if path == ADMIN_CHECK:
            return await self.admin_check(scope, headers, send)
        if path == LOGIN_CHECK:
            return await self.login_check(scope, headers, send)
        if path in (LOGIN_FAILURES, LOGIN_UNLOCK):
            return await self.login_failures(scope, headers, receive, send, path)
        if path in (TOKENS, TOKENS_CREATE, TOKENS_REVOKE):
            return await self.token_call(scope, headers, receive, send, path)
        if path in PASSWORD_ONLY and scope["method"] != "GET" and self.tokens is not None \
                and by_token(headers.get("authorization", "")):
            return await _error(send, Invalid("a token cannot change accounts (passwords, admins, new or deleted "
                                              "accounts): log in with the password", 403, "PERMISSION_DENIED"))
        try:
            check_target(scope.get("path", ""), scope.get("query_string", b""))
        except Invalid as exc:
            return await _error(send, exc)
        login = login_header(path, headers)
        if self.logins is not None and login and not loopback(scope):
            # Before any body is read: a wrong or held login costs no buffering. (The
            # container's own processes, MLflow's job runner among them, are not throttled.)
            verdict = await self.logins.verify(scope, headers, login)
            if verdict is not None and not verdict.ok:
                return await _refused(send, verdict)
        if scope["method"] == "PUT" and path.startswith(STREAMED_ARTIFACTS):
            return await self.upload(scope, receive, send)
        if not path.startswith(API_PREFIXES):
            return await self.app(scope, receive, send)
        send = whole_small_answers(send)
        if self.auth and "authorization" not in headers:
            # Let the auth layer answer 401 first; nothing reaches the store anyway.
            return await self.app(scope, receive, send)
        if scope["method"] in ("GET", "HEAD"):
            if headers.get("content-length", "0") != "0" or "transfer-encoding" in headers:
                # The auth layer reads a GET's query string; a handler with none reads the body.
                return await _error(send, Invalid("a GET request carries its parameters in the query string, "
                                                  "not in a body"))
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return await _error(send, Invalid("request body too large", 413, "BAD_REQUEST"))
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        try:
            validate(path, headers.get("content-type", ""), body)
        except Invalid as exc:
            return await _error(send, exc)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def upload(self, scope, receive, send) -> None:
        """An artifact upload; a full store's failure becomes a 507 with the reason.

        MLflow answers it with a bare 500, which its client retries for minutes
        (a 507 it does not retry). A 5xx is held until it is known what caused it."""
        held, started = [], False

        async def hold(message):
            nonlocal started
            if held or (message["type"] == "http.response.start" and message["status"] >= 500 and not started):
                held.append(message)
                return
            started = True
            await send(message)

        try:
            await self.app(scope, receive, hold)
        except Exception as exc:
            reason = None if started else storage_full(_chain_text(exc))
            if reason:
                return await _store_full(send, reason)
            for message in held:
                await send(message)
            raise
        if held:
            reason = storage_full(b"".join(m.get("body", b"") for m in held[1:]).decode("utf-8", "replace"))
            if reason:
                return await _store_full(send, reason)
            for message in held:
                await send(message)

    async def admin_check(self, scope, headers, send) -> None:
        """nginx's auth_request for the admin-only pages (Prometheus): 204 for an MLflow
        admin's login, 403 for another user's, 401 (with a Basic challenge) otherwise."""
        if not self.auth:
            return await _status(send, 204)
        if self.logins is None:
            verdict = await asyncio.to_thread(admin_verdict, headers.get("authorization", ""))
            return await _status(send, {True: 204, False: 403, None: 401}[verdict])
        login = await self.logins.verify(scope, headers, headers.get("authorization", ""))
        if login is None or not login.ok:
            return await _status(send, 403 if login and login.held else 401)
        await _status(send, 204 if login.user.is_admin else 403)

    async def login_failures(self, scope, headers, receive, send, path: str) -> None:
        """The throttle's counts (GET), or an account's forgotten (POST {"username": NAME}):
        MLflow admins only."""
        if self.logins is None:
            return await _error(send, Invalid("authentication is off: no logins are counted", 404,
                                              "ENDPOINT_NOT_FOUND"))
        login = await self.logins.verify(scope, headers, headers.get("authorization", ""))
        if login is None or not login.ok:
            return await (_refused(send, login) if login is not None else _status(send, 401, NOT_AUTHENTICATED))
        if not login.user.is_admin:
            return await _error(send, Invalid("only an MLflow admin may see or clear failed logins", 403,
                                              "PERMISSION_DENIED"))
        if path == LOGIN_FAILURES and scope["method"] == "GET":
            rows = await asyncio.to_thread(self.logins.throttle.recent)
            return await _json(send, {"failures": rows})
        if path == LOGIN_UNLOCK and scope["method"] == "POST":
            if by_token(headers.get("authorization", "")):
                # The throttle guards the passwords, which a token cannot become.
                return await _error(send, Invalid("failed logins are cleared with the password, not with a token",
                                                  403, "PERMISSION_DENIED"))
            if not json_body(headers):
                return await _error(send, Invalid('send {"username": NAME} (Content-Type: application/json)', 415,
                                                  "BAD_REQUEST"))
            try:
                account = (await small_json(receive))["username"]
                assert isinstance(account, str) and account
            except (ValueError, KeyError, TypeError, AssertionError):
                return await _error(send, Invalid('send {"username": NAME}'))
            cleared = await asyncio.to_thread(self.logins.throttle.clear, account)
            self.logins.forget_holds(account)
            return await _json(send, {"cleared": cleared})
        return await _error(send, Invalid("GET the failures, or POST to .../clear", 405, "BAD_REQUEST"))

    async def token_logins(self, scope, headers, path: str):
        """(the request with its access tokens as Basic logins, None), or (None, (status,
        body)) to answer. MLFLOW_TRACKING_TOKEN: a token becomes the password of its account,
        where MLflow's own login check (and the throttle) read it. Only token-shaped values
        are touched. On the gateway's routes Authorization is the provider's key, which MLflow
        sends on, and its login header is X-MLflow-Authorization: a token found in
        Authorization there (an OpenAI-style client's API key) moves to it, which MLflow
        strips before it calls the provider. A token of a deleted account, or sent as
        another account's password, is refused uncounted (it is no one's wrong password)."""
        gateway = path.startswith("/gateway/")
        names = ([GATEWAY_LOGIN] if gateway or path == LOGIN_CHECK else []) + ["authorization"]
        for name in names:
            value = headers.get(name, "")
            token, claimed = bearer_token(value), None
            if token is None:
                credentials = basic_credentials(value)
                if credentials is None or not by_token(value):
                    continue
                claimed, token = credentials
            if gateway and name == "authorization" and claimed is None and headers.get(GATEWAY_LOGIN, "").strip():
                continue  # the provider's key; the login is in X-MLflow-Authorization
            try:
                owner = await self.tokens.owner(token)
            except Exception as exc:  # noqa: BLE001 - the users' database: said, not a 500
                print(f"stack guard: tokens cannot be checked ({type(exc).__name__}: {str(exc)[:300]})",
                      file=sys.stderr, flush=True)
                return None, (503, b"Tokens cannot be checked now; try again shortly.\n")
            if owner is None or claimed not in (None, owner):
                return None, (401, b"Unknown, expired or revoked token.\n")
            if claimed is not None:
                continue  # a Basic login already: MLflow checks it
            if gateway and name == "authorization":
                scope = with_basic_login(without_header(scope, "authorization"), owner, token, GATEWAY_LOGIN)
            else:
                scope = with_basic_login(scope, owner, token, name)
        return scope, None

    async def token_call(self, scope, headers, receive, send, path: str) -> None:
        """Access tokens: GET lists the caller's (an admin's: everyone's, or ?username=),
        POST .../create {"name", "expires", "username" (admins only)} makes one and
        shows it once, POST .../revoke {"id"} revokes one. With the password only."""
        import stack_tokens

        if self.tokens is None:
            return await _error(send, Invalid("authentication is off: there are no tokens", 404,
                                              "ENDPOINT_NOT_FOUND"))
        header = headers.get("authorization", "")
        login = await self.logins.verify(scope, headers, header)
        if login is None or not login.ok:
            return await (_refused(send, login) if login is not None else _status(send, 401, NOT_AUTHENTICATED))
        caller = basic_credentials(header)[0]
        if by_token(header):
            return await _error(send, Invalid("tokens are made and revoked with the password, not with a token",
                                              403, "PERMISSION_DENIED"))
        admin = bool(login.user.is_admin)
        try:
            if path == TOKENS and scope["method"] == "GET":
                query = urllib.parse.parse_qs(scope.get("query_string", b"").decode())
                whose = query.get("username", [None])[0] if admin else caller
                rows = await asyncio.to_thread(self.tokens.store.list, whose)
                return await _json(send, {"tokens": rows})
            if scope["method"] != "POST" or path == TOKENS:
                return await _error(send, Invalid("GET the tokens, or POST to .../create or .../revoke", 405,
                                                  "BAD_REQUEST"))
            if not json_body(headers):
                return await _error(send, Invalid("send a JSON object (Content-Type: application/json)", 415,
                                                  "BAD_REQUEST"))
            try:
                body = await small_json(receive)
                assert isinstance(body, dict)
            except (ValueError, TypeError, AssertionError):
                return await _error(send, Invalid("send a JSON object"))
            if path == TOKENS_CREATE:
                owner = body.get("username") or caller
                if owner != caller and not admin:
                    return await _error(send, Invalid("only an MLflow admin may make a token for another account",
                                                      403, "PERMISSION_DENIED"))
                made = await asyncio.to_thread(self.tokens.create, owner, str(body.get("name", "")),
                                               str(body.get("expires", "")), caller)
                print(f"stack guard: {caller!r} made the token {made['id']} ({made['name']!r}) of {owner!r}, "
                      f"expiring {made['expires_at']}", file=sys.stderr, flush=True)
                return await _json(send, made)
            revoked = await asyncio.to_thread(self.tokens.store.revoke, str(body.get("id", "")),
                                              None if admin else caller)
            self.tokens.forget(revoked["id"])
            self.tokens.forget_logins(revoked["username"])
            print(f"stack guard: {caller!r} revoked the token {revoked['id']} of {revoked['username']!r}",
                  file=sys.stderr, flush=True)
            return await _json(send, revoked)
        except stack_tokens.TokenError as exc:
            return await _error(send, Invalid(str(exc)))

    async def login_check(self, scope, headers, send) -> None:
        """nginx's auth_request before it reads a large request body: 204 for a good
        login, 401 for none or a wrong one, 403 (with X-Stack-Retry-After) for a held
        one (auth_request passes only these on; nginx answers the client 429)."""
        if self.logins is None:
            return await _status(send, 204)
        # The original path is nginx's: the gateway's login header counts whenever it is set.
        login = await self.logins.verify(scope, headers, login_header("/gateway/", headers))
        if login is not None and login.ok:
            return await _status(send, 204)
        if login is not None and login.held:
            return await _status(send, 403, extra=[(b"x-stack-retry-after", str(login.held).encode())])
        await _status(send, 401)


def joined_headers(scope: dict) -> dict[str, str]:
    """The request's headers as Flask sees them: a name given twice has its values joined
    with commas (the WSGI layer does so), so `Content-Type: text/plain` beside
    `Content-Type: application/json` is not JSON here either."""
    headers: dict[str, str] = {}
    for key, value in scope["headers"]:
        name, text = key.decode("latin-1").lower(), value.decode("latin-1")
        headers[name] = f"{headers[name]},{text}" if name in headers else text
    return headers


def whole_small_answers(send):
    """An API answer's status line and headers go out with its body, not on their own.

    uvicorn writes each ASGI message as it comes; Flask's answers come through a thread,
    so headers and body can leave a few milliseconds apart. A server process killed in
    between leaves nginx with headers it has already passed on (so it can neither answer
    502 nor send the request to another replica) and the client with a cut connection and
    no answer: seen once in 1,353 calls while a replica was killed (the e2e replica test). Held
    here, the two writes follow each other at once; a streamed answer's first part is sent
    as soon as it comes."""
    held = None

    async def send_whole(message):
        nonlocal held
        if message["type"] == "http.response.start":
            held = message
            return
        if held is not None:
            start, held = held, None
            await send(start)
        await send(message)

    return send_whole


def admin_verdict(header: str) -> bool | None:
    """True: an MLflow admin's Basic login; False: another user's; None: no valid login.

    MLflow's own check (`_authenticate_cached`, as its FastAPI routes use): the same
    login cache, cleared when a password changes or a user goes, and the same
    refusal of the old default admin password."""
    credentials = basic_credentials(header)
    if credentials is None:
        return None
    from mlflow.server import auth

    user = auth._authenticate_cached(*credentials)
    return None if user is None else bool(user.is_admin)


async def _status(send, status: int, body: bytes = b"", extra=()) -> None:
    headers = [(b"content-length", str(len(body)).encode()), *extra]
    if body:
        headers.append((b"content-type", b"text/plain; charset=utf-8"))
    if status == 401:
        headers.append((b"www-authenticate", b'Basic realm="mlflow"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _json(send, payload: dict, status: int = 200, extra=()) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]})
    await send({"type": "http.response.body", "body": body})


async def _refused(send, verdict) -> None:
    """A login refused before MLflow saw it: 401 as MLflow answers a wrong one, or
    429 with Retry-After for a held one (MLflow's client waits and tries again)."""
    if not verdict.held:
        return await _status(send, 401, NOT_AUTHENTICATED)
    message = (f"Too many failed logins for this account or from this address: try again in "
               f"{verdict.held} s.")
    await _json(send, {"error_code": "RESOURCE_EXHAUSTED", "message": message}, 429,
                [(b"retry-after", str(verdict.held).encode())])


def sent_by_nginx(headers: dict[str, str], token: str | None) -> bool:
    """Whether a request carries nginx's token (STACK_NGINX_TOKEN in FROM_NGINX, which
    nginx sets, replacing a client's own)."""
    return token is not None and hmac.compare_digest(headers.get(FROM_NGINX_KEY, "").encode(), token.encode())


def loopback(scope: dict) -> bool:
    client = scope.get("client") or ("", 0)
    return client[0] in ("127.0.0.1", "::1")


def login_header(path: str, headers: dict[str, str]) -> str:
    """The header MLflow reads a login from: on its gateway routes X-MLflow-Authorization
    when it is set (the provider's key takes Authorization there), else Authorization."""
    if path.startswith("/gateway/") and headers.get(GATEWAY_LOGIN, "").strip():
        return headers[GATEWAY_LOGIN]
    return headers.get("authorization", "")


def without_header(scope: dict, header: str) -> dict:
    return {**scope, "headers": [(k, v) for k, v in scope["headers"] if k.lower() != header.encode()]}


def with_basic_login(scope: dict, username: str, password: str, header: str = "authorization") -> dict:
    """The request with one login header replaced by a Basic login."""
    encoded = base64.b64encode(f"{username}:{password}".encode()).decode()
    return {**scope, "headers": without_header(scope, header)["headers"]
            + [(header.encode(), f"Basic {encoded}".encode())]}


def bearer_token(header: str) -> str | None:
    """The access token in a `Bearer` header, when it has a token's shape (another bearer
    credential, e.g. a provider's key on the gateway's routes, is left alone)."""
    import stack_tokens

    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    return value if scheme.lower() == "bearer" and stack_tokens.parse(value) is not None else None


def by_token(header: str) -> bool:
    """Whether a Basic login's password is an access token."""
    import stack_tokens

    credentials = basic_credentials(header)
    return credentials is not None and stack_tokens.parse(credentials[1]) is not None


def json_body(headers: dict[str, str]) -> bool:
    """Whether a request says its body is JSON: a browser sends that cross-site only after
    asking (CORS), unlike a form, so the stack's own POST endpoints take nothing else."""
    return headers.get("content-type", "").lower().startswith("application/json")


async def small_json(receive, limit: int = 65536):
    """A small request body, parsed (ValueError when it is not JSON or over `limit`)."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if len(body) > limit:
            raise ValueError("body too large")
        if not message.get("more_body"):
            break
    return json.loads(body or b"{}")


class TokenOwners:
    """The guard's side of access tokens: who a bearer token belongs to (remembered
    for MLFLOW_AUTH_CACHE_SECONDS, as MLflow remembers a checked login), and the
    store's commands."""

    def __init__(self, store, ttl: float):
        self.store = store
        self.ttl = ttl
        self._owners: dict[str, tuple[str | None, float]] = {}

    async def owner(self, token: str) -> str | None:
        import stack_tokens

        token_id = stack_tokens.parse(token)
        if token_id is None:
            return None
        now = time.monotonic()
        known = self._owners.get(token_id)
        if known is not None and known[1] > now:
            return known[0]
        owner = await asyncio.to_thread(self.store.owner, token)
        if len(self._owners) > 10_000:
            self._owners = {k: v for k, v in self._owners.items() if v[1] > now}
        # An unknown id is remembered too (up to a bound): a made-up token costs one query.
        if len(self._owners) <= 10_000:
            self._owners[token_id] = (owner, now + self.ttl)
        return owner

    def forget(self, token_id: str) -> None:
        self._owners.pop(token_id, None)

    @staticmethod
    def forget_logins(username: str) -> None:
        """This worker's cached logins of an account (a token of it was revoked here): its
        other workers drop theirs within MLFLOW_AUTH_CACHE_SECONDS."""
        from mlflow.server import auth

        invalidate = getattr(auth, "_invalidate_user_auth_cache", None)
        if invalidate is not None:
            invalidate(username)

    def create(self, username: str, name: str, expires: str, created_by: str) -> dict:
        import stack_tokens
        from mlflow.exceptions import MlflowException
        from mlflow.server import auth

        try:
            user = auth.store.get_user(username)
        except MlflowException:
            raise stack_tokens.TokenError(f"there is no account {username!r}") from None
        return self.store.create(username, int(user.id), name, expires, created_by)


def tokens_as_passwords(tokens) -> None:
    """MLflow's password check (`store.authenticate_user`, under its login cache, on
    its Flask and FastAPI routes alike) takes an account's token in place of its password."""
    import stack_tokens
    from mlflow.exceptions import MlflowException
    from mlflow.server import auth

    def make(check):
        def authenticate_user(username: str, password: str, *args, **kwargs) -> bool:
            if stack_tokens.parse(password) is None:
                return check(username, password, *args, **kwargs)
            try:
                user = auth.store.get_user(username)
            except MlflowException:  # no such account
                return False
            return tokens.verify(username, int(user.id), password)
        return authenticate_user

    replace_once(auth.store, "authenticate_user", make)


def basic_credentials(header: str) -> tuple[str, str] | None:
    """(user name, password) of a Basic login as MLflow reads it (Werkzeug on its Flask
    routes, its own code on the FastAPI ones): base64 not strictly checked, no colon
    meaning an empty password. None when MLflow finds no Basic login in it either."""
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        username, _, password = base64.b64decode(encoded.strip()).decode("utf-8").partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    return username, password


def client_address(scope: dict, headers: dict[str, str]) -> str:
    """The client's address: nginx's X-Real-IP (only nginx reaches the server), else the peer's."""
    real = headers.get("x-real-ip", "").strip()
    if real:
        return real
    client = scope.get("client") or ("", 0)
    return client[0] or "unknown"


class Logins:
    """Logins checked by the guard: MLflow's login cache first (no cost), then the
    throttle (mlflow/stack_logins.py), then MLflow's own password check."""

    def __init__(self, throttle):
        self.throttle = throttle
        # One unchecked login per account at a time in this worker: guesses sent
        # side by side would otherwise all pass the throttle before the first
        # failure is counted. Waiting here holds no thread and no connection.
        self._checking: dict[str, list] = {}
        # Holds this worker has answered, until they end: a guesser's further tries
        # are answered from here, without a query (at hundreds a second).
        self._holds: dict[tuple[str, str], float] = {}
        self._failed = self._held = None
        try:
            from prometheus_client import Counter

            if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
                self._failed = Counter("mlflow_stack_failed_logins", "Logins refused for a wrong password or "
                                       "an unknown user (each cost a password check)")
                self._held = Counter("mlflow_stack_held_logins", "Logins refused unchecked (429): their "
                                     "account or address had failed too often")
        except ImportError:
            pass

    @staticmethod
    def bump(counter) -> None:
        if counter is not None:
            counter.inc()

    def forget_holds(self, username: str) -> None:
        """This worker's remembered holds of an account (an admin cleared its failures)."""
        self._holds = {k: v for k, v in self._holds.items() if k[0] != username}

    def remember_hold(self, username: str, address: str, seconds: int) -> None:
        if not seconds:
            return
        now = time.monotonic()
        if len(self._holds) > 10_000:
            self._holds = {k: v for k, v in self._holds.items() if v > now}
        if len(self._holds) <= 10_000:
            self._holds[(username, address)] = now + seconds

    @staticmethod
    def cached(username: str, password: str):
        from mlflow.server import auth

        if auth._USER_AUTH_CACHE is None:
            return None
        key = auth._auth_cache_key(username, password)
        with auth._USER_AUTH_CACHE_LOCK:
            return auth._USER_AUTH_CACHE.get(key)

    async def verify(self, scope, headers, header: str):
        """A Verdict (stack_logins) for the Basic login in `header`; None when it has
        none (MLflow answers). Should the throttle's database fail, the login is checked
        unthrottled (and said so), never refused for it."""
        import stack_logins
        import stack_tokens
        from mlflow.server import auth

        credentials = basic_credentials(header)
        if credentials is None:
            return None
        username, password = credentials
        user = self.cached(username, password)
        if user is not None:
            return stack_logins.Verdict(True, user=user)
        if stack_tokens.parse(password) is not None:
            # An access token is checked as a token only, never as a password, and costs a
            # query, not a hash: a refused one (revoked, expired: a CI job not yet told) is not
            # a guess at the account's password, and is not counted against it or its address.
            user = await asyncio.to_thread(auth._authenticate_cached, username, password)
            return stack_logins.Verdict(user is not None, user=user)
        address = client_address(scope, headers)
        now = time.monotonic()
        until = self._holds.get((username, address), 0)
        if until > now:
            self.bump(self._held)
            return stack_logins.Verdict(False, held=math.ceil(until - now))
        entry = self._checking.setdefault(username, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            async with entry[0]:
                user = self.cached(username, password)  # checked while this one waited
                if user is not None:
                    return stack_logins.Verdict(True, user=user)
                verdict = await asyncio.to_thread(self.throttle.check, username, address,
                                                  lambda: auth._authenticate_cached(username, password))
        except Exception as exc:  # noqa: BLE001 - the login is still checked, unthrottled
            print(f"stack guard: login throttle unavailable ({type(exc).__name__}: {exc}); "
                  "logins are checked unthrottled", file=sys.stderr, flush=True)
            user = await asyncio.to_thread(auth._authenticate_cached, username, password)
            return stack_logins.Verdict(user is not None, user=user)
        finally:
            entry[1] -= 1
            if not entry[1]:
                del self._checking[username]
        if verdict.held:
            self.bump(self._held)
            self.remember_hold(username, address, verdict.held)
        elif not verdict.ok:
            self.bump(self._failed)
            self.remember_hold(username, address, verdict.holds_for)
            held = f"; held for {verdict.holds_for} s" if verdict.holds_for else ""
            print(f"stack guard: failed login for {username!r} from {address} ({verdict.failures} in a row for "
                  f"the account{held})", file=sys.stderr, flush=True)
        return verdict


def storage_full(text: str) -> str | None:
    """What is full, if an upload's failure (an exception chain or a response
    body) says that something is."""
    if STORE_FULL_CODE in text:
        return f"the artifact store is full (the object store refused the upload: {STORE_FULL_CODE})"
    if "No space left on device" in text:
        return "the MLflow server's disk is full (no room to take the upload in)"
    return None


def _chain_text(exc: BaseException) -> str:
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen and len(parts) < 10:
        seen.add(id(exc))
        parts.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


async def _store_full(send, reason: str) -> None:
    print(f"stack guard: artifact upload refused with 507: {reason}", file=sys.stderr, flush=True)
    await _error(send, Invalid(f"{reason[0].upper()}{reason[1:]}. Nothing was stored. {STORE_FULL_ADVICE}",
                               507, "RESOURCE_EXHAUSTED"))


def unprefixed(scope: dict, path: str, base_path: str) -> dict:
    """The request as MLflow's streaming artifact route expects it: at the root."""
    raw = scope.get("raw_path") or scope["path"].encode()
    prefix = base_path.encode()
    return {**scope, "path": path, "raw_path": raw[len(prefix):] if raw.startswith(prefix + b"/") else path.encode()}


async def _error(send, exc: Invalid) -> None:
    await _json(send, {"error_code": exc.code, "message": str(exc)}, exc.status)


class SingleFlight:
    """One call per key at a time: callers that arrive while it runs wait for it
    and get its result (or its exception), as Go's singleflight does."""

    def __init__(self):
        self._guard = threading.Lock()
        self._calls: dict = {}

    def run(self, key, fn):
        with self._guard:
            call = self._calls.get(key)
            leader = call is None
            if leader:
                call = self._calls[key] = {"done": threading.Event()}
        if not leader:
            call["done"].wait()
            if "error" in call:
                raise call["error"]
            return call["result"]
        try:
            call["result"] = fn()
            return call["result"]
        except BaseException as exc:
            call["error"] = exc
            raise
        finally:
            with self._guard:
                del self._calls[key]
            call["done"].set()


def replace_once(owner, name: str, make) -> None:
    """owner.name = make(the original), unless an earlier app in this process did."""
    original = getattr(owner, name)
    if getattr(original, "replaced_by_stack", False):
        return
    replacement = make(original)
    replacement.replaced_by_stack = True
    setattr(owner, name, replacement)


# A proxied artifact download the server has checked (login, permission) is
# handed to nginx (X-Accel-Redirect to NGINX_FETCH), which streams the object
# from the store: the worker neither copies the file to its disk first nor
# relays it (MLflow 3.17 does both). The fetch is signed in headers, not in a
# presigned URL, so that no credential is in a URL nginx might log.
NGINX_FETCH = "/_stack/s3-fetch"
# nginx sets it on every request it passes on, to STACK_NGINX_TOKEN (a client's own
# is overwritten): the server answers nobody else, and an answer meant for nginx
# goes to nobody else.
FROM_NGINX = "X-Stack-From-Nginx"
FROM_NGINX_KEY = FROM_NGINX.lower()
NGINX_TOKEN: str | None = None
# Set by the guard for a request that carried nginx's token (the header itself is removed).
FROM_NGINX_REQUEST: contextvars.ContextVar[bool] = contextvars.ContextVar("stack_from_nginx", default=False)
# MLflow's gateway routes read the login from here (mlflow.gateway.constants).
GATEWAY_LOGIN = "x-mlflow-authorization"
FETCH_HEADERS = ("X-Stack-S3-Path", "X-Stack-S3-Authorization", "X-Stack-S3-Date", "X-Stack-S3-Content-Sha256")


class NginxFetch:
    """How nginx fetches an artifact from the store's internal endpoint: its
    path, signature and date (FETCH_HEADERS), or None (MLflow answers)."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint.rstrip("/")
        self._session = self._client = None
        self._lock = threading.Lock()

    def client(self):
        with self._lock:
            if self._client is None:
                import boto3
                from botocore.config import Config

                # Its own session: boto3's default one is not for threads. Credentials
                # and region are the server's own (AWS_* in its environment). A store
                # that does not answer soon leaves the download to MLflow.
                self._session = boto3.session.Session()
                self._client = self._session.client("s3", endpoint_url=self.endpoint, config=Config(
                    signature_version="s3v4", s3={"addressing_style": "path"}, connect_timeout=3,
                    read_timeout=10, retries={"total_max_attempts": 1}))
            return self._client

    def sign(self, bucket: str, key: str) -> tuple[str, str, str, str]:
        """(path, Authorization, X-Amz-Date, X-Amz-Content-SHA256) of a GET of the
        object, SigV4 (the last: the digest of its empty body, as botocore signs it)."""
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest

        client = self.client()
        path = "/" + urllib.parse.quote(f"{bucket}/{key}", safe="/~")
        request = AWSRequest(method="GET", url=self.endpoint + path)
        S3SigV4Auth(self._session.get_credentials().get_frozen_credentials(), "s3",
                    client.meta.region_name or "us-east-1").add_auth(request)
        return (path, request.headers["Authorization"], request.headers["X-Amz-Date"],
                request.headers["X-Amz-Content-SHA256"])

    def locate(self, artifact_path: str) -> tuple[str, tuple[str, str, str, str]] | None:
        """(file name, FETCH_HEADERS values) of an object in the stack's store."""
        import posixpath

        from botocore.exceptions import BotoCoreError, ClientError
        from mlflow.server import artifact_router
        from mlflow.store.artifact.s3_artifact_repo import S3ArtifactRepository
        from mlflow.utils.uri import validate_path_is_safe

        try:
            if not artifact_router._is_serving_proxied_artifacts():
                return None
            path = artifact_router._get_workspace_scoped_path(validate_path_is_safe(artifact_path))
            repo = artifact_router._get_artifact_repo()
        except Exception:  # noqa: BLE001 - MLflow's route gives its own answer
            return None
        if not isinstance(repo, S3ArtifactRepository):
            return None
        bucket, prefix = repo.parse_s3_compliant_uri(repo.artifact_uri)
        key = posixpath.join(prefix, path)
        try:
            # A file, not a folder or nothing: those keep MLflow's answers (so does
            # a store that does not answer).
            self.client().head_object(Bucket=bucket, Key=key)
        except (ClientError, BotoCoreError):
            return None
        return posixpath.basename(path), self.sign(bucket, key)


def artifact_downloads_by_nginx(environ=None) -> None:
    """Serve proxied artifact downloads through nginx (NGINX_FETCH), when the
    artifacts are in the stack's own store (S3_ENDPOINT_URL empty; a store
    elsewhere is not nginx's to reach). The route is MLflow's (its auth checks
    the request before it), with another endpoint; done before the app is
    built, which copies the routes."""
    environ = os.environ if environ is None else environ
    endpoint = environ.get("S3_INTERNAL_ENDPOINT", "")
    if environ.get("S3_ENDPOINT_URL") or not endpoint:
        return
    from fastapi import Request
    from fastapi.responses import Response
    from mlflow.server import artifact_router
    from mlflow.server.handlers import _content_disposition_attachment
    from mlflow.utils.mime_type_utils import _guess_mime_type

    fetch = NginxFetch(endpoint)

    def make(original):
        async def download_artifact(artifact_path: str, request: Request):
            found = None
            if FROM_NGINX_REQUEST.get():
                found = await asyncio.to_thread(fetch.locate, artifact_path)
            if found is None:
                return await original(artifact_path)
            name, values = found
            return Response(headers={"X-Accel-Redirect": NGINX_FETCH, **dict(zip(FETCH_HEADERS, values)),
                                     "Content-Type": _guess_mime_type(name),
                                     "Content-Disposition": _content_disposition_attachment(name),
                                     "X-Content-Type-Options": "nosniff"})
        # FastAPI reads the parameters from these; this module's postponed
        # annotations would be strings it cannot resolve (Request is not global here).
        download_artifact.__annotations__ = {"artifact_path": str, "request": Request}
        return download_artifact

    original = artifact_router.download_artifact
    replacement = make(original)
    replacement.replaced_by_stack = True
    for route in artifact_router.artifact_router.routes:
        if getattr(route, "endpoint", None) is original:
            route.endpoint = replacement


def single_flight_logins() -> None:
    """When a cached login expires under load, every request in flight with it
    misses MLflow's login cache at once and each checks the password (PBKDF2,
    ~0.2 s of CPU): 16 client threads cost 3 s of CPU per worker every
    MLFLOW_AUTH_CACHE_SECONDS. Here one request checks it and the others in
    flight with the same login get its answer; so do those with the same wrong
    password (one check instead of one each, one after another). A login that
    arrives after the check is checked again, or found in the cache."""
    from mlflow.server import auth

    if auth._USER_AUTH_CACHE is None:
        return
    flights = SingleFlight()

    def make(check):
        def authenticate(username: str, password: str):
            return flights.run(auth._auth_cache_key(username, password), lambda: check(username, password))
        return authenticate

    replace_once(auth, "_authenticate_cached", make)


def admin_flag_from_login_cache() -> None:
    """MLflow's Flask routes ask the database whether the caller is an admin
    before every request (`sender_is_admin` in `_before_request`: a pooled
    connection's ping, a query and a commit), although the login that was just
    checked came from the login cache, which holds the user. Its FastAPI routes
    already use that cached user, so here the Flask routes do too: a changed
    admin flag takes effect on other workers within MLFLOW_AUTH_CACHE_SECONDS,
    as a changed password does. (A few validators, which only non-admins reach,
    keep MLflow's own function and still ask.)"""
    from mlflow.server import auth

    if auth._USER_AUTH_CACHE is None \
            or auth.auth_config.authorization_function != auth.DEFAULT_AUTHORIZATION_FUNCTION:
        return

    def make(ask_database):
        def sender_is_admin():
            login = auth.authenticate_request()
            user = auth._authenticate_cached(login.username, login.password)
            return ask_database() if user is None else bool(user.is_admin)
        return sender_is_admin

    replace_once(auth, "sender_is_admin", make)


INT64 = range(-(1 << 63), 1 << 63)
FAST_METRIC_FIELDS = {"key", "value", "timestamp", "step"}
SPECIAL_FLOAT_VALUES = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}


def fast_metrics(items) -> list | None:
    """LogBatch metrics as protobuf's ParseDict makes them from the request's JSON, for the
    plain form MLflow's clients send: {key, value, timestamp[, step]}, numbers as JSON numbers
    (a value may be "NaN", "Infinity" or "-Infinity"). None for anything else."""
    from mlflow.protos.service_pb2 import Metric

    made = []
    for item in items:
        if type(item) is not dict or not item.keys() <= FAST_METRIC_FIELDS:
            return None
        key, value, timestamp, step = item.get("key"), item.get("value"), item.get("timestamp"), item.get("step", 0)
        if type(key) is not str or type(timestamp) is not int or type(step) is not int \
                or timestamp not in INT64 or step not in INT64:
            return None
        if type(value) is float:
            pass
        elif type(value) is int and abs(value) < (1 << 53):
            value = float(value)
        elif type(value) is str and value in SPECIAL_FLOAT_VALUES:
            value = SPECIAL_FLOAT_VALUES[value]
        else:
            return None
        fields = {"key": key, "value": value, "timestamp": timestamp}
        if "step" in item:
            fields["step"] = step
        made.append(Metric(**fields))
    return made


def fast_log_batch_parsing() -> None:
    """MLflow turns a request's JSON into its protobuf message with protobuf's pure-Python
    ParseDict: 22 ms of CPU per 1000 metrics of a log_batch here, about 40% of the server's
    CPU for it, against 2 ms built directly. Here a log_batch's metrics in the plain form its
    clients send are built directly, the same messages (a unit test compares the bytes);
    everything else, and anything unusual in them, goes through ParseDict as before."""
    from mlflow.protos.service_pb2 import LogBatch
    from mlflow.server import handlers

    def make(parse_dict):
        def parse(js_dict, message):
            metrics = js_dict.get("metrics") if type(message) is LogBatch and type(js_dict) is dict else None
            made = fast_metrics(metrics) if type(metrics) is list and metrics else None
            if made is None:
                return parse_dict(js_dict, message)
            parse_dict({k: v for k, v in js_dict.items() if k != "metrics"}, message)
            message.metrics.extend(made)
        return parse

    replace_once(handlers, "parse_dict", make)


def tcp_nodelay_on_accepted_connections() -> None:
    """With several workers, uvicorn accepts on a socket it made as
    socket.socket(AF_INET), whose proto is 0, and asyncio sets TCP_NODELAY only
    where the proto says TCP (Kludex/uvicorn#3149). An answer on a kept-alive
    connection then waits for the client's delayed ACK: 48 ms per API call here,
    against ~1 ms. nginx keeps its connections to the server alive from 1.29.7
    on (the pinned 1.30 does), so every call through it would wait. Here every
    TCP connection the server accepts gets TCP_NODELAY. Not needed once uvicorn
    fixes #3149."""
    import asyncio.base_events
    import socket

    def make(_asyncios_own):
        def set_nodelay(sock):
            if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM \
                    and sock.proto in (0, socket.IPPROTO_TCP):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return set_nodelay

    replace_once(asyncio.base_events, "_set_nodelay", make)


class FlaskCallsDirect:
    """MLflow's app, with the calls its router gives to Flask handed to Flask at once.

    MLflow 3.17 serves its REST API from a Flask app mounted at the root of a
    FastAPI app, and each call first passes FastAPI's middleware: host and
    origin checks, security headers, the workspace context, permission checks
    for FastAPI's own routes, telemetry (a body limit too, which MLflow leaves
    unset); several of them BaseHTTPMiddleware, which runs the rest of the call
    in a task of its own. (Such calls no longer reach FastAPI's own telemetry.)
    For a call Flask serves, Flask does the host and origin checks and sets the
    headers again itself (mlflow.server.security, applied to it in a server),
    and so do its auth plugin (login and permission) and workspace handler, so
    nothing is checked less here: 2-3 ms of a log_metric's 5-8 ms in a worker
    went to that layer. Anything else (FastAPI's own routes, a path whose route
    cannot be told) takes MLflow's way, as does every call when Flask's own
    checks are not in place (MLflow adds them only in a server process)."""

    MAX_REMEMBERED = 1024

    def __init__(self, app):
        self.app = app
        self.flask = flask_mount(app)
        self._reaches_flask: dict = {}
        if self.flask is not None:
            from starlette.routing import Match

            self._full = Match.FULL

    def route(self, scope: dict):
        """The app to call with the scope it expects: Flask's for its calls."""
        # CORS preflights keep FastAPI's answer (Flask's differs in its headers).
        if self.flask is None or scope["type"] != "http" or scope["method"] == "OPTIONS":
            return self.app, scope
        key = (scope["method"], scope["path"], scope.get("root_path", ""))
        reaches = self._reaches_flask.get(key)
        if reaches is None:
            # Starlette's router: the first route that matches in full takes it.
            first = next((r for r in self.app.routes if r.matches(scope)[0] == self._full), None)
            reaches = first is self.flask
            self._reaches_flask[key] = reaches
            if len(self._reaches_flask) > self.MAX_REMEMBERED:
                # Paths with IDs in them are many: the oldest answer goes (dicts keep order).
                del self._reaches_flask[next(iter(self._reaches_flask))]
        if not reaches:
            return self.app, scope
        return self.flask.app, {**scope, **self.flask.matches(scope)[1]}

    async def __call__(self, scope, receive, send):
        app, scope = self.route(scope)
        return await app(scope, receive, send)


def flask_mount(app):
    """The route by which MLflow's FastAPI app hands calls to its Flask app, when
    Flask checks them itself (MLflow's security hooks are on it); else None."""
    try:
        from mlflow.server import app as flask_app
        from mlflow.server.fastapi_app import _EfficientWSGIMiddleware
        from starlette.routing import Mount
    except ImportError:
        return None
    hooks = {f.__name__ for f in flask_app.after_request_funcs.get(None, [])}
    if "add_security_headers" not in hooks:
        return None
    mounts = [r for r in getattr(app, "routes", []) if isinstance(r, Mount)
              and isinstance(r.app, _EfficientWSGIMiddleware) and r.app.app is flask_app]
    return mounts[0] if len(mounts) == 1 else None


def create_app():
    import internals

    internals.require("the MLflow server (mlflow/stack_guard.py)")
    tcp_nodelay_on_accepted_connections()
    fast_log_batch_parsing()
    artifact_downloads_by_nginx()
    global NGINX_TOKEN
    NGINX_TOKEN = common.secret("STACK_NGINX_TOKEN")
    auth = os.environ.get("MLFLOW_STACK_AUTH", "true") == "true"
    logins = tokens = None
    if auth:
        import stack_logins
        import stack_tokens
        from mlflow.server import auth as auth_module
        from mlflow.server.auth import create_app as create_auth_app

        inner = create_auth_app()
        single_flight_logins()
        admin_flag_from_login_cache()
        logins = Logins(stack_logins.Throttle(auth_module.store.engine, int(os.environ["LOGIN_FREE_FAILURES"]),
                                              int(os.environ["LOGIN_LOCK_MAX_SECONDS"])))
        store = stack_tokens.Tokens(auth_module.store.engine)
        tokens_as_passwords(store)
        tokens = TokenOwners(store, float(os.environ["MLFLOW_AUTH_CACHE_SECONDS"]))
    else:
        # Built here, not MLflow's module-level app: that one may have copied the
        # routes before artifact_downloads_by_nginx() changed one.
        from mlflow.server.fastapi_app import create_fastapi_app

        inner = create_fastapi_app()
    return Guard(FlaskCallsDirect(inner), auth, int(os.environ["MLFLOW_API_MAX_BODY_MB"]) << 20,
                 os.environ.get("MLFLOW_BASE_PATH", ""), logins, NGINX_TOKEN, tokens)

