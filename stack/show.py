"""What ./show_all.sh prints: the stack's state, as a person wants to read it."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from . import paths

# Runs in the mlflow container, with the image's own S3 client (entrypoint.py).
_BUCKET_STATS = """
from entrypoint import env, s3_client
count = size = 0
for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=env("MLFLOW_BUCKET")):
    for obj in page.get("Contents", []):
        count += 1
        size += obj["Size"]
print(count, size)
"""

_COUNTS_SQL = ("SELECT (SELECT count(*) FROM experiments WHERE lifecycle_stage = 'active'), "
               "(SELECT count(*) FROM runs WHERE lifecycle_stage = 'active'), "
               "(SELECT count(*) FROM registered_models)")


def _run(cmd: list[str], stdin: str | None = None, timeout: int = 60) -> tuple[int, str]:
    try:
        result = subprocess.run(cmd, input=stdin, capture_output=True, text=True,
                                timeout=timeout, check=False)
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
    code, out = _run([*paths.compose_cmd(), "ps", "-a", "--format", "json"])
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


def report(values: dict[str, str]) -> str:
    project = paths.project_name()
    compose = paths.compose_cmd()
    lines = [f"MLflow stack '{project}' ({paths.env_path()})", ""]

    svc = services()
    running = {s["Service"] for s in svc if s.get("State") == "running"}
    lines.append("Services:")
    if not svc:
        lines.append("  none: the stack is not deployed (run ./stack_deploy.sh)")
    for s in sorted(svc, key=lambda s: s["Service"]):
        state = s.get("State", "?")
        if state == "exited":
            state = f"exited ({s.get('ExitCode', '?')})"
        health = s.get("Health") or "-"
        lines.append(f"  {s['Service']:<12} {state:<12} health={health:<10} {s.get('Image', '')}")

    host = values["MLFLOW_PUBLIC_HOST"]
    lines += ["", "Published URLs:",
              f"  MLflow UI/API  https://{host}:{values['HTTPS_PORT']}  (bound to {values['BIND_ADDRESS']}; "
              f"http://{host}:{values['HTTP_PORT']} redirects)",
              f"  S3 API         https://{host}:{values['S3_PORT']}  (bucket {values['MLFLOW_BUCKET']})",
              f"  login          {'on (./stack_users.sh manages accounts)' if values['MLFLOW_AUTH'] == 'true' else 'OFF: anyone who reaches the ports has full access'}"]

    lines += ["", "Volumes:"]
    vols = volumes(project)
    lines += [f"  {name:<40} {size}" for name, size in vols] or ["  none"]

    lines += ["", "MLflow:"]
    if "mlflow" in running:
        code, out = _run([*compose, "exec", "-T", "mlflow", "python3", "-c",
                          "import mlflow; print(mlflow.__version__)"])
        lines.append(f"  version        {out if code == 0 else 'unknown'}")
    else:
        lines.append("  version        (server not running)")
    if "db" in running:
        code, out = _run([*compose, "exec", "-T", "db", "psql", "-U", values["POSTGRES_USER"],
                          "-d", values["POSTGRES_DB"], "-Atc", _COUNTS_SQL])
        if code == 0 and out.count("|") == 2:
            exps, runs, models = out.split("|")
            lines.append(f"  experiments    {exps} active")
            lines.append(f"  runs           {runs} active")
            lines.append(f"  models         {models} registered")
        else:
            lines.append("  counts         unavailable (schema not created yet?)")
    if "mlflow" in running:
        code, out = _run([*compose, "exec", "-T", "mlflow", "python3", "-"], stdin=_BUCKET_STATS,
                         timeout=300)
        if code == 0 and len(out.split()) == 2:
            count, size = out.split()
            lines.append(f"  bucket         {count} objects, {human_bytes(int(size))}")
        else:
            lines.append("  bucket         unavailable")
    lines += ["", "Backups:"]
    lines += backups(values, svc, compose)
    return "\n".join(lines) + "\n"


def backups(values: dict[str, str], svc: list[dict], compose: list[str]) -> list[str]:
    root = Path(os.environ.get("BACKUP_DIR") or values.get("BACKUP_DIR", "./backups"))
    if not root.is_absolute():
        root = paths.ROOT / root
    sets = sorted(p for p in root.glob("mlflow-backup-*") if (p / "manifest.json").exists()) if root.is_dir() else []
    lines = []
    if sets:
        age = (time.time() - (sets[-1] / "manifest.json").stat().st_mtime) / 3600
        lines.append(f"  latest set     {sets[-1].name} ({age:.1f} h ago), {len(sets)} sets in {root}")
    else:
        lines.append(f"  latest set     none in {root} (db/db_volume_backup.sh makes one)")
    scheduler = next((s for s in svc if s["Service"] == "backup"), None)
    if scheduler is None:
        lines.append("  scheduled      off (set COMPOSE_PROFILES=backup in .env)")
    else:
        code, out = _run([*compose, "exec", "-T", "backup", "python3", "/usr/local/bin/mlflow-stack-backup", "health"])
        lines.append(f"  scheduled      every {values.get('BACKUP_INTERVAL_HOURS', '24')} h, "
                     f"health={scheduler.get('Health') or '-'}: {out or 'unknown'}")
    return lines
