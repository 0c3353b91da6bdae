"""python3 -m stack COMMAND: the logic behind the stack's shell scripts.

  env [--variant pip|conda] [--dry-run]   create or complete .env, then check it
  check-env                               check .env only
  preflight                               Docker, Compose, ports, disk
  client-env                              export lines for clients
  compose-env                             export lines the scripts give Compose
  show [--client-env]                     ./show_all.sh
"""

from __future__ import annotations

import argparse
import sys

from . import client_env, envfile, paths, preflight, secretfiles, show, tls, users


def _values() -> dict[str, str]:
    return envfile.load_checked(paths.env_path(), paths.EXAMPLE)


def cmd_env(args) -> int:
    env_path = paths.env_path()
    if args.dry_run:
        result = envfile.plan(env_path, paths.EXAMPLE, args.variant)
    else:
        result = envfile.ensure(env_path, paths.EXAMPLE, args.variant)
    say = (lambda what: print(f"env: would {what}")) if args.dry_run else (lambda what: print(f"env: {what}"))
    if result.create:
        say(f"create {env_path} with generated secrets (mode 600)")
    for key in result.added:
        say(f"add {key} (new in .env.example)")
    if result.variant_change:
        say("switch MLFLOW_VARIANT from {} to {}".format(*result.variant_change))
    if not result.changes:
        print(f"env: {env_path} is complete; left unchanged")
    values = envfile.effective(envfile.parse(result.text, str(env_path)))
    errors = envfile.validate(values, envfile.parse(paths.EXAMPLE.read_text()))
    if errors:
        raise envfile.EnvError(f"{env_path} has problems:\n  - " + "\n  - ".join(errors))
    return 0


def cmd_check_env(_args) -> int:
    _values()
    print(f"env: {paths.env_path()} is valid")
    return 0


def cmd_preflight(args) -> int:
    if args.dry_run and not paths.env_path().exists():
        plan = envfile.plan(paths.env_path(), paths.EXAMPLE)
        values = envfile.effective(envfile.parse(plan.text))
    else:
        values = _values()
    failed = False
    for check in preflight.run(values):
        mark = "ok  " if check.ok else "FAIL"
        print(f"preflight: {mark} {check.name}: {check.detail}")
        failed |= not check.ok
    if failed:
        print("preflight: fix the failures above, then run ./stack_deploy.sh again", file=sys.stderr)
        return 1
    return 0


def cmd_client_env(_args) -> int:
    values = _values()
    sys.stdout.write(client_env.render(values, tls.ensure(values, create=False)))
    return 0


def cmd_compose_env(_args) -> int:
    """What the scripts export for Compose; makes the TLS certificate if needed."""
    values = _values()
    try:
        material = tls.ensure(values)
    except tls.TlsError as exc:
        raise envfile.EnvError(str(exc)) from None
    print(f"export MLFLOW_DOCKERFILE={envfile.VARIANTS[values['MLFLOW_VARIANT']]}")
    print(f"export COMPOSE_PROJECT_NAME={paths.project_name()}")
    print(f"export STACK_TLS_CERT={material['cert']}")
    print(f"export STACK_TLS_KEY={material['key']}")
    print(f"export STACK_TLS_TRUST={material['trust']}")
    print(f"export STACK_SECRETS_DIR={secretfiles.write(values)}")
    if values["MLFLOW_AUTH"] != "true":
        print("WARNING: MLFLOW_AUTH=false: the server has NO authentication. Anyone who can reach "
              f"ports {values['HTTPS_PORT']}/{values['S3_PORT']} can read, change and delete every "
              "experiment. Only do this on a machine nobody else can reach.", file=sys.stderr)
    return 0


def cmd_users(args) -> int:
    try:
        return users.run(_values(), args)
    except users.UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def cmd_show(args) -> int:
    values = _values()
    if args.client_env:
        sys.stdout.write(client_env.render(values, tls.ensure(values, create=False)))
        return 0
    sys.stdout.write(show.report(values))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m stack")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("env")
    p.add_argument("--variant", choices=sorted(envfile.VARIANTS))
    p.add_argument("--dry-run", action="store_true")
    p.set_defaults(func=cmd_env)
    sub.add_parser("check-env").set_defaults(func=cmd_check_env)
    p = sub.add_parser("preflight")
    p.add_argument("--dry-run", action="store_true")
    p.set_defaults(func=cmd_preflight)
    sub.add_parser("client-env").set_defaults(func=cmd_client_env)
    sub.add_parser("compose-env").set_defaults(func=cmd_compose_env)
    users.add_parser(sub)
    sub.choices["users"].set_defaults(func=cmd_users)
    p = sub.add_parser("show")
    p.add_argument("--client-env", action="store_true")
    p.set_defaults(func=cmd_show)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except envfile.EnvError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
