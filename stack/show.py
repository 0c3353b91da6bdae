"""What ./show_all.sh prints: the stack's state, as a person wants to read it."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from . import alerts, common, paths, recovery_kit, settings, swarm
from .compose import invocation as compose_invocation
from .common import host_port

# Runs in the mlflow container, with the S3 client the image shares with the host (stack/common.py).
_BUCKET_STATS = """
from stack.common import env, s3_client
count = size = 0
for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=env("MLFLOW_BUCKET")):
    for obj in page.get("Contents", []):
        count += 1
        size += obj["Size"]
print(count, size)
"""

# Also in the mlflow container: the database is the stack's db or the one POSTGRES_HOST names.
_COUNTS = """
import psycopg2
from stack.common import postgres_params
conn = psycopg2.connect(connect_timeout=5, **postgres_params())
with conn.cursor() as cur:
    cur.execute(%r)
    print(*cur.fetchone(), sep="|")
"""

_COUNTS_SQL = ("SELECT (SELECT count(*) FROM experiments WHERE lifecycle_stage = 'active'), "
               "(SELECT count(*) FROM runs WHERE lifecycle_stage = 'active'), "
               "(SELECT count(*) FROM registered_models)")


def _run(cmd: list[str], stdin: str | None = None, timeout: int = 60, env=None) -> tuple[int, str]:
    try:
        result = subprocess.run(cmd, input=stdin, capture_output=True, text=True,
                                timeout=timeout, check=False, env=env)
    except subprocess.TimeoutExpired:
        return 124, ""
    return result.returncode, result.stdout.strip()


def _json_lines(text: str) -> list[dict]:
    items: list[dict] = []
    for line in text.splitlines():
        line = line.strip()
        if line:
            parsed = json.loads(line)
            items.extend(parsed if isinstance(parsed, list) else [parsed])
    return items


def human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def services() -> list[dict]:
    argv, env = compose_invocation()
    code, out = _run([*argv, "ps", "-a", "--format", "json"], env=env)
    return _json_lines(out) if code == 0 else []


def volumes(project: str) -> list[tuple[str, str]]:
    code, out = _run(["docker", "system", "df", "-v", "--format", "{{json .Volumes}}"], timeout=120)
    if code != 0 or not out:
        return []
    rows = []
    for vol in json.loads(out):
        if f"com.docker.compose.project={project}," in vol.get("Labels", "") + ",":
            rows.append((vol["Name"], vol.get("Size", "?")))
    return sorted(rows)


def swarm_report(values: dict[str, str]) -> str:
    """The stack as the swarm runs it: each service's goal and state, each task's node and health."""
    project = paths.project_name()
    lines = [f"MLflow stack '{project}' on a Docker Swarm ({paths.env_path()}), release {common.stack_version()}",
             "", "Services:"]
    for row in swarm.services(project):
        update = f"  update {row['update']}" if row["update"] else ""
        lines.append(f"  {row['Name'][len(project) + 1:]:<14} {row['Mode']:<16} {row['Replicas']:<22}{update}")
    lines += ["", "Tasks (running, or meant to be):"]
    code, out = _run(["docker", "stack", "ps", "--filter", "desired-state=running", "--format",
                      "{{.Name}}\t{{.Node}}\t{{.CurrentState}}\t{{.Error}}", project])
    for line in (out.splitlines() if code == 0 else []):
        name, node, state, error = (line.split("\t") + ["", "", "", ""])[:4]
        lines.append(f"  {name[len(project) + 1:]:<40} {node:<20} {state}{'  ' + error if error else ''}")
    lines += ["", "Published URLs (on every node, nginx runs on each):", *url_lines(values)]
    lines += ["", "Backups (made from this manager, on its disk):", latest_set(values),
              "  scheduled      not on a swarm: run db/db_volume_backup.sh --keep N from cron on this manager"]
    return "\n".join(lines) + "\n"


def report(values: dict[str, str]) -> str:
    if swarm.stack_running(paths.project_name()):
        return swarm_report(values)
    svc = services()
    running = {s["Service"] for s in svc if s.get("State") == "running"}
    compose = compose_invocation()
    lines = [f"MLflow stack '{paths.project_name()}' ({paths.env_path()}), release {common.stack_version()}", ""]
    lines += ["Services:", *service_lines(svc)]
    lines += ["", "Published URLs:", *url_lines(values)]
    lines += ["", "Volumes:", *([f"  {name:<40} {size}" for name, size in volumes(paths.project_name())] or ["  none"])]
    lines += ["", "MLflow:", *mlflow_lines(values, running, compose)]
    lines += ["", "Backups:", *backups(values, svc, compose)]
    lines += ["", "Monitoring:", *monitoring(values, running, compose)]
    return "\n".join(lines) + "\n"


_ALERTS = """
import json, sys
alerts = json.load(sys.stdin)["data"]["alerts"]
for a in sorted(alerts, key=lambda a: (a["state"], a["labels"]["alertname"])):
    labels = ", ".join(f"{k}={v}" for k, v in sorted(a["labels"].items()) if k not in ("alertname", "severity"))
    print(f'{a["state"]:<8} {a["labels"]["alertname"]} ({labels}): {a["annotations"].get("summary", "")}')
