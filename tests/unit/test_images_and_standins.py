"""The first run without a registry: the image preflight, the stand-in record, --standins."""

import os
import re
import stat
import time

import pytest

from stack import __main__ as cli
from stack import compose, envfile, paths, pins, preflight, settings, standins

# What a default deploy needs (no optional profile on, the stack's own stores; test_static checks those).
DEFAULT_PROFILES = set(settings.compose_profiles({}).split(","))
PINS = {var: pin for var, pin in pins.image_pins().items()
        if var != "MLFLOW_CONDA_BASE_IMAGE" and not pins.pin_profiles().get(var, set()) - DEFAULT_PROFILES}
ALL_STANDINS = frozenset(PINS)
NO_DNS = "no DNS answer for registry-1.docker.io"


@pytest.fixture
def docker(monkeypatch):
    """A fake engine: `present` images are here, `pullable` ones a registry has."""

    class Engine:
        present: set = set()
        pullable: set = set()
        probed: list = []

    engine = Engine()
    engine.probed = []
    monkeypatch.setattr(preflight, "image_present", lambda image: image in engine.present)

    def probe(image):
        engine.probed.append(image)
        return (True, "") if image in engine.pullable else (False, NO_DNS)

    monkeypatch.setattr(preflight, "pull_probe", probe)
    monkeypatch.setattr(standins, "available_for", lambda: ALL_STANDINS)
    return engine


def values(**extra):
    return {"MLFLOW_VARIANT": "pip", "STACK_STANDINS": "false", **extra}


def test_images_here_are_not_probed(docker):
    docker.present = set(PINS.values())
    checks = preflight.check_images(values(), environ={})
    assert all(c.ok for c in checks) and len(checks) == 4
    assert docker.probed == []


def test_only_missing_images_are_probed_and_pullable_ones_pass(docker):
    docker.present = {PINS["POSTGRES_IMAGE"]}
    docker.pullable = set(PINS.values())
    checks = preflight.check_images(values(), environ={})
    assert all(c.ok for c in checks)
    assert sorted(docker.probed) == sorted(set(PINS.values()) - {PINS["POSTGRES_IMAGE"]})


def test_without_a_registry_the_failure_names_every_image_and_standins(docker):
    checks = preflight.check_images(values(), environ={})
    assert [c.ok for c in checks] == [False] * 4
    assert NO_DNS in checks[0].detail
    fix = checks[0].fix
    assert all(c.fix == fix for c in checks)
    assert "./stack_deploy.sh --standins" in fix and "NOT for production" in fix
    for image in PINS.values():
        assert image in fix
    assert "registry-mirrors" in fix


def test_the_override_is_the_image_checked(docker):
    docker.present = {"registry.example.com/postgres:17"}
    checks = preflight.check_images(values(), environ={"POSTGRES_IMAGE": "registry.example.com/postgres:17"})
    postgres = next(c for c in checks if "POSTGRES_IMAGE" in c.name)
    assert postgres.ok and "registry.example.com/postgres:17" in postgres.detail
    assert "registry.example.com/postgres:17" not in docker.probed


def test_an_override_in_env_file_counts_too(docker):
    checks = preflight.check_images(values(NGINX_IMAGE="mine/nginx:1"), environ={})
    nginx = next(c for c in checks if "NGINX_IMAGE" in c.name)
    assert not nginx.ok and "set by you" in nginx.detail
    assert "unset NGINX_IMAGE" in nginx.fix and PINS["NGINX_IMAGE"] in nginx.fix


def test_with_standins_missing_images_pass_as_standins(docker):
    checks = preflight.check_images(values(STACK_STANDINS="true"), environ={})
    assert all(c.ok for c in checks)
    assert all("stand-in" in c.detail and "not production" in c.detail for c in checks)


