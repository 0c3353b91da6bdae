"""Helpers for examples/scenarios.sh: the parts that need data structures.

    python _scenario_tools.py free-port
    python _scenario_tools.py wait-server URL PID LOGFILE [--timeout S]
    python _scenario_tools.py check-server URL
    python _scenario_tools.py show-dir DIR
    python _scenario_tools.py show-sqlite DBFILE
    python _scenario_tools.py show-run RUN_ID        (uses MLFLOW_TRACKING_URI)
    python _scenario_tools.py run-json RUN_ID        (the same, as JSON)
    python _scenario_tools.py run-id OUTPUT_FILE

Only show-run and run-json import MLflow; the rest is the standard library, so the
shell script gets quick, clear answers. Errors go to stderr as one line that
says what to do, with exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import socket
import sqlite3
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


class ToolError(Exception):
    """A failure the user can act on; printed without a traceback."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _health(url: str, timeout: float = 2.0) -> tuple[bool, str]:
    # The stack's local CA, as the printed client settings name it.
    cafile = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or None
    context = ssl.create_default_context(cafile=cafile) if url.startswith("https://") else None
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout, context=context) as resp:
            body = resp.read(200).decode(errors="replace").strip()
            return resp.status == 200, f"HTTP {resp.status} {body}"
    except urllib.error.HTTPError as exc:
        return False, f"HTTP {exc.code} {exc.reason}"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return False, str(reason)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("  | " + line for line in text[-lines:])