"""


def monitoring(values: dict[str, str], running: set[str], compose: tuple[list[str], dict]) -> list[str]:
    if not settings.profile_on(values, "monitoring"):
        return ["  off (set COMPOSE_PROFILES=monitoring in .env, with any others, and deploy)"]
    base = f"https://{host_port(values['MLFLOW_PUBLIC_HOST'], values['HTTPS_PORT'])}{values['MLFLOW_BASE_PATH']}"
    lines = [f"  Prometheus     {base}/prometheus/ (MLflow admins)",
             f"  alerts go to   {alerts.describe(values)}"]
    if "prometheus" not in running:
        return lines + ["  alerts         unavailable: the prometheus service is not running"]
    argv, env = compose
    alerts_url = f"http://127.0.0.1:{common.port('prometheus')}/api/v1/alerts"
    code, out = _run([*argv, "exec", "-T", "prometheus", "wget", "-qO-", alerts_url], env=env)
    if code != 0:
        return lines + ["  alerts         unavailable (Prometheus did not answer)"]
    code, shown = _run([sys.executable, "-c", _ALERTS], stdin=out)
    return lines + (([f"  {line}" for line in shown.splitlines()] if shown else ["  alerts         none pending or firing"])
                    if code == 0 else ["  alerts         unreadable answer from Prometheus"])


def service_lines(svc: list[dict]) -> list[str]:
    if not svc:
        return ["  none: the stack is not deployed (run ./stack_deploy.sh)"]
    lines = []
    for s in sorted(svc, key=lambda s: s["Service"]):
        state = s.get("State", "?")
        if state == "exited":
            state = f"exited ({s.get('ExitCode', '?')})"
        lines.append(f"  {s['Service']:<18} {state:<12} health={s.get('Health') or '-':<10} {s.get('Image', '')}")
    return lines


def url_lines(values: dict[str, str]) -> list[str]:
    base = f"https://{host_port(values['MLFLOW_PUBLIC_HOST'], values['HTTPS_PORT'])}{values['MLFLOW_BASE_PATH']}"
    s3 = f"https://{host_port(values['MLFLOW_PUBLIC_HOST'], values['S3_PORT'])}"
    redirect = f"http://{host_port(values['MLFLOW_PUBLIC_HOST'], values['HTTP_PORT'], 'http')}"
    login = ("on (./stack_users.sh manages accounts)" if values["MLFLOW_AUTH"] == "true"
             else "OFF: anyone who reaches the ports has full access")
    if values.get("S3_ENDPOINT_URL"):
        s3 = f"{values['S3_ENDPOINT_URL'].rstrip('/')}  (outside the stack: S3_ENDPOINT_URL"
    else:
        s3 += "  (the stack's minio"
    database = (f"{host_port(values['POSTGRES_HOST'], values['POSTGRES_PORT'], 'postgresql')}  (outside the stack: "
                "POSTGRES_HOST)" if values.get("POSTGRES_HOST") else "the stack's db")
    return [f"  MLflow UI/API  {base}  (bound to {values['BIND_ADDRESS']}; {redirect} redirects)",
            f"  S3 API         {s3}, bucket {values['MLFLOW_BUCKET']})",
            f"  database       {database}, database {values['POSTGRES_DB']}",
            f"  login          {login}"]


def mlflow_lines(values: dict[str, str], running: set[str], compose: tuple[list[str], dict]) -> list[str]:
    argv, env = compose
    lines = []
    if "mlflow" in running:
        code, out = _run([*argv, "exec", "-T", "mlflow", "python3", "-c", common.MLFLOW_VERSION_CODE],
                         env=env)
        lines.append(f"  version        {out if code == 0 else 'unknown'}")
    else:
        lines.append("  version        (server not running)")
    if "mlflow" in running:
        code, out = _run([*argv, "exec", "-T", "mlflow", "python3", "-"], stdin=_COUNTS % _COUNTS_SQL, env=env)
        if code == 0 and out.count("|") == 2:
            exps, runs, models = out.split("|")
            lines += [f"  experiments    {exps} active", f"  runs           {runs} active",
                      f"  models         {models} registered"]
        else:
            lines.append("  counts         unavailable (schema not created yet?)")
    if "mlflow" in running:
        code, out = _run([*argv, "exec", "-T", "mlflow", "python3", "-"], stdin=_BUCKET_STATS, timeout=300,
                         env=env)
        if code == 0 and len(out.split()) == 2:
            count, size = out.split()
            lines.append(f"  bucket         {count} objects, {human_bytes(int(size))}")
        else:
            lines.append("  bucket         unavailable")
    return lines


def latest_set(values: dict[str, str]) -> str:
    root = paths.backup_dir(values)
    sets = sorted(p for p in root.glob("mlflow-backup-*") if (p / "manifest.json").exists()) if root.is_dir() else []
    if sets:
        age = (time.time() - (sets[-1] / "manifest.json").stat().st_mtime) / 3600
        return f"  latest set     {sets[-1].name} ({age:.1f} h ago), {len(sets)} sets in {root}"
    return f"  latest set     none in {root} (db/db_volume_backup.sh makes one)"


def backups(values: dict[str, str], svc: list[dict], compose: tuple[list[str], dict]) -> list[str]:
    argv, env = compose
    lines = [latest_set(values), f"  recovery kit   {recovery_kit.status(values)[1]}"]
    scheduler = next((s for s in svc if s["Service"] == "backup"), None)
    if scheduler is None:
        lines.append("  scheduled      off (set COMPOSE_PROFILES=backup in .env)")
    else:
        code, out = _run([*argv, "exec", "-T", "backup", "python3", "/usr/local/bin/mlflow-stack-backup", "health"],
                         env=env)
        lines.append(f"  scheduled      every {values['BACKUP_INTERVAL_HOURS']} h, "
                     f"health={scheduler.get('Health') or '-'}: {out or 'unknown'}")
    archive = next((s for s in svc if s["Service"] == "pitr"), None)
    if archive is not None:
        code, out = _run([*argv, "exec", "-T", "pitr", "python3", "/usr/local/bin/mlflow-stack-pitr", "summary"],
                         env=env)
        store = (values["PITR_S3_ENDPOINT_URL"] if settings.archive_off_site(values)
                 else values.get("S3_ENDPOINT_URL") or "the stack's own store, on this machine")
        where = f"s3://{values['PITR_BUCKET']} on {store}"
        lines.append(f"  point in time  {where}, health={archive.get('Health') or '-'}: "
                     f"{out or 'unknown'}")
    collector = next((s for s in svc if s["Service"] == "gc"), None)
    if collector is None:
        lines.append("  gc             off (./stack_gc.sh by hand, or COMPOSE_PROFILES=gc in .env)")
    else:
        code, out = _run([*argv, "exec", "-T", "gc", "python3", "/opt/mlflow/entrypoint.py", "gc-health"], env=env)
        lines.append(f"  gc             every {values['GC_INTERVAL_HOURS']} h, deletions older than "
                     f"{values['GC_OLDER_THAN_DAYS']} days, health={collector.get('Health') or '-'}: "
                     f"{out or 'unknown'}")
    return lines
