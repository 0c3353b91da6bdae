"""The stack scripts' own behaviour, without bringing the stack up."""

import os
import re
import socket
import subprocess
import uuid
from pathlib import Path

import pytest

from stack import envfile, paths

from pki import make_ca, make_server

ROOT = paths.ROOT


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(script, *args, env_file, extra=None):
    environ = {**os.environ, "STACK_ENV_FILE": str(env_file),
               "COMPOSE_PROJECT_NAME": f"mlflowunit{uuid.uuid4().hex[:8]}", **(extra or {})}
    return subprocess.run([str(ROOT / script), *args], capture_output=True, text=True,
                          env=environ, stdin=subprocess.DEVNULL, timeout=300, check=False)


def test_deploy_usage_offers_standins(tmp_path):
    usage = run("stack_deploy.sh", "--help", env_file=tmp_path / ".env").stdout
    assert "--standins" in usage and "NOT for production" in usage


SCRIPTS = ["stack_deploy.sh", "stack_remove.sh", "show_all.sh", "stack_gc.sh", "stack_users.sh",
           "db/db_volume_backup.sh", "db/db_volume_restore.sh"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_one_command_line_convention(script, tmp_path):
    """--help: the usage, naming the script as it is called, exit 0; a wrong command line:
    the usage and the error on stderr, exit 2 (other failures exit 1), nothing done."""
    shown = run(script, "--help", env_file=tmp_path / ".env")
    assert shown.returncode == 0 and "Usage:" in shown.stdout and script in shown.stdout, shown
    bad = run(script, "--frobnicate", env_file=tmp_path / ".env")
    assert bad.returncode == 2, (bad.returncode, bad.stderr)
    assert "--frobnicate" in bad.stderr and ("Usage:" in bad.stderr or "usage:" in bad.stderr), bad.stderr
    assert not (tmp_path / ".env").exists()
    version = run(script, "--version", env_file=tmp_path / ".env")
    assert version.returncode == 0 and version.stdout == f"{Path(script).name} {(ROOT / 'VERSION').read_text()}"


@pytest.mark.parametrize("script", ["stack_deploy.sh", "db/db_volume_restore.sh"])
def test_a_deploy_timeout_that_is_no_number_is_named(script, tmp_path):
    args = ["--dry-run"] if script == "stack_deploy.sh" else []
    bad = run(script, *args, env_file=tmp_path / ".env", extra={"DEPLOY_TIMEOUT": "15m"})
    assert bad.returncode == 1 and "DEPLOY_TIMEOUT must be a whole number of seconds, got '15m'" in bad.stderr, bad
    assert not (tmp_path / ".env").exists()


def test_a_deploy_over_another_release_says_so(tmp_path):
    env = tmp_path / ".env"
    project = f"mlflowunit{uuid.uuid4().hex[:8]}"
    recorded = tmp_path / ".stack-state" / project / "release"
    recorded.parent.mkdir(parents=True)
    recorded.write_text("0.9.0\n")
    environ = {**os.environ, "STACK_ENV_FILE": str(env), "COMPOSE_PROJECT_NAME": project, "PYTHONPATH": str(ROOT)}
    said = subprocess.run(["python3", "-m", "stack", "env"], env=environ, capture_output=True, text=True, cwd=ROOT)
    version = (ROOT / "VERSION").read_text().strip()
    assert f"deployed by release 0.9.0; this is {version}" in said.stdout and "CHANGELOG.md" in said.stdout, said
    subprocess.run(["python3", "-m", "stack", "release-deployed"], env=environ, check=True, cwd=ROOT)
    assert recorded.read_text() == version + "\n"
    again = subprocess.run(["python3", "-m", "stack", "env"], env=environ, capture_output=True, text=True, cwd=ROOT)
    assert "deployed by release" not in again.stdout


def test_users_without_an_action_is_a_usage_error(tmp_path):
    bare = run("stack_users.sh", env_file=tmp_path / ".env")
    assert bare.returncode == 2 and "which action?" in bare.stderr and "list" in bare.stderr
    helped = run("stack_users.sh", "add", "--help", env_file=tmp_path / ".env")
    assert "./stack_users.sh add" in helped.stdout and "python3 -m stack" not in helped.stdout


def test_dry_run_changes_nothing(tmp_path):
    env = tmp_path / ".env"
    result = run("stack_deploy.sh", "--dry-run", env_file=env,
                 extra={"BIND_ADDRESS": "127.0.0.1", "HTTP_PORT": str(free_port()), "S3_PORT": str(free_port())})
    assert "would create" in result.stdout, result.stdout + result.stderr
    failed = [line for line in result.stdout.splitlines() if line.startswith("preflight: FAIL")]
    if failed:
        # No registry here (and no stand-ins given): only images fail, and the fix is named last.
        assert result.returncode == 1 and all(line.startswith("preflight: FAIL image ") for line in failed), failed
        assert "./stack_deploy.sh --standins" in result.stderr and "NOT for production" in result.stderr
    else:
        assert result.returncode == 0, result.stdout + result.stderr
        assert "Dry run" in result.stderr
    assert not env.exists()


def test_standins_dry_run_builds_nothing_and_remembers_nothing(tmp_path):
    env = tmp_path / ".env"
    result = run("stack_deploy.sh", "--standins", "--dry-run", env_file=env,
                 extra={"BIND_ADDRESS": "127.0.0.1", "HTTP_PORT": str(free_port()), "S3_PORT": str(free_port())})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "would switch STACK_STANDINS from false to true" in result.stdout
    assert "preflight: FAIL" not in result.stdout and "Dry run" in result.stderr
    assert "standin:" not in result.stderr
    assert not env.exists() and not (tmp_path / ".stack-state").exists()


def test_bad_env_stops_deploy_with_the_reasons_and_keeps_the_file(tmp_path):
    env = tmp_path / ".env"
    envfile.ensure(env)
    text = env.read_text().replace("HTTP_PORT=8080", "HTTP_PORT=eighty").replace("MLFLOW_BUCKET=mlflow", "MLFLOW_BUCKET=")
    env.write_text(text)
    result = run("stack_deploy.sh", "--yes", env_file=env)
    assert result.returncode == 2
    assert "HTTP_PORT='eighty'" in result.stderr and "MLFLOW_BUCKET is empty" in result.stderr
    assert env.read_text() == text


def test_wrong_variant_is_refused_before_anything_runs(tmp_path):
    result = run("stack_deploy.sh", "--variant", "docker", env_file=tmp_path / ".env")
    assert result.returncode == 2 and "use pip or conda" in result.stderr
    assert not (tmp_path / ".env").exists()


def test_port_in_use_stops_deploy_in_preflight(tmp_path):
    env = tmp_path / ".env"
    envfile.ensure(env)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        result = run("stack_deploy.sh", "--yes", env_file=env,
                     extra={"BIND_ADDRESS": "127.0.0.1", "HTTP_PORT": str(port), "S3_PORT": str(port + 1)})
    assert result.returncode == 1
    assert f"127.0.0.1:{port} is in use" in result.stdout
    assert "fix the failures above" in result.stderr


def test_purge_without_a_terminal_needs_yes(tmp_path):
    result = run("stack_remove.sh", "--purge", env_file=tmp_path / ".env")
    assert result.returncode != 0 and "--yes" in result.stderr
    assert "Removing" not in result.stderr


def test_remove_of_an_absent_stack_works_even_without_env(tmp_path):
    result = run("stack_remove.sh", env_file=tmp_path / ".env")
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / ".env").exists()


