"""Access tokens for scripts and CI: made by a user for themselves (or by an admin for
another account), shown once, stored as a digest, expiring, revocable, listed with their
last use, in the users' database (tables made by the migrate job).

A token acts as its account, with the account's permissions, and works with MLflow's
stock client unchanged: as MLFLOW_TRACKING_TOKEN (sent as `Authorization: Bearer`;
the guard finds the account by the token's id) or as the password with the account's
name (MLFLOW_TRACKING_USERNAME/PASSWORD). It cannot change its account's password nor
make or revoke tokens: those want the password, so a token that leaks does not become
the account.

Tokens are 256 random bits: one SHA-256 digest is enough to keep them (a password
needs a slow hash because people choose guessable ones), so checking a token costs
a query, not the ~0.2 s of CPU of a password. A token is bound to its account's id:
an account deleted and made again under the same name does not inherit them.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

# One home: stack/settings.py (the users tool's help reads them too).
from stack.settings import TOKEN_DEFAULT_DAYS, TOKEN_MAX_DAYS

PREFIX = "mlflow_stack_"
_FORM = re.compile(re.escape(PREFIX) + r"([0-9a-f]{16})_([A-Za-z0-9_-]{43})")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# A use is written at most this often per token (a login is checked again every
# MLFLOW_AUTH_CACHE_SECONDS on every worker).
LAST_USE_EVERY = timedelta(minutes=1)

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS stack_tokens (
        id text PRIMARY KEY,
        user_id integer NOT NULL,
        username text NOT NULL,
        name text NOT NULL,
        digest text NOT NULL,
        created_at timestamptz NOT NULL,
        created_by text NOT NULL,
        expires_at timestamptz NOT NULL,
        last_used_at timestamptz,
        revoked_at timestamptz)""",
    # One live token per name and account: `revoke NAME` means one token.
    "CREATE UNIQUE INDEX IF NOT EXISTS stack_tokens_live_name ON stack_tokens (user_id, name) "
    "WHERE revoked_at IS NULL",
)


class TokenError(Exception):
    """A request the token commands refuse (the message says why)."""


def now() -> datetime:
    return datetime.now(timezone.utc)


def _time(value) -> datetime | None:
    """A stored time (PostgreSQL gives datetimes; SQLite, in the unit tests, strings)."""
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))


def parse(token: str | None) -> str | None:
    """The id of a string shaped like a token, else None (then it is a password)."""
    match = _FORM.fullmatch(token or "")
    return match.group(1) if match else None


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def lifetime(text: str) -> timedelta:
    """'90d', '12h', '30m' or '45s' (at most TOKEN_MAX_DAYS)."""
    match = re.fullmatch(r"(\d{1,6})([dhms])", text.strip())
    if not match or int(match.group(1)) == 0:
        raise TokenError(f"expiry {text!r}: use a number and a unit, e.g. 90d, 12h, 30m")
    span = timedelta(**{{"d": "days", "h": "hours", "m": "minutes", "s": "seconds"}[match.group(2)]:
                        int(match.group(1))})
    if span > timedelta(days=TOKEN_MAX_DAYS):
        raise TokenError(f"expiry {text}: a token lives at most {TOKEN_MAX_DAYS} days; make a new one then")
    return span


@dataclass
class Live:
    """A token's row, as the checks need it."""
    username: str
    user_id: int
    digest: str
    expires_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None

    def usable(self, at: datetime) -> bool:
        return self.revoked_at is None and at < self.expires_at


