"""User accounts of the stack's MLflow (basic-auth), through its REST API as the admin.

    ./stack_users.sh add NAME [--admin] [--password-stdin]
    ./stack_users.sh passwd NAME [--password-stdin]
    ./stack_users.sh grant NAME EXPERIMENT READ|USE|EDIT|MANAGE|DENY
    ./stack_users.sh delete NAME
    ./stack_users.sh list
    ./stack_users.sh token create NAME --user ACCOUNT [--expires 90d]
    ./stack_users.sh token list [--user ACCOUNT]
    ./stack_users.sh token revoke ID

Without --password-stdin a strong password is generated and printed once; so is a
token (mlflow/stack_tokens.py: stored as a digest only).
"""

from __future__ import annotations

import base64
import json
import secrets
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request

from . import client_env, settings, tls

# What MLflow 3.17 accepts for a grant on one experiment (DENY beats the default).
PERMISSIONS = ("READ", "USE", "EDIT", "MANAGE", "DENY")


class UserError(Exception):
    pass


class Api:
    def __init__(self, values: dict[str, str]):
        settings = dict(client_env.client_env(values, tls.ensure(values, create=False)))
        self.base = settings["MLFLOW_TRACKING_URI"]
        user, password = values["MLFLOW_ADMIN_USERNAME"], values["MLFLOW_ADMIN_PASSWORD"]
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self.headers = {"Authorization": f"Basic {token}", "Content-Type": "application/json"}
        ca = settings.get("MLFLOW_TRACKING_SERVER_CERT_PATH")
        self.context = ssl.create_default_context(cafile=ca) if ca else None

    def call(self, method: str, path: str, body: dict | None = None, query: dict | None = None) -> dict:
        url = f"{self.base}/api/{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method, headers=self.headers)
        try:
            with urllib.request.urlopen(request, timeout=30, context=self.context) as response:
                text = response.read().decode()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            try:
                detail = json.loads(detail).get("message", detail)
            except json.JSONDecodeError:
                pass
            if exc.code == 401:
                raise UserError("the server refused the admin credentials from .env "
                                "(MLFLOW_ADMIN_USERNAME/MLFLOW_ADMIN_PASSWORD); if you changed the "
                                "admin password through the API, put the new one in .env") from None
            raise UserError(f"{method} {path}: HTTP {exc.code}: {detail}") from None
        except urllib.error.URLError as exc:
            raise UserError(f"cannot reach {self.base} ({exc.reason}): is the stack deployed?") from None
        return json.loads(text) if text.strip() else {}

    def direct_grant(self, username: str, experiment_id: str) -> int:
        """The id of the row that holds the user's own grant on the experiment."""
        rows = self.call("GET", "3.0/mlflow/users/permissions/list", query={"username": username})["permissions"]
        roles = {r["role_id"] for r in rows if r["resource_type"] == "experiment"
                 and r["resource_pattern"] == experiment_id and r["role_name"].startswith("__user_")}
        for role in roles:
            for row in self.call("GET", "3.0/mlflow/roles/permissions/list", query={"role_id": role})["role_permissions"]:
                if row["resource_type"] == "experiment" and row["resource_pattern"] == experiment_id:
                    return int(row["id"])
        raise UserError(f"{username} has no grant of their own on experiment {experiment_id} to change")

    def experiment_id(self, ref: str) -> str:
        if ref.isdigit():
            return ref
        found = self.call("GET", "2.0/mlflow/experiments/get-by-name", query={"experiment_name": ref})
        return found["experiment"]["experiment_id"]


def _password(from_stdin: bool) -> tuple[str, bool]:
    if from_stdin:
        value = sys.stdin.readline().rstrip("\n")
        if len(value) < settings.MIN_SECRET_LENGTH:
            raise UserError(f"the password must have at least {settings.MIN_SECRET_LENGTH} characters")
        return value, False
    return secrets.token_urlsafe(18), True