def test_standins_never_replace_an_image_you_chose(docker):
    checks = preflight.check_images(values(STACK_STANDINS="true"), environ={"MINIO_IMAGE": "mine/minio:1"})
    minio = next(c for c in checks if "MINIO_IMAGE" in c.name)
    assert not minio.ok and "MINIO_IMAGE=mine/minio:1" in minio.fix


def test_the_conda_base_has_no_standin(docker):
    conda = pins.image_pins()["MLFLOW_CONDA_BASE_IMAGE"]
    checks = preflight.check_images(values(STACK_STANDINS="true", MLFLOW_VARIANT="conda"), environ={})
    base = next(c for c in checks if "MLFLOW_BASE_IMAGE" in c.name)
    assert not base.ok and conda in base.detail and "no offline stand-in" in base.fix
    assert all(c.ok for c in checks if c is not base)


@pytest.mark.parametrize("text, expected", [
    ('Error response from daemon: Get "https://registry-1.docker.io/v2/": dial tcp: lookup '
     "registry-1.docker.io on 10.255.255.53:53: no such host", "no DNS answer for registry-1.docker.io"),
    ('Error response from daemon: Get "https://mirror.example.com:5000/v2/": dial tcp 10.0.0.9:5000: '
     "i/o timeout", "mirror.example.com:5000: i/o timeout"),
    ("Error response from daemon: pull access denied for nosuch/image, repository does not exist or may "
     "require 'docker login': denied: requested access to the resource is denied",
     "the registry has no such image, or refuses it: pull access denied; check the name, or docker login"),
    ("Error response from daemon: manifest for nginx:9.9 not found: manifest unknown: manifest unknown",
     "the registry has no such image, or refuses it: not found: manifest unknown; check the name, or docker login"),
    ("Error response from daemon: something new", "something new"),
])
def test_pull_errors_in_a_few_words(text, expected):
    assert preflight.pull_error(text) == expected


@pytest.fixture
def fake_pull(tmp_path, monkeypatch):
    """A `docker` on PATH whose `pull` runs the given shell snippet."""
    def make(snippet):
        script = tmp_path / "docker"
        script.write_text(f"#!/bin/sh\n{snippet}\n")
        script.chmod(0o755)
        monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    return make


def test_probe_stops_the_pull_once_the_registry_answered(fake_pull):
    fake_pull('echo "17.12-trixie: Pulling from library/postgres"; sleep 30')
    started = time.monotonic()
    assert preflight.pull_probe("postgres:17.12-trixie", timeout=20) == (True, "")
    assert time.monotonic() - started < 10


def test_probe_gives_up_on_a_silent_registry(fake_pull):
    fake_pull("sleep 30")
    started = time.monotonic()
    ok, why = preflight.pull_probe("postgres:17.12-trixie", timeout=0.5)
    assert not ok and "no answer from the registry within" in why
    assert time.monotonic() - started < 10


def test_probe_reports_the_pull_error(fake_pull):
    fake_pull('echo \'Error response from daemon: Get "https://registry-1.docker.io/v2/": dial tcp: lookup '
              'registry-1.docker.io on 10.0.0.2:53: no such host\' >&2; exit 1')
    assert preflight.pull_probe("nginx:1.30.6-trixie", timeout=20) == (False, NO_DNS)


def test_preflight_prints_each_fix_once_and_last(tmp_path, monkeypatch, capsys):
    env = tmp_path / ".env"
    envfile.ensure(env)
    monkeypatch.setenv("STACK_ENV_FILE", str(env))
    fix = "No registry can provide a, b.\n  To try the stack out anyway:  ./stack_deploy.sh --standins"
    monkeypatch.setattr(preflight, "run", lambda values, swarm=False: [
        preflight.Check("docker engine", True, "20.10"),
        preflight.Check("image A", False, "a: no", fix=fix),
        preflight.Check("port 1 (HTTP_PORT)", False, "in use"),
        preflight.Check("image B", False, "b: no", fix=fix)])
    assert cli.main(["preflight"]) == 1
    out, err = capsys.readouterr()
    assert "FAIL image A" in out and "FAIL port 1" in out
    assert err.count("--standins") == 1
    assert err.rstrip().endswith("./stack_deploy.sh --standins")


