"""What the static checks share: the real compose file as the scripts call Compose (on a
generated .env), and the command-line tools tests/run.sh installs."""

import json
import os
import re
import shutil
import subprocess

from stack import compose, envfile, paths

ROOT = paths.ROOT
SHELL_SCRIPTS = sorted(
    [p for p in ROOT.rglob("*.sh") if ".venv" not in p.parts and ".cache" not in p.parts]
    + [ROOT / ".ci" / "run", ROOT / "tests/standins/minio/minio", ROOT / "tests/standins/minio/mc"]
)
DOCKERFILES = sorted(p for p in ROOT.rglob("Dockerfile*") if ".venv" not in p.parts)


def tool(name):
    path = shutil.which(name)
    assert path, f"{name} is not installed: tests/run.sh installs it from tests/requirements.txt"
    return path


def compose_config(tmp_path, *args, extra=None, check=True):
    """`docker compose config` the way the scripts call Compose, on a generated .env."""
    env = tmp_path / ".env"
    if not env.exists():
        envfile.ensure(env)
    extra = dict(extra or {})
    only_in_env = {k: extra.pop(k) for k in list(extra) if not envfile.from_shell(k)}
    if only_in_env:
        # Settings only .env sets (Setting.from_shell): a copy of .env with them.
        text = env.read_text()
        for key, value in only_in_env.items():
            text = re.sub(rf"^{key}=.*$", f"{key}={value}", text, flags=re.M)
        env = tmp_path / ".env.outside"
        env.write_text(text)
    argv, environ = compose.invocation({**os.environ, "STACK_ENV_FILE": str(env),
                                        "STACK_CERT_DIR": str(tmp_path / "certs"), **extra})
    result = subprocess.run([*argv, *args, "config", "--format", "json"], capture_output=True, text=True,
                            env=environ, check=False)
    if check:
        assert result.returncode == 0, result.stderr
    return json.loads(result.stdout) if result.returncode == 0 else result


