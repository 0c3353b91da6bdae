"""Swarm mode's stack file (stack/swarm.py), made from the real compose file as
Compose resolves it, and the checks of a swarm's state."""

import json
import subprocess
from pathlib import Path

import pytest

from stack import envfile, secretfiles, swarm

from test_static import compose_config


@pytest.fixture
def config(tmp_path):
    """The resolved compose file (gc profile on), with the files it names made: the stack
    file reads the secret, certificate and template files it turns into swarm objects."""
    resolved = compose_config(tmp_path, "--profile", "gc")
    values = envfile.effective(envfile.parse((tmp_path / ".env").read_text()))
    secretfiles.write(values, Path(next(iter(resolved["secrets"].values()))["file"]).parent)
    for svc in resolved["services"].values():
        for volume in svc.get("volumes", []):
            path = Path(volume.get("source", ""))
            if volume["type"] == "bind" and path.is_relative_to(tmp_path) and not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(f"material of {path.name}\n")
    return resolved


def key_path(config):
    return next(v["source"] for v in config["services"]["nginx"]["volumes"] if v["target"].endswith(".key"))


def make(config, registry="registry.example.com:5000"):
    return swarm.stack_file(config, registry, private_files=[key_path(config)])


def test_every_service_keeps_its_image_command_healthcheck_and_hardening(config):
    document = make(config)
    assert set(document["services"]) == set(config["services"])
    for name, svc in document["services"].items():
        source = config["services"][name]
        for key in ("command", "healthcheck", "environment", "read_only", "cap_drop", "cap_add", "logging"):
            if source.get(key) is not None and key != "environment":
                assert svc[key] == source[key], (name, key)
        assert {k: v for k, v in svc.get("environment", {}).items() if k != "STACK_WAIT_FOR_SCHEMA"} == \
            source.get("environment", {}), name
        assert not set(svc) & swarm.DROPPED, name
        assert svc["deploy"]["endpoint_mode"] == "dnsrr"
        if source.get("mem_limit"):
            assert svc["deploy"]["resources"]["limits"]["memory"] == str(source["mem_limit"])


def test_images_built_here_come_from_the_registry(config):
    services = make(config)["services"]
    assert services["mlflow"]["image"] == "registry.example.com:5000/" + config["services"]["mlflow"]["image"]
    # Upstream images are pulled by their own names.
    assert services["db"]["image"] == config["services"]["db"]["image"]
    assert make(config, registry="")["services"]["mlflow"]["image"] == config["services"]["mlflow"]["image"]


def test_jobs_stores_and_the_edge_get_their_own_deploy_rules(config):
    services = make(config)["services"]
    for job in swarm.JOBS:
        assert services[job]["deploy"]["mode"] == "replicated-job"
        assert services[job]["deploy"]["restart_policy"]["condition"] == "on-failure"
    for name in swarm.STATEFUL:
        deploy = services[name]["deploy"]
        assert deploy["placement"]["constraints"] == [f"node.labels.{swarm.DATA_LABEL} == true"]
        assert deploy["replicas"] == 1 and deploy["update_config"]["order"] == "stop-first"
    assert services["nginx"]["deploy"]["mode"] == "global"
    assert all(p["mode"] == "host" for p in services["nginx"]["ports"])
    mlflow = services["mlflow"]["deploy"]
    assert mlflow["replicas"] == config["services"]["mlflow"]["deploy"]["replicas"]
    assert mlflow["update_config"]["order"] == "start-first"
    assert mlflow["update_config"]["failure_action"] == "rollback"
    for name in swarm.WAIT_FOR_SCHEMA:
        assert services[name]["environment"]["STACK_WAIT_FOR_SCHEMA"] == "true"