def test_preflight_standins_option_counts_as_the_setting(tmp_path, monkeypatch):
    env = tmp_path / ".env"
    envfile.ensure(env)
    monkeypatch.setenv("STACK_ENV_FILE", str(env))
    seen = {}
    monkeypatch.setattr(preflight, "run", lambda values, swarm=False: seen.update(values) or [])
    assert cli.main(["preflight", "--standins"]) == 0
    assert seen["STACK_STANDINS"] == "true"
    assert envfile.parse(env.read_text())["STACK_STANDINS"] == "false"


# --- --standins is remembered -------------------------------------------------

def test_standins_option_is_remembered_in_env(tmp_path):
    env = tmp_path / ".env"
    result = envfile.ensure(env, standins=True)
    assert result.create and result.switched == {"STACK_STANDINS": ("false", "true")}
    assert envfile.parse(env.read_text())["STACK_STANDINS"] == "true"
    again = envfile.ensure(env)
    assert not again.changes and envfile.parse(env.read_text())["STACK_STANDINS"] == "true"
    assert stat.S_IMODE(env.stat().st_mode) == 0o600


def test_standins_option_in_a_dry_run_changes_nothing(tmp_path):
    env = tmp_path / ".env"
    envfile.ensure(env)
    before = env.read_text()
    result = envfile.plan(env, standins=True)
    assert result.switched == {"STACK_STANDINS": ("false", "true")} and "STACK_STANDINS=true" in result.text
    assert env.read_text() == before


def test_an_old_env_gets_the_key_and_the_option_at_once(tmp_path):
    env = tmp_path / ".env"
    envfile.ensure(env)
    env.write_text(env.read_text().replace("STACK_STANDINS=false\n", ""))
    result = envfile.ensure(env, standins=True)
    assert result.added == ["STACK_STANDINS"]
    assert envfile.parse(env.read_text())["STACK_STANDINS"] == "true"


# --- The record of the stand-ins a stack uses ------------------------------

STANDIN_OUTPUT = ("export POSTGRES_IMAGE=mlflow-stack-standin/postgres:245b9be25d73\n"
                  "export MINIO_IMAGE=mlflow-stack-standin/minio:718d871d7722\n"
                  "export MLFLOW_BASE_IMAGE=mlflow-stack-standin/python:2b0cdebd4c50\n")


def stack_environ(tmp_path, standins_on=True, **extra):
    env = tmp_path / ".env"
    if not env.exists():
        envfile.ensure(env, standins=standins_on)
    return {"PATH": os.environ["PATH"], "STACK_ENV_FILE": str(env), "COMPOSE_PROJECT_NAME": "unitstandins",
            "STACK_CERT_DIR": str(tmp_path / "certs"), **extra}


def test_parse_exports_takes_only_image_lines():
    text = STANDIN_OUTPUT + "export PATH=/evil\nstandin: progress\nexport NGINX_IMAGE='a b'\n"
    assert standins.parse_exports(text) == {
        "POSTGRES_IMAGE": "mlflow-stack-standin/postgres:245b9be25d73",
        "MINIO_IMAGE": "mlflow-stack-standin/minio:718d871d7722",
        "MLFLOW_BASE_IMAGE": "mlflow-stack-standin/python:2b0cdebd4c50"}


def test_every_compose_call_uses_the_recorded_standins(tmp_path):
    environ = stack_environ(tmp_path)
    standins.write_record(standins.parse_exports(STANDIN_OUTPUT), environ)
    assert standins.record_path(environ).parent == paths.state_dir(environ)
    _, env = compose.invocation(environ)
    assert env["POSTGRES_IMAGE"] == "mlflow-stack-standin/postgres:245b9be25d73"
    assert env["MLFLOW_BASE_IMAGE"] == "mlflow-stack-standin/python:2b0cdebd4c50"
    assert "NGINX_IMAGE" not in env