def test_show_all_without_env_says_how_to_create_it(tmp_path):
    result = run("show_all.sh", env_file=tmp_path / ".env")
    assert result.returncode == 2 and "run ./stack_deploy.sh" in result.stderr


def test_values_reach_shell_quoted_even_with_spaces(tmp_path, monkeypatch):
    """A certificate path with a space survives `eval` of the exports (it broke the deploy once)."""
    folder = tmp_path / "my certs"
    folder.mkdir()
    make_ca(folder, "root")
    make_server(folder, "root", names="DNS:localhost")
    (folder / "server.crt").rename(folder / "server.pem")
    monkeypatch.setenv("MLFLOW_PUBLIC_HOST", "localhost")
    env = tmp_path / ".env"
    envfile.ensure(env)
    env.write_text(env.read_text().replace("TLS_CERT_FILE=\n", f"TLS_CERT_FILE={folder}/server.pem\n")
                   .replace("TLS_KEY_FILE=\n", f"TLS_KEY_FILE='{folder}/server.key'\n")
                   .replace("TLS_CA_FILE=\n", f"TLS_CA_FILE='{folder}/root.crt'\n"))
    script = ('. "$STACK_ROOT/scripts/lib.sh"; load_compose_env; '
              'printf "%s\\n%s\\n%s\\n" "$STACK_TLS_CERT" "$STACK_TLS_KEY" "$STACK_SECRETS_DIR"')
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=False,
                            env={**os.environ, "STACK_ROOT": str(ROOT), "STACK_ENV_FILE": str(env),
                                 "COMPOSE_PROJECT_NAME": "mlflowunitquote"})
    assert result.returncode == 0, result.stderr
    cert, key, secrets_dir = result.stdout.splitlines()
    assert cert == f"{folder}/server.pem" and key == f"{folder}/server.key"
    assert (Path(secrets_dir) / "postgres_password").read_text() == envfile.parse(env.read_text())["POSTGRES_PASSWORD"]