def test_bind_mounts_become_configs_and_the_key_a_private_secret(config):
    document = make(config)
    nginx = document["services"]["nginx"]
    assert not [v for v in nginx["volumes"] if v["type"] == "bind"]
    targets = {ref["target"]: ref for ref in nginx["configs"]}
    templates = [v["source"] for v in config["services"]["nginx"]["volumes"] if v["target"] == "/etc/nginx/templates"]
    for template in Path(templates[0]).iterdir():
        assert f"/etc/nginx/templates/{template.name}" in targets
        assert document["configs"][targets[f"/etc/nginx/templates/{template.name}"]["source"]]["file"] == str(template)
    (key,) = [ref for ref in nginx["secrets"] if ref["target"] == "/etc/nginx/tls/server.key"]
    assert key["mode"] == 0o400 and key["source"] in document["secrets"]
    # Compose's secrets keep their file names under /run/secrets.
    names = {ref["target"] for ref in document["services"]["mlflow"]["secrets"]}
    assert names == {ref["source"] for ref in config["services"]["mlflow"]["secrets"]}
    for ref in document["services"]["mlflow"]["secrets"]:
        assert ref["source"] in document["secrets"]


def test_a_changed_file_gets_a_new_name_and_no_value_is_in_the_file(config, tmp_path):
    """Swarm cannot change a config or secret in place: a changed file must be a new object."""
    before = make(config)
    path = config["secrets"]["postgres_password"]["file"]
    value = open(path).read()
    with open(path, "w") as fh:
        fh.write("another-password-of-enough-length")
    after = make(config)
    assert set(before["secrets"]) != set(after["secrets"])
    assert "another-password-of-enough-length" not in json.dumps(after) and value not in json.dumps(before)


def test_object_names_fit_swarms_limit_with_the_stack_name_in_front(config):
    config["name"] = "a-long-project-name-of-forty-characters"
    document = make(config)
    for name in [*document["secrets"], *document["configs"]]:
        assert len(f"{config['name']}_{name}") <= swarm.MAX_NAME, name
    config["name"] = "x" * 60
    with pytest.raises(swarm.SwarmError, match="COMPOSE_PROJECT_NAME"):
        make(config)


def test_tmpfs_and_shm_become_mounts(config):
    db = make(config)["services"]["db"]
    mounts = {v["target"]: v for v in db["volumes"]}
    assert mounts["/dev/shm"]["tmpfs"]["size"] == int(config["services"]["db"]["shm_size"])
    assert mounts["/var/lib/postgresql/data"]["type"] == "volume"
    mlflow = {v["target"]: v for v in make(config)["services"]["mlflow"]["volumes"]}
    assert mlflow["/run/mlflow-stack"]["type"] == "tmpfs"


def test_the_store_network_stays_internal_and_both_are_overlays(config):
    networks = make(config)["networks"]
    assert networks["backend"] == {"driver": "overlay", "attachable": True, "internal": True}
    assert networks["frontend"]["driver"] == "overlay" and "internal" not in networks["frontend"]


def test_profiles_and_keys_it_cannot_carry_are_refused(config, tmp_path):
    with_monitoring = compose_config(tmp_path, "--profile", "monitoring")
    with pytest.raises(swarm.SwarmError, match="monitoring"):
        swarm.stack_file(with_monitoring, "")
    config["services"]["mlflow"]["devices"] = ["/dev/fuse"]
    with pytest.raises(swarm.SwarmError, match="devices"):
        make(config)


def test_docker_stack_accepts_the_file(config, tmp_path):
    """`docker stack config` checks a stack file against the CLI's schema, without a swarm."""
    path = tmp_path / "stack.json"
    path.write_text(json.dumps(make(config)))
    result = subprocess.run(["docker", "stack", "config", "-c", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "replicated-job" in result.stdout


@pytest.mark.parametrize("rows, problems", [
    ([{"Name": "s_mlflow", "Replicas": "2/2", "update": "completed"},
      {"Name": "s_migrate", "Replicas": "0/1 (1/1 completed)", "update": ""}], []),
    ([{"Name": "s_mlflow", "Replicas": "1/2", "update": ""}], ["s_mlflow: 1/2"]),
    ([{"Name": "s_migrate", "Replicas": "1/1 (0/1 completed)", "update": ""}], ["s_migrate: 1/1 (0/1 completed)"]),
    ([{"Name": "s_mlflow", "Replicas": "2/2", "update": "rollback_completed"}], ["s_mlflow: update rollback_completed"]),
    ([{"Name": "s_nginx", "Replicas": "0/0", "update": ""}], ["s_nginx: 0/0"]),
])
def test_unsettled_names_what_is_not_as_deployed(rows, problems):
    assert swarm.unsettled(rows) == problems