def test_recorded_standins_yield_to_overrides_and_to_the_setting(tmp_path):
    environ = stack_environ(tmp_path, POSTGRES_IMAGE="mine/postgres:17")
    standins.write_record(standins.parse_exports(STANDIN_OUTPUT), environ)
    _, env = compose.invocation(environ)
    assert env["POSTGRES_IMAGE"] == "mine/postgres:17"
    assert env["MINIO_IMAGE"] == "mlflow-stack-standin/minio:718d871d7722"
    _, env = compose.invocation({**environ, "STACK_STANDINS": "false"})
    assert "MINIO_IMAGE" not in env


def test_the_scripts_own_exports_are_no_override(tmp_path):
    """After load_compose_env the shell carries the stand-ins; the end-of-deploy reminder still names them."""
    environ = stack_environ(tmp_path)
    standins.write_record(standins.parse_exports(STANDIN_OUTPUT), environ)
    _, exported = compose.invocation(environ)
    again = {**environ, **{k: exported[k] for k in ("POSTGRES_IMAGE", "MINIO_IMAGE", "MLFLOW_BASE_IMAGE")}}
    assert standins.in_use(envfile.load(tmp_path / ".env"), again) == standins.parse_exports(STANDIN_OUTPUT)


def test_the_conda_variant_builds_on_its_own_base(tmp_path):
    environ = stack_environ(tmp_path, MLFLOW_VARIANT="conda")
    standins.write_record(standins.parse_exports(STANDIN_OUTPUT), environ)
    _, env = compose.invocation(environ)
    assert env["MLFLOW_BASE_IMAGE"] == pins.image_pins()["MLFLOW_CONDA_BASE_IMAGE"]
    assert env["POSTGRES_IMAGE"] == "mlflow-stack-standin/postgres:245b9be25d73"


def test_build_runs_the_script_records_and_names_the_standins(tmp_path, monkeypatch):
    script = tmp_path / "standin-images.sh"
    script.write_text("#!/bin/sh\necho 'standin: building' >&2\n"
                      + "".join(f"echo '{line}'\n" for line in STANDIN_OUTPUT.splitlines()))
    script.chmod(0o755)
    monkeypatch.setattr(standins, "SCRIPT", script)
    environ = stack_environ(tmp_path)
    vals = envfile.load(tmp_path / ".env")
    used = standins.build(vals, environ)
    assert used == standins.read_record(environ) == standins.parse_exports(STANDIN_OUTPUT)
    text = standins.banner(used, vals, environ)
    assert "NOT for production" in text and "STACK_STANDINS=false" in text
    assert re.search(rf"{re.escape(pins.image_pins()['POSTGRES_IMAGE'])} +replaced by  "
                     r"mlflow-stack-standin/postgres:245b9be25d73", text)
    assert "nginx" not in text


def test_a_failing_script_says_what_to_do(tmp_path, monkeypatch):
    script = tmp_path / "standin-images.sh"
    script.write_text("#!/bin/sh\necho 'standin: error: debootstrap is needed' >&2\nexit 1\n")
    script.chmod(0o755)
    monkeypatch.setattr(standins, "SCRIPT", script)
    environ = stack_environ(tmp_path)
    with pytest.raises(standins.StandinError, match="debootstrap.*registry"):
        standins.build(envfile.load(tmp_path / ".env"), environ)


def test_no_standins_needed_leaves_no_record(tmp_path):
    environ = stack_environ(tmp_path)
    standins.write_record({"NGINX_IMAGE": "mlflow-stack-standin/nginx:1"}, environ)
    standins.write_record({}, environ)
    assert not standins.record_path(environ).exists()


def test_the_script_lists_what_it_can_stand_in_for():
    standins.available_for.cache_clear()
    # Every pin, the optional profiles' images included.
    assert standins.available_for() == {var for var in pins.image_pins() if var != "MLFLOW_CONDA_BASE_IMAGE"}
