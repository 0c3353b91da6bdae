"""Failed logins, throttled per account and per client address, in the users' database.

Checking a password costs ~0.2 s of CPU (PBKDF2) and MLflow caches only the logins
that succeed: unchecked, a few clients guessing one account kept both cores of a
replica busy hashing, and nginx's request limits (far above what a server can hash)
never held them. Here:

- each account, each client address and each pair of the two count their failed
  logins. After LOGIN_FREE_FAILURES of them (ADDRESS_FACTOR times as many for an
  address, which a team behind one NAT shares) every further failure holds the
  login for a time that doubles (1 s, 2 s, 4 s ...) up to LOGIN_LOCK_MAX_SECONDS.
  A count starts again an hour after its last failure; a success clears its pair's.
- a held login is answered 429 with Retry-After, before its password is checked
  (no hash spent). A login from an address that logged in to the account in the
  last KNOWN_DAYS is held by its pair's count only (at KNOWN_FACTOR times the
  failures, for typing mistakes): someone guessing an account's password from
  elsewhere does not lock its owner out.
- a login MLflow's login cache already holds is never held: a running script
  keeps working while its account is under attack.

The counts live in PostgreSQL (the users' database, tables made by the migrate
job), so every worker of every replica sees the same ones.
"""

from __future__ import annotations

import ipaddress
import math
import random
from dataclasses import dataclass

# One home: the settings' table, whose documentation of LOGIN_FREE_FAILURES names them.
from stack.settings import LOGIN_ADDRESS_FACTOR as ADDRESS_FACTOR
from stack.settings import LOGIN_KNOWN_DAYS as KNOWN_DAYS
from stack.settings import LOGIN_KNOWN_FACTOR as KNOWN_FACTOR

