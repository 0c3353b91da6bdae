"""The compose file as Compose reads it with a generated .env: services, networks, profiles,
hardening, stores outside the stack, the labels that recreate a service."""

import os
import re
import subprocess

import pytest

from static_checks import ROOT, compose_config
from stack import compose, envfile, settings


def test_compose_file_is_valid_with_a_generated_env(tmp_path):
    assert set(compose_config(tmp_path)["services"]) == {"db", "pitr", "minio", "bucket-init", "migrate", "mlflow",
                                                         "nginx"}


def test_compose_without_env_names_the_fix(tmp_path):
    """`docker compose` by hand, without the scripts' values, says what to run."""
    empty = tmp_path / "empty.env"
    empty.write_text("")
    result = subprocess.run(["docker", "compose", "-f", str(ROOT / "docker-compose.yml"),
                             "--env-file", str(empty), "config", "-q"],
                            capture_output=True, text=True, check=False)
    assert result.returncode != 0
    assert "stack_deploy.sh" in result.stderr or ".env.example" in result.stderr


def test_only_nginx_publishes_ports_and_stores_are_internal(tmp_path):
    config = compose_config(tmp_path, "--profile", "*")
    assert [n for n, svc in config["services"].items() if svc.get("ports")] == ["nginx"]
    assert config["networks"]["backend"].get("internal") is True
    for name in ("db", "minio"):
        assert set(config["services"][name]["networks"]) == {"backend"}


@pytest.mark.parametrize("outside, gone", [
    ({"POSTGRES_HOST": "pg.example.com", "POSTGRES_PORT": "6432"}, {"db", "pitr"}),
    ({"S3_ENDPOINT_URL": "https://s3.example.com/"}, {"minio"}),
    ({"POSTGRES_HOST": "10.1.2.3", "S3_ENDPOINT_URL": "http://10.1.2.3:9000"}, {"db", "pitr", "minio"}),
])
def test_stores_outside_the_stack_are_not_started_and_are_reached_by_route_out(tmp_path, outside, gone):
    default = compose_config(tmp_path)
    assert {"db", "minio"} <= set(default["services"])
    config = compose_config(tmp_path, extra=outside)
    assert set(default["services"]) - set(config["services"]) == gone
    # A store outside needs a route out of the backend network.
    assert config["networks"]["backend"].get("internal") is not True
    env = config["services"]["migrate"]["environment"]
    if "db" in gone:
        assert (env["POSTGRES_HOST"], env["POSTGRES_PORT"]) == (outside["POSTGRES_HOST"],
                                                               outside.get("POSTGRES_PORT", "5432"))
        # Compose keeps the dependency, and starts without it: it is not required.
        assert config["services"]["migrate"]["depends_on"]["db"]["required"] is False
    else:
        assert (env["POSTGRES_HOST"], env["POSTGRES_PORT"]) == ("db", "5432")
    if "minio" in gone:
        assert env["S3_INTERNAL_ENDPOINT"] == outside["S3_ENDPOINT_URL"].rstrip("/")
        assert config["services"]["nginx"]["depends_on"]["minio"]["required"] is False
    else:
        assert env["S3_INTERNAL_ENDPOINT"] == "http://minio:9000"
    # The user's COMPOSE_PROFILES is not changed by the stores' profiles.
    # From the shell they are ignored: a stray export must not move the stores.
    stale = {"STACK_POSTGRES_HOST": "evil.example", "STACK_S3_ENDPOINT": "http://evil.example",
             "STACK_BACKEND_INTERNAL": "false", "STACK_OUTSIDE_STORES": "postgres s3"}
    argv, environ = compose.invocation({**os.environ, "STACK_ENV_FILE": str(tmp_path / ".env"), **outside, **stale,
                                        "COMPOSE_PROFILES": ""})
    assert environ["COMPOSE_PROFILES"] == "db,minio" and environ["STACK_POSTGRES_HOST"] == "db"
    assert (environ["STACK_S3_ENDPOINT"], environ["STACK_BACKEND_INTERNAL"], environ["STACK_OUTSIDE_STORES"]) == \
        ("http://minio:9000", "true", "")
    exported = dict(compose.environment({**envfile.load(tmp_path / ".env"), **outside}, create=False,
                                        environ={"STACK_ENV_FILE": str(tmp_path / ".env")}))
    assert exported["COMPOSE_PROFILES"] == ""


def test_every_long_running_service_has_healthcheck_restart_and_log_rotation():
    text = (ROOT / "docker-compose.yml").read_text()
    body = text.split("\nservices:\n", 1)[1].split("\nnetworks:\n", 1)[0]
    for block in (b.strip() for b in re.split(r"\n  (?=[a-z-]+:\n)", body)):
        name = block.split(":", 1)[0].strip()
        assert "logging: *logging" in block, name
        assert "restart:" in block, name
        if name not in ("bucket-init", "migrate"):
            assert "healthcheck:" in block, name