class Tokens:
    def __init__(self, engine):
        self.engine = engine

    def _row(self, conn, token_id: str) -> Live | None:
        from sqlalchemy import text

        # Joined with MLflow's accounts (the same database): a deleted account's tokens are
        # unknown, not a failed login of a namesake made later.
        row = conn.execute(text("SELECT t.username, t.user_id, t.digest, t.expires_at, t.revoked_at, t.last_used_at "
                                "FROM stack_tokens t JOIN users u ON u.id = t.user_id AND u.username = t.username "
                                "WHERE t.id = :id"), {"id": token_id}).first()
        if row is None:
            return None
        return Live(row[0], int(row[1]), row[2], _time(row[3]), _time(row[4]), _time(row[5]))

    def owner(self, token: str) -> str | None:
        """The account a usable token belongs to (its secret is checked with the login)."""
        token_id = parse(token)
        if token_id is None:
            return None
        with self.engine.begin() as conn:
            row = self._row(conn, token_id)
        return row.username if row is not None and row.usable(now()) else None

    def verify(self, username: str, user_id: int, token: str) -> bool:
        """Whether `token` is a usable token of this account (name and id); its use noted."""
        token_id = parse(token)
        if token_id is None:
            return False
        at = now()
        with self.engine.begin() as conn:
            row = self._row(conn, token_id)
            if row is None or row.username != username or row.user_id != user_id or not row.usable(at) \
                    or not hmac.compare_digest(row.digest, digest(token)):
                return False
            if row.last_used_at is None or at - row.last_used_at > LAST_USE_EVERY:
                from sqlalchemy import text

                conn.execute(text("UPDATE stack_tokens SET last_used_at = :at WHERE id = :id"),
                             {"at": at, "id": token_id})
        return True

    def create(self, username: str, user_id: int, name: str, expires: str, created_by: str) -> dict:
        """A new token (its only showing) and its row; a live one of the same name is refused."""
        from sqlalchemy import text
        from sqlalchemy.exc import IntegrityError

        if not NAME.fullmatch(name or ""):
            raise TokenError(f"token name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
        at = now()
        expires_at = at + lifetime(expires or f"{TOKEN_DEFAULT_DAYS}d")
        token_id = secrets.token_hex(8)
        token = f"{PREFIX}{token_id}_{secrets.token_urlsafe(32)}"
        try:
            with self.engine.begin() as conn:
                # An expired token no longer holds its name.
                conn.execute(text("UPDATE stack_tokens SET revoked_at = expires_at WHERE user_id = :uid "
                                  "AND name = :name AND revoked_at IS NULL AND expires_at <= :at"),
                             {"uid": user_id, "name": name, "at": at})
                conn.execute(text(
                    "INSERT INTO stack_tokens (id, user_id, username, name, digest, created_at, created_by, "
                    "expires_at) VALUES (:id, :uid, :username, :name, :digest, :at, :by, :expires)"),
                    {"id": token_id, "uid": user_id, "username": username, "name": name, "digest": digest(token),
                     "at": at, "by": created_by, "expires": expires_at})
        except IntegrityError:
            raise TokenError(f"{username} already has a token named {name!r}: revoke it first, or choose "
                             "another name") from None
        return {"token": token, "id": token_id, "username": username, "name": name,
                "expires_at": expires_at.isoformat(timespec="seconds")}

    def list(self, username: str | None = None) -> list[dict]:
        """Tokens (of one account, or all), newest first, revoked ones included."""
        from sqlalchemy import text

        where, params = ("WHERE t.username = :username", {"username": username}) if username else ("", {})
        with self.engine.begin() as conn:
            rows = conn.execute(text(
                "SELECT t.id, t.username, t.name, t.created_at, t.created_by, t.expires_at, t.last_used_at, "
                "t.revoked_at, u.id FROM stack_tokens t LEFT JOIN users u ON u.id = t.user_id "
                f"AND u.username = t.username {where} ORDER BY t.created_at DESC"), params).all()
        at = now()

        def shown(value):
            value = _time(value)
            return value.isoformat(timespec="seconds") if value else None

        def state(expires, revoked, account) -> str:
            if account is None:
                return "account-deleted"
            # An expired token whose name was taken again is marked revoked when it expired.
            if revoked is not None and _time(revoked) < _time(expires):
                return "revoked"
            return "expired" if _time(expires) <= at else "live"

        return [{"id": r[0], "username": r[1], "name": r[2], "created_at": shown(r[3]), "created_by": r[4],
                 "expires_at": shown(r[5]), "last_used_at": shown(r[6]), "revoked_at": shown(r[7]),
                 "state": state(r[5], r[7], r[8])} for r in rows]

    def revoke(self, token_id: str, username: str | None) -> dict:
        """Revoke a token (of `username`'s, or anyone's for None: an admin); its row."""
        from sqlalchemy import text

        with self.engine.begin() as conn:
            row = conn.execute(text("SELECT username, name, revoked_at FROM stack_tokens WHERE id = :id"),
                               {"id": token_id}).first()
            if row is None or (username is not None and row[0] != username):
                raise TokenError(f"no token {token_id!r}" + (f" of {username}" if username else ""))
            if row[2] is None:
                conn.execute(text("UPDATE stack_tokens SET revoked_at = :at WHERE id = :id"),
                             {"at": now(), "id": token_id})
        return {"id": token_id, "username": row[0], "name": row[1]}