def run(values: dict[str, str], args) -> int:
    if values["MLFLOW_AUTH"] != "true":
        raise UserError("authentication is off (MLFLOW_AUTH=false in .env): there are no users to manage")
    api = Api(values)
    if args.action == "add":
        password, generated = _password(args.password_stdin)
        api.call("POST", "2.0/mlflow/users/create", {"username": args.name, "password": password})
        if args.admin:
            api.call("PATCH", "2.0/mlflow/users/update-admin", {"username": args.name, "is_admin": True})
        print(f"users: created {args.name}{' (admin)' if args.admin else ''}")
        if generated:
            print(f"MLFLOW_TRACKING_USERNAME={args.name}\nMLFLOW_TRACKING_PASSWORD={password}")
    elif args.action == "passwd":
        password, generated = _password(args.password_stdin)
        api.call("PATCH", "2.0/mlflow/users/update-password", {"username": args.name, "password": password})
        print(f"users: changed the password of {args.name}")
        if generated:
            print(f"MLFLOW_TRACKING_PASSWORD={password}")
    elif args.action == "grant":
        permission = args.permission.upper()
        if permission not in PERMISSIONS:
            raise UserError(f"permission {args.permission}: use one of {', '.join(PERMISSIONS)}")
        exp_id = api.experiment_id(args.experiment)
        grant = {"username": args.name, "resource_type": "experiment", "resource_id": exp_id}
        try:
            api.call("POST", "3.0/mlflow/users/permissions/grant", {**grant, "permission": permission})
        except UserError as exc:
            if "already exists" not in str(exc):
                raise
            # MLflow 3.17's grant does not replace an earlier one. Its grants live in the
            # user's own role; that role's row is changed in place, so a failure leaves the
            # old grant (revoking first would leave the default permission, e.g. a DENY
            # becoming READ).
            row = api.direct_grant(args.name, exp_id)
            api.call("PATCH", "3.0/mlflow/roles/permissions/update",
                     {"role_permission_id": row, "permission": permission})
        print(f"users: {args.name} has {permission} on experiment {exp_id}")
    elif args.action == "delete":
        api.call("DELETE", "2.0/mlflow/users/delete", {"username": args.name})
        print(f"users: deleted {args.name}")
    elif args.action == "failures":
        rows = api.call("GET", "2.0/stack/login-failures").get("failures", [])
        if not rows:
            print("users: no failed logins in the last hour")
        for row in rows:
            held = f", held {row['held_for']} s more" if row["held_for"] else ""
            print(f"{row['scope']:8} {row['subject']}: {row['failures']} failed, the last at {row['last_failure']}{held}")
    elif args.action == "unlock":
        cleared = api.call("POST", "2.0/stack/login-failures/clear", {"username": args.name})["cleared"]
        print(f"users: forgot {cleared} count(s) of failed logins of {args.name}; a server worker that "
              "answered a hold of it may answer it until it ends (LOGIN_LOCK_MAX_SECONDS at most)")
    elif args.action == "token":
        token_command(api, values, args)
    elif args.action == "list":
        for user in sorted(api.call("GET", "2.0/mlflow/users/list").get("users", []), key=lambda u: u["username"]):
            print(f"{user['username']}{'  (admin)' if user.get('is_admin') else ''}")
    return 0


def token_command(api: Api, values: dict[str, str], args) -> None:
    if args.token_action == "create":
        made = api.call("POST", "2.0/stack/tokens/create", {"name": args.name, "expires": args.expires,
                                                             "username": args.user})
        print(f"users: made the token {made['id']} ({made['name']}) of {made['username']}, expiring "
              f"{made['expires_at']}; it is shown once, here:", file=sys.stderr)
        print(f"MLFLOW_TRACKING_TOKEN={made['token']}")
    elif args.token_action == "list":
        rows = api.call("GET", "2.0/stack/tokens", query={"username": args.user} if args.user else None)["tokens"]
        if not rows:
            print("users: no tokens")
        for row in rows:
            print(f"{row['id']}  {row['username']:16} {row['name']:20} {row['state']:15} expires {row['expires_at']}"
                  f"  last used {row['last_used_at'] or 'never'}  made by {row['created_by']} {row['created_at']}")
    else:
        revoked = api.call("POST", "2.0/stack/tokens/revoke", {"id": args.id})
        print(f"users: revoked the token {revoked['id']} ({revoked['name']}) of {revoked['username']}; a server "
              f"worker that checked it recently may take it for MLFLOW_AUTH_CACHE_SECONDS "
              f"({values.get('MLFLOW_AUTH_CACHE_SECONDS', '?')} s) more")


PROG = "./stack_users.sh"


def add_parser(sub) -> None:
    p = sub.add_parser("users", prog=PROG, description="Manage the accounts of the stack's MLflow server, as "
                       "its admin (credentials from .env).")
    actions = p.add_subparsers(dest="action", required=True,
                               metavar="add|passwd|grant|delete|list|failures|unlock|token")
    actions.add_parser("list", help="the accounts, admins marked")
    actions.add_parser("failures", help="failed logins of the last hour: accounts, addresses, holds")
    a = actions.add_parser("unlock", help="forget an account's failed logins, so that its owner may log in again")
    a.add_argument("name")
    a = actions.add_parser("add")
    a.add_argument("name")
    a.add_argument("--admin", action="store_true")
    a.add_argument("--password-stdin", action="store_true")
    a = actions.add_parser("passwd")
    a.add_argument("name")
    a.add_argument("--password-stdin", action="store_true")
    a = actions.add_parser("grant")
    a.add_argument("name")
    a.add_argument("experiment", help="experiment id or name")
    a.add_argument("permission", help=" | ".join(PERMISSIONS))
    a = actions.add_parser("delete")
    a.add_argument("name")
    t = actions.add_parser("token", help="access tokens for scripts and CI (MLFLOW_TRACKING_TOKEN)")
    kinds = t.add_subparsers(dest="token_action", required=True, metavar="create|list|revoke")
    a = kinds.add_parser("create", help="make a token, shown once")
    a.add_argument("name", help="what it is for, e.g. ci-nightly (one live token per name and account)")
    a.add_argument("--user", required=True, help="the account it acts as, with that account's permissions "
                   "(give a script an account of its own, not the admin's)")
    a.add_argument("--expires", default=f"{settings.TOKEN_DEFAULT_DAYS}d",
                   help=f"lifetime: 90d, 12h, 30m ... (default {settings.TOKEN_DEFAULT_DAYS}d, "
                        f"at most {settings.TOKEN_MAX_DAYS}d)")
    a = kinds.add_parser("list", help="tokens with their state and last use")
    a.add_argument("--user", help="one account's only")
    a = kinds.add_parser("revoke", help="stop a token (by the id list shows)")
    a.add_argument("id")