def wait_server(url: str, pid: int, log: Path, timeout: float) -> None:
    """Wait until URL/health answers 200; fail early if the server process died."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        ok, last = _health(url)
        if ok:
            return
        if not _alive(pid):
            raise ToolError(f"the MLflow server (pid {pid}) exited before it answered; "
                            f"its log {log}:\n{_tail(log)}")
        time.sleep(0.25)
    raise ToolError(f"the MLflow server did not answer {url}/health within {timeout:.0f} s "
                    f"(last: {last}); its log {log}:\n{_tail(log)}")


def check_server(url: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise ToolError(f"MLFLOW_TRACKING_URI={url!r} is not a server URL: the stack scenario "
                        "needs http(s)://HOST:PORT as printed by ./stack_deploy.sh")
    ok, detail = _health(url, timeout=10)
    if not ok:
        raise ToolError(f"no MLflow server answers at {url}/health ({detail}). Is the stack "
                        "deployed and running? Deploy it with ./stack_deploy.sh, check it with "
                        "./show_all.sh, then export the MLFLOW_TRACKING_URI it prints.")
    return detail


def show_dir(root: Path) -> str:
    """The tree below ROOT, like `tree`, with file sizes; stable order."""
    if not root.is_dir():
        raise ToolError(f"{root} is not a directory")
    lines = [str(root)]
    count = {"dirs": 0, "files": 0}

    def walk(folder: Path, prefix: str) -> None:
        entries = sorted(folder.iterdir(), key=lambda p: (p.is_file(), p.name))
        for index, entry in enumerate(entries):
            last = index == len(entries) - 1
            branch = "└── " if last else "├── "
            if entry.is_dir() and not entry.is_symlink():
                count["dirs"] += 1
                lines.append(f"{prefix}{branch}{entry.name}/")
                walk(entry, prefix + ("    " if last else "│   "))
            else:
                count["files"] += 1
                lines.append(f"{prefix}{branch}{entry.name}  ({entry.lstat().st_size} B)")

    walk(root, "")
    if count["dirs"] == count["files"] == 0:
        lines.append("(empty: nothing was written here)")
    lines.append(f"\n{count['dirs']} directories, {count['files']} files")
    return "\n".join(lines)


# The tables worth showing row by row, with the columns that tell the story.
_SQLITE_DETAIL = {
    "experiments": "SELECT experiment_id, name, artifact_location, lifecycle_stage FROM experiments",
    "runs": "SELECT run_uuid, experiment_id, status, artifact_uri FROM runs",
    "params": "SELECT run_uuid, key, value FROM params",
    "metrics": "SELECT run_uuid, key, step, value FROM metrics ORDER BY run_uuid, key, step",
    "latest_metrics": "SELECT run_uuid, key, step, value FROM latest_metrics",
}


def show_sqlite(db: Path) -> str:
    if not db.is_file():
        raise ToolError(f"{db} does not exist: nothing was logged to SQLite")
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        counts = {t: conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables}
        filled = [t for t in tables if counts[t]]
        lines = [f"{db}: {len(tables)} tables, {len(filled)} with rows"]
        lines.append("  rows: " + ", ".join(f"{t}={counts[t]}" for t in filled))
        lines.append(f"  the other {len(tables) - len(filled)} tables (model registry, traces, "
                     "datasets, ...) are empty")
        for table, query in _SQLITE_DETAIL.items():
            if table not in counts:
                continue
            cursor = conn.execute(query)
            header = [c[0] for c in cursor.description]
            rows = cursor.fetchmany(12)
            lines.append(f"\n  {table} ({counts[table]} rows)")
            lines.append("    " + " | ".join(header))
            lines += ["    " + " | ".join(str(v) for v in row) for row in rows]
            if counts[table] > len(rows):
                lines.append(f"    ... {counts[table] - len(rows)} more")
    finally:
        conn.close()
    return "\n".join(lines)


def describe_run(run_id: str) -> dict:
    """Everything about a run, read back through the MLflow client as any other
    process would: params, full metric histories, and every artifact file
    (downloaded, with size, sha256 and, for small text files, the text)."""
    import hashlib
    import tempfile

    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    run = client.get_run(run_id)
    experiment = client.get_experiment(run.info.experiment_id)
    metrics = {}
    for key in sorted(run.data.metrics):
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        metrics[key] = [[m.step, m.value] for m in history]

    def walk(path: str | None) -> list[str]:
        found = []
        for info in client.list_artifacts(run_id, path):
            found += walk(info.path) if info.is_dir else [info.path]
        return found

    artifacts = {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in walk(None):
            local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path,
                                                             dst_path=tmp))
            data = local.read_bytes()
            entry = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            if len(data) <= 4096:
                try:
                    entry["text"] = data.decode()
                except UnicodeDecodeError:
                    pass
            artifacts[path] = entry
    return {
        "tracking_uri": client.tracking_uri,
        "experiment": {"id": experiment.experiment_id, "name": experiment.name,
                       "artifact_location": experiment.artifact_location},
        "run_id": run.info.run_id,
        "status": run.info.status,
        "artifact_uri": run.info.artifact_uri,
        "params": dict(sorted(run.data.params.items())),
        "metrics": metrics,
        "artifacts": artifacts,
    }


def show_run(run_id: str) -> str:
    info = describe_run(run_id)
    lines = [
        f"Read back through MlflowClient (tracking URI {info['tracking_uri']}):",
        f"  experiment    {info['experiment']['name']} (id {info['experiment']['id']})",
        f"  artifact root {info['experiment']['artifact_location']}",
        f"  run           {info['run_id']} ({info['status']})",
        f"  artifact URI  {info['artifact_uri']}",
        f"  params        {info['params']}",
    ]
    for key, history in info["metrics"].items():
        lines.append(f"  metric {key:<6} " + ", ".join(f"step {s}: {v}" for s, v in history))
    files = [f"{path} ({entry['size']} B)" for path, entry in info["artifacts"].items()]
    lines.append("  artifacts     " + (", ".join(files) or "(none)"))
    return "\n".join(lines)


def run_id_from(output: Path) -> str:
    for line in reversed(output.read_text(errors="replace").splitlines()):
        if line.startswith("run_id="):
            return line.split("=", 1)[1].strip()
    raise ToolError(f"the quickstart printed no run_id= line (see {output})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="_scenario_tools.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("free-port")
    p = sub.add_parser("wait-server")
    p.add_argument("url")
    p.add_argument("pid", type=int)
    p.add_argument("log", type=Path)
    p.add_argument("--timeout", type=float, default=90)
    p = sub.add_parser("check-server")
    p.add_argument("url")
    p = sub.add_parser("show-dir")
    p.add_argument("dir", type=Path)
    p = sub.add_parser("show-sqlite")
    p.add_argument("db", type=Path)
    p = sub.add_parser("show-run")
    p.add_argument("run_id")
    p = sub.add_parser("run-json")
    p.add_argument("run_id")
    p = sub.add_parser("run-id")
    p.add_argument("output", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "free-port":
            print(free_port())
        elif args.command == "wait-server":
            wait_server(args.url, args.pid, args.log, args.timeout)
        elif args.command == "check-server":
            print(check_server(args.url))
        elif args.command == "show-dir":
            print(show_dir(args.dir))
        elif args.command == "show-sqlite":
            print(show_sqlite(args.db))
        elif args.command == "show-run":
            print(show_run(args.run_id))
        elif args.command == "run-json":
            print(json.dumps(describe_run(args.run_id), indent=1))
        elif args.command == "run-id":
            print(run_id_from(args.output))
    except ToolError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