def test_every_service_is_hardened(tmp_path):
    services = compose_config(tmp_path, "--profile", "*")["services"]
    assert set(services) == {"db", "pitr", "minio", "bucket-init", "migrate", "mlflow", "nginx", "backup", "gc",
                             "prometheus", "postgres-exporter", "node-exporter", "nginx-exporter", "alertmanager"}
    for name, svc in services.items():
        assert "no-new-privileges:true" in svc.get("security_opt", []), name
        assert svc.get("cap_drop") == ["ALL"], name
        assert svc.get("read_only") is True, name
        assert svc.get("mem_limit"), name
        # Secrets arrive as files, never as plain environment values.
        for key, value in (svc.get("environment") or {}).items():
            assert not (key.endswith(("PASSWORD", "SECRET_KEY", "SECRET_ACCESS_KEY")) and value), (name, key)


def test_images_of_services_whose_profile_is_off_are_not_needed():
    from stack import pins

    assert pins.pin_profiles()["PROMETHEUS_IMAGE"] == {"monitoring"}
    assert pins.pin_profiles()["NGINX_IMAGE"] == set()
    off = {u.var for u in pins.upstream_images({"COMPOSE_PROFILES": "backup"}, {})}
    on = {u.var for u in pins.upstream_images({"COMPOSE_PROFILES": "backup,monitoring"}, {})}
    assert "PROMETHEUS_IMAGE" not in off and {"PROMETHEUS_IMAGE", "NODE_EXPORTER_IMAGE"} <= on
    assert {"POSTGRES_IMAGE", "NGINX_IMAGE", "MINIO_IMAGE"} <= off


def test_the_profiles_setting_knows_every_compose_profile_and_a_deploy_retires_the_others():
    from stack import pins

    blocks = pins._service_blocks(ROOT)
    stores = {service for service, *_ in settings.STORES_SETTINGS}
    assert set().union(*(profiles for _, profiles in blocks.values())) == set(settings.PROFILES) | stores
    assert pins.inactive_services(set(settings.PROFILES) | stores) == []
    active = set(settings.compose_profiles({"COMPOSE_PROFILES": "backup"}).split(","))
    assert pins.inactive_services(active) == ["alertmanager", "gc", "nginx-exporter", "node-exporter", "postgres-exporter",
                                              "prometheus"]
    active = set(settings.compose_profiles({"COMPOSE_PROFILES": "", "POSTGRES_HOST": "pg.example.com"}).split(","))
    assert "db" in pins.inactive_services(active) and "minio" not in pins.inactive_services(active)
    assert "mlflow" not in pins.inactive_services(set())


def test_services_of_the_mlflow_image_own_their_tmp_as_its_user(tmp_path):
    """Docker 20.10 remounts a tmpfs as root's (mode 755) on a restart: only the owner survives."""
    uid = re.search(r"^USER (\d+):(\d+)$", (ROOT / "mlflow/Dockerfile").read_text(), re.M)
    services = compose_config(tmp_path, "--profile", "*")["services"]
    for name, svc in services.items():
        if svc["image"].startswith("mlflow-stack/mlflow:"):
            for mount in svc.get("tmpfs", []):
                assert mount.endswith(f":uid={uid[1]},gid={uid[2]}"), (name, mount)
    assert services["mlflow"]["tmpfs"] == [f"/run/mlflow-stack:uid={uid[1]},gid={uid[2]}"]


def test_a_changed_file_read_at_start_changes_the_label_that_recreates_its_service(tmp_path):
    """nginx (templates, certificate) and Prometheus (configuration, alert rules) read
    their bind-mounted files only at start: the deploy labels them with a digest of
    those files, so Compose recreates them when one changed, and only then."""
    rules = tmp_path / "mine.yml"
    rules.write_text("groups: []\n")
    extra = {"COMPOSE_PROFILES": "monitoring", "PROMETHEUS_ALERT_RULES": str(rules)}

    def labels(config):
        return {svc: config["services"][svc]["labels"]["stack.config-digest"] for svc in ("nginx", "prometheus")}

    first = labels(compose_config(tmp_path, extra=extra))
    assert labels(compose_config(tmp_path, extra=extra)) == first
    rules.write_text("groups: [{name: mine, rules: []}]\n")
    second = labels(compose_config(tmp_path, extra=extra))
    assert second["prometheus"] != first["prometheus"] and second["nginx"] == first["nginx"]

    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "a.conf.template").write_text("server {}\n")
    before = compose.files_digest([templates, tmp_path / "no-cert-yet.crt"])
    (templates / "a.conf.template").write_text("server { listen 1; }\n")
    after = compose.files_digest([templates, tmp_path / "no-cert-yet.crt"])
    (templates / "b.conf.template").write_text("")
    assert len({before, after, compose.files_digest([templates, tmp_path / "no-cert-yet.crt"])}) == 3


def test_a_changed_secret_changes_the_label_that_recreates_its_readers():
    from stack import secretfiles, settings

    values = {s.key: ("x" * 32 if s.generated else s.default) for s in settings.SETTINGS}
    values["MLFLOW_FLASK_SECRET_KEY"] = "k" * 32
    first = secretfiles.digest(values)
    assert secretfiles.digest(dict(values)) == first
    assert secretfiles.digest({**values, "STACK_NGINX_TOKEN": "y" * 32}) != first
    # Keyed: the same secrets under another installation's key give another label.
    assert secretfiles.digest({**values, "MLFLOW_FLASK_SECRET_KEY": "j" * 32}) != first