def test_shell_never_parses_env():
    """Values reach shell only as export lines from Python (stack/compose.py)."""
    scripts = [p for p in ROOT.rglob("*.sh") if ".venv" not in p.parts and "tests" not in p.parts
               and "examples" not in p.parts]
    for script in scripts:
        for line in script.read_text().splitlines():
            code = line.split("#", 1)[0]
            assert not re.search(r"\b(grep|sed|awk|cut|read)\b.*(STACK_ENV_FILE|env_file|\.env\b)", code), (script, line)
            assert not re.search(r"^\s*(\.|source)\s+\S*(STACK_ENV_FILE|\.env\b)", code), (script, line)


@pytest.mark.parametrize("counts, holds", [
    ({}, "no"), ({"experiments": 1, "runs": 0}, "no"), ({"experiments": 2, "runs": 0}, "yes"),
    ({"experiments": 1, "runs": 1}, "yes"),
])
def test_whether_a_database_holds_data_reaches_shell_as_an_export(counts, holds):
    import json

    out = subprocess.run(["python3", "-m", "stack", "holds-data", json.dumps(counts)], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert out == f"export STACK_HOLDS_DATA={holds}\n"


def test_a_restore_plan_reaches_shell_as_quoted_exports():
    import json

    plan = {"target": "2026-12-07 10:00:00+00", "target_iso": "2026-12-07T10:00:00+00:00",
            "backup": {"id": "20261207T0900"}, "timeline": 2}
    out = subprocess.run(["python3", "-m", "stack", "restore-plan", json.dumps(plan)], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    shown = subprocess.run(["bash", "-c", f'{out}\nprintf "%s|" "$PLAN_TARGET" "$PLAN_TARGET_ISO" "$PLAN_BACKUP_ID" '
                                          '"$PLAN_TIMELINE"'], capture_output=True, text=True, check=True).stdout
    assert shown == "2026-12-07 10:00:00+00|2026-12-07T10:00:00+00:00|20261207T0900|2|"


def test_the_restore_script_parses_no_json():
    assert "python3 -c" not in (ROOT / "db" / "db_volume_restore.sh").read_text()
