"""python3 -m stack COMMAND: the logic behind the stack's shell scripts.

  env [--variant pip|conda] [--standins] [--dry-run]
                                          create or complete .env, then check it
  preflight [--standins] [--dry-run]      Docker, Compose, ports, disk, images
  standins [--reminder]                   with STACK_STANDINS=true: build and record the stand-in
                                          images (--reminder: only say which are in use)
  build                                   build the stack's images (log file, summary on failure)
  compose-env                             export lines for Compose (makes TLS material and secret files)
  get KEY...                              export CURRENT_KEY=... lines, from .env as it is now
  compose ARGS...                         docker compose on this stack
  swarm-compose ARGS...                   the same, for `run --no-deps` of a one-off job on the swarm
                                          stack's stores network (backups, the schema check)
  paths                                   export lines: STACK_ENV_FILE, COMPOSE_PROJECT_NAME
  release-deployed                        remember that this release deployed the stack (a deploy's last step)
  client-env [--without-password]         export lines for clients (a re-deploy leaves the admin's password out)
  show [--client-env | --client-bundle DIR [--user NAME] | --test-alert | --recovery-kit DIR]
                                          ./show_all.sh
  swarm-preflight                         what stops a swarm deploy (./stack_deploy.sh --swarm)
  swarm-push                              push the images built here to STACK_REGISTRY
  swarm-file [PATH]                       write the stack file (and its stores-only and stores-and-jobs
                                          parts, deployed first) for `docker stack deploy`; print the paths
  swarm-prune                             remove the stack's configs and secrets the file no longer names
  swarm-running                           exit 0 if this stack runs on this machine's swarm
  swarm-wait FILE --timeout S             wait until every service of the deployed stack file FILE runs as
                                          deployed (a changed one: Swarm completed its update)
  swarm-check [SERVICE...]                exit 1, saying why, unless every swarm service (or those named)
                                          runs as deployed
  swarm-backup-env                        export lines for a backup of the swarm stack (its images, MLflow version)
  swarm-servers                           STACK_SERVICE=REPLICAS of the server tier in the deployed stack file
                                          (what a restore stops and starts again)
  holds-data COUNTS                       export STACK_HOLDS_DATA=yes or no: whether the table counts (JSON,
                                          the backup job's `counts`) hold a run or an experiment besides Default
  restore-plan PLAN                       export lines of a point-in-time plan (JSON, db/pitr.py's `plan`):
                                          PLAN_TARGET, PLAN_TARGET_ISO, PLAN_BACKUP_ID, PLAN_TIMELINE
  users ...                               ./stack_users.sh
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

from . import (alerts, build, client_env, common, compose, envfile, host, paths, pins, preflight, recovery_kit,
               secretfiles, settings, show, standins, swarm, tls, users)


def _values() -> dict[str, str]:
    return envfile.load_checked(paths.env_path())


def cmd_env(args) -> int:
    env_path = paths.env_path()
    result = (envfile.plan if args.dry_run else envfile.ensure)(env_path, args.variant, args.standins)
    prefix = "env: would " if args.dry_run else "env: "
    if result.create:
        print(f"{prefix}create {env_path} with generated secrets (mode 600)")
    for key, value in result.detected.items():
        print(f"{prefix}set {key}={value} (this machine as colleagues reach it; change it in .env to a DNS name "
              "if it has one)")
    for key in result.added:
        print(f"{prefix}add {key} (a new setting)")
    for key, (old, new) in result.switched.items():
        print(f"{prefix}switch {key} from {old} to {new}")
    if not result.changes:
        print(f"env: {env_path} is complete; left unchanged")
    note = release_note()
    if note:
        print(note)
    envfile.check(envfile.effective(envfile.parse(result.text, str(env_path))), env_path)
    return 0


def release_file() -> Path:
    return paths.state_dir() / "release"


def release_note() -> str | None:
    """What to say when another release deployed the stack last (a deploy's first step)."""
    current, recorded = common.stack_version(), release_file()
    before = recorded.read_text().strip() if recorded.exists() else ""
    if before and before != current:
        return (f"env: this stack was deployed by release {before}; this is {current}. What changes, and what "
                f"to do first: CHANGELOG.md, from {current} down to {before}")
    return None


def cmd_release(_args) -> int:
    """Remember that this release deployed the stack (after a deploy that worked)."""
    release_file().parent.mkdir(parents=True, exist_ok=True)
    release_file().write_text(common.stack_version() + "\n")
    # Last, where a deploy's output ends: what a lost disk would take along with it.
    sys.stderr.write(recovery_kit.reminder(_values()))
    return 0


def cmd_preflight(args) -> int:
    if args.dry_run:
        # What the env step would make of .env (new settings added), checked.
        path = paths.env_path()
        values = envfile.check(envfile.effective(envfile.parse(envfile.plan(path).text, str(path))), path)
    else:
        values = _values()
    if args.standins:
        values["STACK_STANDINS"] = "true"
    checks = preflight.run(values, swarm=args.swarm)
    for check in checks:
        print(f"preflight: {'ok  ' if check.ok else 'FAIL'} {check.name}: {check.detail}")
    if all(check.ok for check in checks):
        return 0
    sys.stdout.flush()
    print("preflight: fix the failures above, then run ./stack_deploy.sh again", file=sys.stderr)
    # What to do comes last, where it is seen; once per fix, not per check.
    for fix in dict.fromkeys(check.fix for check in checks if not check.ok and check.fix):
        print(f"preflight: {fix}", file=sys.stderr)
    return 1


def cmd_standins(args) -> int:
    """With STACK_STANDINS=true: build the stand-ins and say loudly which images they replace."""
    values = _values()
    if args.reminder:
        used = standins.in_use(values)
        if used:
            sys.stderr.write(standins.banner(used, values, final=True))
        return 0
    if not standins.enabled(values):
        return 0
    print("==> Stand-in images (STACK_STANDINS=true): building any that are needed", file=sys.stderr)
    try:
        used = standins.build(values)
    except standins.StandinError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if used:
        sys.stderr.write(standins.banner(used, values))
    else:
        print("==> Stand-in images: none needed, every image is the real one (on this machine or pulled)",
              file=sys.stderr)
    return 0


def cmd_build(_args) -> int:
    """The images this deploy builds: mlflow, db (PostgreSQL with barman-cloud) unless
    POSTGRES_HOST names a server outside, and backup when scheduled backups are on."""
    values = _values()
    ca, note = build.build_ca(os.environ)
    if note:
        print(f"==> {note}", file=sys.stderr)
    if ca:
        build.install_ca(ca)
    services = ["mlflow"]
    if "db" in settings.own_stores(values):
        services.append("db")
    if "backup" in values["COMPOSE_PROFILES"].split(","):
        services.append("backup")
    for service in services:
        what = f"{values['MLFLOW_VARIANT']} variant, " if service == "mlflow" else ""
        print(f"==> Building the {service} image ({what}cached layers are reused; the log: "
              f"{build.log_path(service)})", file=sys.stderr)
        status = build.run(service, ca_in_use=ca)
        if status != 0:
            return status
    return 0


def cmd_inactive(_args) -> int:
    """The services of profiles now off (a deploy stops and removes them: Compose leaves
    them running), and the backup metric goes with scheduled backups."""
    values = _values()
    off = pins.inactive_services(set(filter(None, settings.compose_profiles(values).split(","))))
    if "backup" in off:
        (paths.backup_dir(values) / common.BACKUP_METRICS_FILE).unlink(missing_ok=True)
    print("\n".join(off))
    return 0


def cmd_compose_env(_args) -> int:
    """What the scripts export for Compose; makes the TLS certificate and secret files if needed."""
    values = _values()
    try:
        pairs = compose.environment(values, create=True)
    except tls.TlsError as exc:
        raise envfile.EnvError(str(exc)) from None
    sys.stdout.write(compose.export_lines(pairs))
    if values["MLFLOW_AUTH"] != "true":
        print("WARNING: MLFLOW_AUTH=false: the server has NO authentication. Anyone who can reach "
              f"ports {values['HTTPS_PORT']}/{values['S3_PORT']} can read, change and delete every "
              "experiment. Only do this on a machine nobody else can reach.", file=sys.stderr)
    return 0


def cmd_get(args) -> int:
    """Current values of non-secret keys, before `env` changes anything (for confirmations)."""
    path = paths.env_path()
    current = envfile.parse(path.read_text(), str(path)) if path.exists() else {}
    pairs = []
    for key in args.keys:
        if key not in settings.BY_KEY or settings.BY_KEY[key].sensitive:
            raise envfile.EnvError(f"get {key}: not a setting that may be shown")
        pairs.append((f"CURRENT_{key}", current.get(key, "")))
    sys.stdout.write(compose.export_lines(pairs))
    return 0


def cmd_compose(args: list[str], on_swarm: bool = False) -> int:
    """docker compose on this stack, with everything its file needs to be read."""
    argv, environ = compose.invocation(on_swarm=on_swarm)
    sys.stdout.flush()
    os.execvpe(argv[0], argv + args, environ)
    return 1  # not reached


def cmd_paths(_args) -> int:
    sys.stdout.write(compose.export_lines([("STACK_ENV_FILE", str(paths.env_path())),
                                           ("COMPOSE_PROJECT_NAME", paths.project_name())]))
    return 0


def cmd_client_env(args) -> int:
    values = _values()
    shown = not getattr(args, "without_password", False)
    sys.stdout.write(client_env.render(values, tls.ensure(values, create=False), password=shown))
    if common.resolves_to_loopback(values["MLFLOW_PUBLIC_HOST"]):
        sys.stdout.flush()
        print(f"WARNING: MLFLOW_PUBLIC_HOST={values['MLFLOW_PUBLIC_HOST']} is this machine's loopback: these "
              "settings work on this machine only. For colleagues, set MLFLOW_PUBLIC_HOST in .env to a name or "
              f"address they reach it by (e.g. {host.reachable_name() or 'its DNS name'}) and deploy again.",
              file=sys.stderr)
    return 0


def cmd_users(args) -> int:
    try:
        return users.run(_values(), args)
    except users.UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def cmd_show(args) -> int:
    if args.test_alert:
        argv, environ = compose.invocation()
        try:
            for line in alerts.send_test(_values(), argv, environ):
                print(line)
        except alerts.AlertTestError as exc:
            print(f"error: the test alert did not reach everyone: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.recovery_kit:
        try:
            written = recovery_kit.write(_values(), Path(args.recovery_kit))
        except recovery_kit.KitError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        for path in written:
            print(f"wrote {path}")
        print("Keep the folder OFF this machine (a password manager, a vault, an encrypted drive): it holds every "
              "secret of the stack. Its README.txt says how to restore with it.", file=sys.stderr)
        return 0
    if args.client_env:
        return cmd_client_env(args)
    if args.client_bundle:
        values = _values()
        for path in client_env.write_bundle(values, tls.ensure(values, create=False), Path(args.client_bundle),
                                            args.user or "YOUR_LOGIN"):
            print(f"wrote {path}")
        print("Hand the folder to a colleague: with their own password set, `. ./mlflow.env` in bash or zsh (in "
              "sh, from that folder) and MLflow logs to the stack.", file=sys.stderr)
        return 0
    sys.stdout.write(show.report(_values()))
    return 0


def _compose_config() -> dict:
    """docker-compose.yml as Compose resolves it for this stack (profiles, values, paths)."""
    argv, environ = compose.invocation()
    result = subprocess.run([*argv, "config", "--format", "json"], env=environ, capture_output=True, text=True)
    if result.returncode != 0:
        raise envfile.EnvError(f"docker compose config failed: {result.stderr.strip()}")
    return json.loads(result.stdout)


def cmd_swarm_preflight(_args) -> int:
    values = _values()
    argv, environ = compose.invocation()
    running = subprocess.run([*argv, "--profile", "*", "ps", "-aq"], env=environ, capture_output=True,
                             text=True).stdout.strip()
    problems = swarm.preflight(values, paths.project_name(), bool(running))
    for problem in problems:
        print(f"preflight: FAIL swarm: {problem}", file=sys.stderr)
    if not problems:
        print("preflight: ok   swarm: a manager of a swarm, the data node labelled, the images' registry set")
    return 1 if problems else 0


def _swarm_name_key() -> bytes:
    """The key of the objects' name hashes, made once, kept beside the secret files."""
    path = secretfiles.secrets_dir().parent / ".swarm-names.key"
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    return path.read_text().strip().encode()


def _swarm_document(config: dict) -> dict:
    values = _values()
    _argv, environ = compose.invocation()
    return swarm.stack_file(config, values["STACK_REGISTRY"], private_files=[environ["STACK_TLS_KEY"]],
                            ids=swarm.image_ids(svc["image"] for svc in config["services"].values()),
                            key=_swarm_name_key())


def cmd_swarm_push(_args) -> int:
    values = _values()
    ids = swarm.image_ids(svc["image"] for svc in _compose_config()["services"].values())
    swarm.push(ids, values["STACK_REGISTRY"], log=lambda line: print(line, file=sys.stderr))
    return 0


def cmd_swarm_file(args) -> int:
    """Writes the stack file and, beside it, the stores-only and stores-and-jobs parts deployed
    first; prints the three paths in the order they are deployed."""
    config = _compose_config()
    document = _swarm_document(config)
    target = Path(args.path) if args.path else paths.state_dir() / "swarm-stack.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    stores = target.with_name(target.stem + "-stores-only" + target.suffix)
    first = target.with_name(target.stem + "-stores-and-jobs" + target.suffix)
    target.write_text(json.dumps(document, indent=1) + "\n")
    # The name the stores-and-jobs part had before the stores-only part came.
    target.with_name(target.stem + "-stores" + target.suffix).unlink(missing_ok=True)
    stores.write_text(json.dumps(swarm.stores_first(document, config, with_jobs=False), indent=1) + "\n")
    first.write_text(json.dumps(swarm.stores_first(document, config), indent=1) + "\n")
    print(stores)
    print(first)
    print(target)
    return 0


def cmd_swarm_prune(_args) -> int:
    document = json.loads((paths.state_dir() / "swarm-stack.json").read_text())
    for removed in swarm.prune_objects(paths.project_name(), document):
        print(f"==> Removed {removed} (no longer used)", file=sys.stderr)
    return 0


def cmd_swarm_running(_args) -> int:
    return 0 if swarm.stack_running(paths.project_name()) else 1


def cmd_swarm_worker(_args) -> int:
    state = swarm.swarm_state()
    return 0 if state["state"] == "active" and not state["manager"] else 1


def cmd_swarm_volumes(_args) -> int:
    """This stack's volumes on this node: those the swarm labelled, and those of the same
    names that Compose made before (a stack moved from Compose to the swarm keeps them)."""
    project = paths.project_name()
    names = {f"{project}_{key}" for key in _compose_config().get("volumes", {})}
    listed = subprocess.run(["docker", "volume", "ls", "-q"], capture_output=True, text=True).stdout.split()
    labelled = subprocess.run(["docker", "volume", "ls", "-q", "--filter",
                               f"label=com.docker.stack.namespace={project}"],
                              capture_output=True, text=True).stdout.split()
    found = sorted((names & set(listed)) | set(labelled))
    if found:
        print("\n".join(found))
    return 0


def cmd_swarm_check(args) -> int:
    project = paths.project_name()
    rows = swarm.services(project)
    if args.services:
        named = {f"{project}_{service}" for service in args.services}
        missing = sorted(named - {row["Name"] for row in rows})
        rows = [row for row in rows if row["Name"] in named]
        rows += [{"Name": name, "Replicas": "not deployed", "update": ""} for name in missing]
    problems = swarm.unsettled(rows)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)
    return 1 if problems else 0


def cmd_swarm_wait(args) -> int:
    """Wait until every service of a deployed stack file runs as deployed (see swarm.convergence),
    printing what is still awaited when it changes."""
    import time

    names = sorted(json.loads(Path(args.file).read_text())["services"])
    project = paths.project_name()
    deadline = time.monotonic() + args.timeout
    shown = None
    while True:
        states = swarm.deployed_state(project, names)
        failed = [what for verdict, what in states if verdict == "failed"]
        waiting = [what for verdict, what in states if verdict == "waiting"]
        if failed:
            for what in failed:
                print(f"  {what}", file=sys.stderr)
            return 1
        if not waiting:
            print(f"  {len(names)} service(s) run as deployed", file=sys.stderr)
            return 0
        if waiting != shown:
            print(f"  waiting for {'; '.join(waiting)}", file=sys.stderr)
            shown = waiting
        if time.monotonic() > deadline:
            print(f"  still not as deployed after {args.timeout} s", file=sys.stderr)
            return 1
        time.sleep(1)


def cmd_swarm_servers(_args) -> int:
    path = paths.state_dir() / "swarm-stack.json"
    if not path.exists():
        raise swarm.SwarmError(f"{path} is missing: run the restore on the manager that deployed the stack, or "
                               "run ./stack_deploy.sh --swarm here first")
    for name, replicas in swarm.servers(json.loads(path.read_text())).items():
        print(f"{paths.project_name()}_{name}={replicas}")
    return 0


def holds_data(counts: dict) -> bool:
    """Whether a database holds what a user made: a run, or an experiment besides the Default one
    MLflow creates (a restore over it asks first and takes a safety set)."""
    return counts.get("runs", 0) > 0 or counts.get("experiments", 0) > 1


def cmd_holds_data(args) -> int:
    print(compose.export_lines([("STACK_HOLDS_DATA", "yes" if holds_data(json.loads(args.counts)) else "no")]),
          end="")
    return 0


def cmd_restore_plan(args) -> int:
    plan = json.loads(args.plan)
    print(compose.export_lines([("PLAN_TARGET", plan["target"]), ("PLAN_TARGET_ISO", plan["target_iso"]),
                                ("PLAN_BACKUP_ID", plan["backup"]["id"]), ("PLAN_TIMELINE", plan["timeline"])]),
          end="")
    return 0


def cmd_swarm_backup_env(_args) -> int:
    """What a backup set records of the swarm stack: each service's image, and the MLflow
    version in the server's image (asked of the image here: its tasks may run on other nodes)."""
    project = paths.project_name()
    images = swarm.service_images(project)
    version = swarm.image_python(images.get("mlflow", ""), common.MLFLOW_VERSION_CODE)
    sys.stdout.write(compose.export_lines([
        ("STACK_IMAGES", ",".join(f"{name}={image}" for name, image in sorted(images.items()))),
        ("STACK_MLFLOW_VERSION", version)]))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["compose"], ["swarm-compose"]):
        # Compose's own options pass through untouched (argparse would take them).
        try:
            return cmd_compose(argv[1:], on_swarm=argv[0] == "swarm-compose")
        except (envfile.EnvError, tls.TlsError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    parser = argparse.ArgumentParser(prog="python3 -m stack")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("env")
    p.add_argument("--variant")
    p.add_argument("--standins", action="store_true")
    p.add_argument("--dry-run", action="store_true")
    p.set_defaults(func=cmd_env)
    p = sub.add_parser("preflight")
    p.add_argument("--standins", action="store_true")
    p.add_argument("--swarm", action="store_true")
    p.add_argument("--dry-run", action="store_true")
    p.set_defaults(func=cmd_preflight)
    p = sub.add_parser("standins")
    p.add_argument("--reminder", action="store_true")
    p.set_defaults(func=cmd_standins)
    sub.add_parser("build").set_defaults(func=cmd_build)
    sub.add_parser("compose-env").set_defaults(func=cmd_compose_env)
    sub.add_parser("inactive").set_defaults(func=cmd_inactive)
    p = sub.add_parser("get")
    p.add_argument("keys", nargs="+")
    p.set_defaults(func=cmd_get)
    sub.add_parser("paths").set_defaults(func=cmd_paths)
    sub.add_parser("release-deployed").set_defaults(func=cmd_release)
    p = sub.add_parser("client-env")
    p.add_argument("--without-password", action="store_true")
    p.set_defaults(func=cmd_client_env)
    users.add_parser(sub)
    sub.choices["users"].set_defaults(func=cmd_users)
    p = sub.add_parser("show")
    p.add_argument("--client-env", action="store_true")
    p.add_argument("--test-alert", action="store_true")
    p.add_argument("--recovery-kit", metavar="DIR")
    p.add_argument("--client-bundle", metavar="DIR")
    p.add_argument("--user")
    p.set_defaults(func=cmd_show)
    sub.add_parser("swarm-preflight").set_defaults(func=cmd_swarm_preflight)
    sub.add_parser("swarm-push").set_defaults(func=cmd_swarm_push)
    p = sub.add_parser("swarm-file")
    p.add_argument("path", nargs="?")
    p.set_defaults(func=cmd_swarm_file)
    p = sub.add_parser("swarm-wait")
    p.add_argument("file")
    # Required: its one default is DEPLOY_TIMEOUT's, in scripts/lib.sh.
    p.add_argument("--timeout", type=int, required=True)
    p.set_defaults(func=cmd_swarm_wait)
    p = sub.add_parser("swarm-check")
    p.add_argument("services", nargs="*")
    p.set_defaults(func=cmd_swarm_check)
    sub.add_parser("swarm-backup-env").set_defaults(func=cmd_swarm_backup_env)
    sub.add_parser("swarm-servers").set_defaults(func=cmd_swarm_servers)
    p = sub.add_parser("holds-data")
    p.add_argument("counts")
    p.set_defaults(func=cmd_holds_data)
    p = sub.add_parser("restore-plan")
    p.add_argument("plan")
    p.set_defaults(func=cmd_restore_plan)
    sub.add_parser("swarm-running").set_defaults(func=cmd_swarm_running)
    sub.add_parser("swarm-prune").set_defaults(func=cmd_swarm_prune)
    sub.add_parser("swarm-worker").set_defaults(func=cmd_swarm_worker)
    sub.add_parser("swarm-volumes").set_defaults(func=cmd_swarm_volumes)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (envfile.EnvError, tls.TlsError) as exc:
        # A wrong .env or certificate: nothing was done (exit 2, as a wrong command line).
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (build.BuildError, swarm.SwarmError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
