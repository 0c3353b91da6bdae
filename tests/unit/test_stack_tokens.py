"""Access tokens (mlflow/stack_tokens.py) on a real SQL database (SQLite here, PostgreSQL
end to end), and how the guard takes them (mlflow/stack_guard.py), without a server."""

import asyncio
import base64
import importlib.util
import json
import sys
from datetime import timedelta

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import StaticPool

from stack.paths import ROOT

sys.path.insert(0, str(ROOT / "mlflow"))
import stack_tokens  # noqa: E402

_spec = importlib.util.spec_from_file_location("stack_guard_for_tokens", ROOT / "mlflow" / "stack_guard.py")
guard = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(guard)


@pytest.fixture
def tokens():
    # One connection: the guard reads it from worker threads.
    engine = create_engine("sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False})
    with engine.begin() as conn:
        # MLflow's accounts (its users table, in the same database), as the tokens' owners.
        conn.execute(text("CREATE TABLE users (id integer PRIMARY KEY, username varchar(255) UNIQUE)"))
        conn.execute(text("INSERT INTO users VALUES (1, 'admin'), (7, 'ann'), (9, 'bob')"))
        for statement in stack_tokens.SCHEMA:
            conn.execute(text(statement))
    return stack_tokens.Tokens(engine)


def test_a_token_is_shown_once_and_kept_as_a_digest(tokens):
    made = tokens.create("ann", 7, "ci-nightly", "90d", "admin")
    assert stack_tokens.parse(made["token"]) == made["id"]
    with tokens.engine.begin() as conn:
        stored = conn.execute(text("SELECT * FROM stack_tokens")).mappings().one()
    assert made["token"] not in json.dumps({k: str(v) for k, v in stored.items()})
    assert stored["digest"] == stack_tokens.digest(made["token"])
    assert tokens.verify("ann", 7, made["token"]) and tokens.owner(made["token"]) == "ann"
    [row] = tokens.list("ann")
    assert row["state"] == "live" and row["last_used_at"] and row["created_by"] == "admin"
    assert "token" not in row and "digest" not in row


def test_only_the_exact_token_of_that_account_passes(tokens):
    made = tokens.create("ann", 7, "ci", "1d", "ann")["token"]
    token_id = stack_tokens.parse(made)
    wrong_secret = f"{stack_tokens.PREFIX}{token_id}_{'A' * 43}"
    assert not tokens.verify("ann", 7, wrong_secret)
    assert tokens.owner(wrong_secret) == "ann"  # the secret is checked with the login, and counted there
    assert not tokens.verify("bob", 7, made)
    # An account deleted and made again under the same name gets a new id: not its tokens,
    # which are unknown then (not a failed login of the new account).
    assert not tokens.verify("ann", 8, made)
    with tokens.engine.begin() as conn:
        conn.execute(text("DELETE FROM users WHERE id = 7"))
        conn.execute(text("INSERT INTO users VALUES (8, 'ann')"))
    assert tokens.owner(made) is None and not tokens.verify("ann", 8, made) and not tokens.verify("ann", 7, made)
    assert tokens.list("ann")[0]["state"] == "account-deleted"
    assert not tokens.verify("ann", 7, made[:-1])
    assert tokens.owner(f"{stack_tokens.PREFIX}{'0' * 16}_{'A' * 43}") is None


def test_revoked_and_expired_tokens_stop_working(tokens, monkeypatch):
    live = tokens.create("ann", 7, "a", "1d", "ann")
    gone = tokens.create("ann", 7, "b", "1d", "ann")
    short = tokens.create("ann", 7, "c", "30m", "ann")
    tokens.revoke(gone["id"], "ann")
    assert not tokens.verify("ann", 7, gone["token"]) and tokens.owner(gone["token"]) is None
    later = stack_tokens.now() + timedelta(minutes=31)
    monkeypatch.setattr(stack_tokens, "now", lambda: later)
    assert not tokens.verify("ann", 7, short["token"]) and tokens.owner(short["token"]) is None
    assert tokens.verify("ann", 7, live["token"])
    states = {row["name"]: row["state"] for row in tokens.list("ann")}
    assert states == {"a": "live", "b": "revoked", "c": "expired"}
    # An expired token's name is free again (the old one still listed as expired); a live one's is not.
    tokens.create("ann", 7, "c", "1d", "ann")
    assert sorted(row["state"] for row in tokens.list("ann") if row["name"] == "c") == ["expired", "live"]
    with pytest.raises(stack_tokens.TokenError, match="already has a token named 'a'"):
        tokens.create("ann", 7, "a", "1d", "ann")
    with pytest.raises(stack_tokens.TokenError, match="no token"):
        tokens.revoke(live["id"], "bob")
    tokens.revoke(live["id"], None)  # an admin's
    assert not tokens.verify("ann", 7, live["token"])


@pytest.mark.parametrize("text_, error", [("0d", "use a number"), ("90", "use a number"), ("1y", "use a number"),
                                          ("366d", "at most 365 days"), ("9000h", "at most")])
def test_lifetimes_are_bounded(text_, error):
    with pytest.raises(stack_tokens.TokenError, match=error):
        stack_tokens.lifetime(text_)
    assert stack_tokens.lifetime("12h") == timedelta(hours=12)


def test_names_are_checked(tokens):
    for name in ("", "a b", "x" * 65, "-lead"):
        with pytest.raises(stack_tokens.TokenError, match="token name"):
            tokens.create("ann", 7, name, "1d", "ann")


def test_last_use_is_written_at_most_once_a_minute(tokens, monkeypatch):
    made = tokens.create("ann", 7, "ci", "1d", "ann")
    statements = []
    tokens.verify("ann", 7, made["token"])
    first = tokens.list()[0]["last_used_at"]
    from sqlalchemy import event

    event.listen(tokens.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    tokens.verify("ann", 7, made["token"])
    assert not [s for s in statements if s.startswith("UPDATE")]
    later = stack_tokens.now() + timedelta(minutes=2)
    monkeypatch.setattr(stack_tokens, "now", lambda: later)
    tokens.verify("ann", 7, made["token"])
    assert [s for s in statements if s.startswith("UPDATE")]
    assert tokens.list()[0]["last_used_at"] > first


# --- the guard ---------------------------------------------------------------------------

class _Logins:
    """guard.Logins' part the token calls use: a good login per (name, password)."""

    def __init__(self, good):
        self.good = good

    async def verify(self, scope, headers, header):
        import stack_logins

        credentials = guard.basic_credentials(header)
        if credentials is None:
            return None
        admin = credentials[0] == "admin"
        user = type("User", (), {"is_admin": admin})() if credentials in self.good else None
        return stack_logins.Verdict(user is not None, user=user)


class _Owners(guard.TokenOwners):
    def create(self, username, name, expires, created_by):
        return self.store.create(username, {"ann": 7, "admin": 1}[username], name, expires, created_by)


def _basic(user, password):
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _call(app, path, payload=b"", headers=(), method="POST"):
    sent = []

    async def receive():
        return {"type": "http.request", "body": payload, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "client": ("172.18.0.9", 4000), "query_string": b"",
             "headers": [(k.encode(), v.encode()) for k, v in headers]}
    asyncio.run(app(scope, receive, send))
    return sent


def _app(tokens, seen):
    async def inner(scope, receive, send):
        seen.append(dict(scope["headers"]).get(b"authorization", b"").decode())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    logins = _Logins({("ann", "pw-of-ann"), ("admin", "pw-of-admin")})
    return guard.Guard(inner, auth=True, max_body=1 << 20, logins=logins, tokens=_Owners(tokens, ttl=30))


def test_a_bearer_token_becomes_its_accounts_login(tokens):
    seen = []
    app = _app(tokens, seen)
    made = tokens.create("ann", 7, "ci", "1d", "ann")["token"]
    app.logins.good.add(("ann", made))  # as MLflow's check (tokens_as_passwords) takes it
    sent = _call(app, "/api/2.0/mlflow/experiments/search", b"{}",
                 [("authorization", f"Bearer {made}"), ("content-type", "application/json")])
    assert sent[0]["status"] == 200 and seen == [_basic("ann", made)]
    # A made-up or revoked one is answered at once, without reaching MLflow.
    sent = _call(app, "/api/2.0/mlflow/experiments/search", b"{}",
                 [("authorization", f"Bearer {stack_tokens.PREFIX}{'1' * 16}_{'A' * 43}")])
    assert sent[0]["status"] == 401 and len(seen) == 1
    # Another bearer credential is MLflow's to answer (it refuses it), untouched.
    sent = _call(app, "/api/2.0/mlflow/experiments/search", b"{}",
                 [("authorization", "Bearer not-a-token"), ("content-type", "application/json")])
    assert sent[0]["status"] == 200 and seen[-1] == "Bearer not-a-token"


def test_on_the_gateways_routes_the_providers_key_is_left_alone(tokens):
    """There Authorization is the provider's key (MLflow sends it on): a token goes in
    X-MLflow-Authorization, MLflow's login header there, and only that one is rewritten."""
    seen = []

    async def inner(scope, receive, send):
        seen.append(dict(scope["headers"]))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    logins = _Logins({("ann", "pw-of-ann")})
    app = guard.Guard(inner, auth=True, max_body=1 << 20, logins=logins, tokens=_Owners(tokens, ttl=30))
    made = tokens.create("ann", 7, "agent", "1d", "ann")["token"]
    logins.good.add(("ann", made))
    provider = f"Bearer {stack_tokens.PREFIX}{'2' * 16}_{'B' * 43}"  # even one shaped like a token
    sent = _call(app, "/gateway/openai/v1/chat/completions", b"{}",
                 [("authorization", provider), ("x-mlflow-authorization", f"Bearer {made}"),
                  ("content-type", "application/json")])
    assert sent[0]["status"] == 200
    assert seen[-1][b"authorization"].decode() == provider
    assert seen[-1][b"x-mlflow-authorization"].decode() == _basic("ann", made)
    # An OpenAI-style client with the token as its API key (in Authorization, no login header),
    # under a base path too: the token moves to MLflow's login header, which MLflow strips
    # before it calls the provider.
    for app_, prefix in ((app, ""), (guard.Guard(inner, auth=True, max_body=1 << 20, base_path="/mlflow",
                                                 logins=logins, tokens=_Owners(tokens, ttl=30)), "/mlflow")):
        sent = _call(app_, f"{prefix}/gateway/mlflow/v1/chat/completions", b"{}",
                     [("authorization", f"Bearer {made}"), ("content-type", "application/json")])
        assert sent[0]["status"] == 200
        assert b"authorization" not in seen[-1] and seen[-1][b"x-mlflow-authorization"].decode() == _basic("ann", made)


def test_a_token_as_another_or_a_deleted_accounts_password_is_refused_uncounted(tokens):
    """Not a wrong password of that account (the throttle would count it against a namesake)."""
    seen = []
    app = _app(tokens, seen)
    made = tokens.create("ann", 7, "ci", "1d", "ann")["token"]
    asked = []
    real = app.logins.verify

    async def counting(scope, headers, header):
        asked.append(header)
        return await real(scope, headers, header)

    app.logins.verify = counting
    sent = _call(app, "/api/2.0/mlflow/experiments/search", b"{}",
                 [("authorization", _basic("bob", made)), ("content-type", "application/json")])
    assert sent[0]["status"] == 401 and not asked and not seen
    with tokens.engine.begin() as conn:
        conn.execute(text("DELETE FROM users WHERE id = 7"))
    app.tokens.forget(stack_tokens.parse(made))
    sent = _call(app, "/api/2.0/mlflow/experiments/search", b"{}",
                 [("authorization", _basic("ann", made)), ("content-type", "application/json")])
    assert sent[0]["status"] == 401 and not asked and not seen


def test_tokens_are_made_listed_and_revoked_with_the_password_only(tokens):
    app = _app(tokens, [])
    ann = [("authorization", _basic("ann", "pw-of-ann")), ("content-type", "application/json")]

    def answer(sent):
        return sent[0]["status"], json.loads(sent[1]["body"])

    status, made = answer(_call(app, guard.TOKENS_CREATE, b'{"name": "laptop", "expires": "30d"}', ann))
    assert status == 200 and made["username"] == "ann" and made["token"].startswith(stack_tokens.PREFIX)
    # Not for another account (only an admin may), and not with a token.
    status, body = answer(_call(app, guard.TOKENS_CREATE, b'{"name": "x", "username": "admin"}', ann))
    assert status == 403 and "admin" in body["message"]
    with_token = [("authorization", _basic("ann", made["token"])), ("content-type", "application/json")]
    app.logins.good.add(("ann", made["token"]))
    for path, payload in ((guard.TOKENS_CREATE, b'{"name": "y"}'), (guard.TOKENS_REVOKE, b"{}")):
        status, body = answer(_call(app, path, payload, with_token))
        assert status == 403 and "password" in body["message"]
    for action in ("update-password", "create", "update-admin", "delete"):
        for prefix in ("/api", "/ajax-api"):
            status, body = answer(_call(app, f"{prefix}/2.0/mlflow/users/{action}", b'{"username": "ann"}',
                                        with_token))
            assert status == 403 and "cannot change accounts" in body["message"], (prefix, action)
    admin_token = tokens.create("admin", 1, "ci", "1d", "admin")["token"]
    app.logins.good.add(("admin", admin_token))
    status, body = answer(_call(app, guard.LOGIN_UNLOCK, b'{"username": "ann"}',
                                [("authorization", _basic("admin", admin_token)), ("content-type", "application/json")]))
    assert status == 403 and "with the password" in body["message"]
    # Not from a cross-site form either: JSON only (a browser asks before sending that).
    status, body = answer(_call(app, guard.TOKENS_CREATE, b'{"name": "x"}', [ann[0], ("content-type", "text/plain")]))
    assert status == 415
    status, body = answer(_call(app, guard.TOKENS, method="GET", headers=ann))
    assert status == 200 and [t["name"] for t in body["tokens"]] == ["laptop"]
    admin = [("authorization", _basic("admin", "pw-of-admin")), ("content-type", "application/json")]
    status, made_for_ann = answer(_call(app, guard.TOKENS_CREATE, b'{"name": "svc", "username": "ann"}', admin))
    assert status == 200 and made_for_ann["username"] == "ann"
    status, body = answer(_call(app, guard.TOKENS_REVOKE, json.dumps({"id": made["id"]}).encode(), ann))
    assert status == 200 and not tokens.verify("ann", 7, made["token"])
    status, body = answer(_call(app, guard.TOKENS_CREATE, b'{"name": "bad name"}', ann))
    assert status == 400 and "token name" in body["message"]
    assert _call(app, guard.TOKENS, method="GET")[0]["status"] == 401


def test_nginx_keys_a_tokens_requests_by_its_id():
    """nginx's rate-limit key finds a token's id by the token's shape: the same prefix."""
    template = (ROOT / "nginx" / "templates" / "mlflow.conf.template").read_text()
    assert f"^Bearer\\s+{stack_tokens.PREFIX}(?<id>[0-9a-f]{{16}})_" in template
    assert stack_tokens.parse(f"{stack_tokens.PREFIX}{'a' * 16}_{'A' * 43}") == "a" * 16


def test_a_refused_token_is_not_counted_as_a_failed_login():
    """A CI job still sending a revoked token must not get its account held: a token-shaped
    password is checked as a token only (no throttle), a password as a password (throttled)."""
    import types

    import stack_logins

    class Throttle:
        def __init__(self):
            self.checked = []

        def check(self, username, address, authenticate):
            self.checked.append(username)
            return stack_logins.Verdict(authenticate() is not None, failures=1)

    throttle = Throttle()
    logins = guard.Logins(throttle)
    fake_auth = types.SimpleNamespace(_USER_AUTH_CACHE=None, _authenticate_cached=lambda u, p: None)
    import mlflow.server

    real = getattr(mlflow.server, "auth", None)
    sys.modules["mlflow.server.auth"], saved = fake_auth, sys.modules.get("mlflow.server.auth")
    mlflow.server.auth = fake_auth
    try:
        scope = {"client": ("10.0.0.2", 4000)}
        token = f"{stack_tokens.PREFIX}{'3' * 16}_{'C' * 43}"
        verdict = asyncio.run(logins.verify(scope, {}, _basic("ann", token)))
        assert not verdict.ok and throttle.checked == []
        verdict = asyncio.run(logins.verify(scope, {}, _basic("ann", "a-wrong-password")))
        assert not verdict.ok and throttle.checked == ["ann"]
    finally:
        if saved is not None:
            sys.modules["mlflow.server.auth"] = saved
        else:
            sys.modules.pop("mlflow.server.auth", None)
        if real is not None:
            mlflow.server.auth = real