MEMORY_SECONDS = 3600
# The exponent is capped before it grows beyond any limit.
MAX_DOUBLINGS = 40

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS stack_login_failures (
        scope text NOT NULL,
        subject text NOT NULL,
        failures integer NOT NULL,
        last_failure timestamptz NOT NULL,
        PRIMARY KEY (scope, subject))""",
    """CREATE TABLE IF NOT EXISTS stack_login_known (
        account text NOT NULL,
        address text NOT NULL,
        last_success timestamptz NOT NULL,
        PRIMARY KEY (account, address))""",
)


def hold_seconds(failures: int, free: int, cap: int) -> int:
    """How long a login is held after its `failures`-th failure in a row."""
    if failures <= free:
        return 0
    return min(cap, 2 ** min(MAX_DOUBLINGS, failures - free - 1))


def subjects(account: str, address: str) -> dict[str, str]:
    return {"pair": f"{account}\n{address}", "account": account, "address": address}


@dataclass
class Verdict:
    ok: bool
    # Seconds the login is held: its password was not checked (answered 429).
    held: int = 0
    # A failed check: the account's failures in the last hour, and the seconds
    # a login like this one is held from now.
    failures: int = 0
    holds_for: int = 0
    user: object = None


class Throttle:
    def __init__(self, engine, free: int, cap: int):
        self.engine = engine
        self.free = free
        self.cap = cap

    def wait(self, scope: str, failures: int, age: float, known: bool) -> float:
        """Seconds a login still waits because of one count (0 or less: not held by it).
        A known address is held by its own count only, at KNOWN_FACTOR times the
        failures; others by the account's and the address's counts too."""
        if known and scope != "pair":
            return 0
        free = self.free * (ADDRESS_FACTOR if scope == "address" else KNOWN_FACTOR if known else 1)
        return hold_seconds(failures, free, self.cap) - age

    @staticmethod
    def address_key(address: str) -> str:
        """An IPv6 client is counted by its /64 (one machine may hold all of it)."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return address
        return str(ipaddress.ip_network(f"{ip}/64", strict=False)) if ip.version == 6 else address

    def held(self, conn, account: str, address: str) -> int:
        """Seconds this login must wait before its password is checked (0: check it now)."""
        from sqlalchemy import text

        names = subjects(account, address)
        rows = conn.execute(text(
            "SELECT scope, failures, EXTRACT(EPOCH FROM now() - last_failure) FROM stack_login_failures "
            f"WHERE last_failure > now() - interval '{MEMORY_SECONDS} seconds' AND ("
            "(scope = 'pair' AND subject = :pair) OR (scope = 'account' AND subject = :account) "
            "OR (scope = 'address' AND subject = :address))"), names).all()
        if not rows:
            return 0
        known = conn.execute(text(
            "SELECT 1 FROM stack_login_known WHERE account = :account AND address = :address "
            f"AND last_success > now() - interval '{KNOWN_DAYS} days'"), names).first() is not None
        longest = max(self.wait(scope, failures, float(age), known) for scope, failures, age in rows)
        return max(0, math.ceil(longest))

    def failed(self, conn, account: str, address: str) -> int:
        """Count a failure for the account, the address and the pair; the account's count."""
        from sqlalchemy import text

        counts = {}
        for scope, subject in subjects(account, address).items():
            counts[scope] = conn.execute(text(
                "INSERT INTO stack_login_failures AS f (scope, subject, failures, last_failure) "
                "VALUES (:scope, :subject, 1, now()) ON CONFLICT (scope, subject) DO UPDATE SET "
                f"failures = CASE WHEN f.last_failure < now() - interval '{MEMORY_SECONDS} seconds' "
                "THEN 1 ELSE f.failures + 1 END, last_failure = now() RETURNING failures"),
                {"scope": scope, "subject": subject}).scalar_one()
        return counts["account"]

    def forget_old(self) -> None:
        """Made-up names and addresses leave rows behind: forget the old ones (in a
        transaction of its own, so that it cannot deadlock with a failure being counted)."""
        from sqlalchemy import text

        with self.engine.begin() as conn:
            conn.execute(text(f"DELETE FROM stack_login_failures "
                              f"WHERE last_failure < now() - interval '{MEMORY_SECONDS} seconds'"))
            conn.execute(text(f"DELETE FROM stack_login_known "
                              f"WHERE last_success < now() - interval '{KNOWN_DAYS} days'"))

    def succeeded(self, conn, account: str, address: str) -> None:
        from sqlalchemy import text

        names = subjects(account, address)
        conn.execute(text("DELETE FROM stack_login_failures WHERE scope = 'pair' AND subject = :pair"), names)
        # Written at most once an hour per pair: a login is checked again every
        # MLFLOW_AUTH_CACHE_SECONDS on every worker.
        conn.execute(text(
            "INSERT INTO stack_login_known AS k (account, address, last_success) VALUES (:account, :address, now()) "
            "ON CONFLICT (account, address) DO UPDATE SET last_success = now() "
            "WHERE k.last_success < now() - interval '1 hour'"), names)

    def recent(self) -> list[dict]:
        """The counts of the last hour, newest first (at most 500), with the seconds each
        holds a login from an address not known for the account."""
        from sqlalchemy import text

        with self.engine.begin() as conn:
            rows = conn.execute(text(
                "SELECT scope, subject, failures, last_failure, EXTRACT(EPOCH FROM now() - last_failure) "
                f"FROM stack_login_failures WHERE last_failure > now() - interval '{MEMORY_SECONDS} seconds' "
                "ORDER BY last_failure DESC LIMIT 500")).all()
        return [{"scope": scope, "subject": subject.replace("\n", " from "), "failures": failures,
                 "last_failure": last.isoformat(), "held_for": max(0, math.ceil(self.wait(scope, failures, float(age),
                                                                                          known=False)))}
                for scope, subject, failures, last, age in rows]

    def clear(self, account: str) -> int:
        """Forget an account's failures (its own count and its pairs'): its owner may log in
        again at once. The rows removed."""
        from sqlalchemy import text

        with self.engine.begin() as conn:
            return conn.execute(text(
                "DELETE FROM stack_login_failures WHERE (scope = 'account' AND subject = :account) "
                "OR (scope = 'pair' AND left(subject, length(:account) + 1) = :account || chr(10))"),
                {"account": account}).rowcount

    def check(self, account: str, address: str, authenticate) -> Verdict:
        """Hold the login, or check its password with authenticate() and count the outcome."""
        address = self.address_key(address)
        with self.engine.begin() as conn:
            held = self.held(conn, account, address)
        if held:
            return Verdict(False, held=held)
        user = authenticate()
        with self.engine.begin() as conn:
            if user is None:
                failures = self.failed(conn, account, address)
                verdict = Verdict(False, failures=failures, holds_for=self.held(conn, account, address))
            else:
                self.succeeded(conn, account, address)
                verdict = Verdict(True, user=user)
        if not verdict.ok and random.random() < 0.01:
            self.forget_old()
        return verdict
