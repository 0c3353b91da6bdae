"""Swarm mode's stack file (stack/swarm.py), made from the real compose file as
Compose resolves it, and the checks of a swarm's state."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from stack import compose, envfile, paths, secretfiles, settings, swarm

from static_checks import compose_config


@pytest.fixture
def config(tmp_path):
    """The resolved compose file (gc profile on), with the files it names made: the stack
    file reads the secret, certificate and template files it turns into swarm objects."""
    return with_files(compose_config(tmp_path, extra={"COMPOSE_PROFILES": "gc"}), tmp_path)


def with_files(resolved, tmp_path):
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


IMAGE_ID = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"


def make(config, registry="registry.example.com:5000", key=b"k"):
    ids = {svc["image"]: IMAGE_ID for svc in config["services"].values() if svc["image"].startswith(swarm.BUILT_HERE)}
    return swarm.stack_file(config, registry, private_files=[key_path(config)], ids=ids, key=key)


def test_every_service_keeps_its_image_command_healthcheck_and_hardening(config):
    document = make(config)
    assert set(document["services"]) == set(config["services"])
    for name, svc in document["services"].items():
        source = config["services"][name]
        for key in ("command", "healthcheck", "environment", "read_only", "cap_drop", "cap_add", "logging"):
            if source.get(key) is not None and key != "environment":
                assert svc[key] == source[key], (name, key)
        added = ("STACK_WAIT_FOR_SCHEMA", "STACK_STOP_DRAIN_SECONDS")
        assert {k: v for k, v in svc.get("environment", {}).items() if k not in added} == \
            source.get("environment", {}), name
        assert not set(svc) & swarm.DROPPED, name
        assert svc["deploy"]["endpoint_mode"] == "dnsrr"
        if source.get("mem_limit"):
            assert svc["deploy"]["resources"]["limits"]["memory"] == str(source["mem_limit"])


def test_images_built_here_come_from_the_registry(config):
    services = make(config)["services"]
    # Named by the image's own ID: a rebuilt image is a new name, which Swarm rolls out.
    assert services["mlflow"]["image"] == \
        "registry.example.com:5000/" + config["services"]["mlflow"]["image"] + "-0123456789ab"
    assert services["db"]["image"].startswith("registry.example.com:5000/mlflow-stack/db:local-")
    # Upstream images are pulled by their own names.
    assert services["minio"]["image"] == config["services"]["minio"]["image"]
    assert make(config, registry="")["services"]["mlflow"]["image"] == config["services"]["mlflow"]["image"]


def test_jobs_and_waits_come_from_the_compose_file(config):
    assert swarm.jobs(config) == ["bucket-init", "migrate"]
    assert swarm.waits_for_schema(config) == ["gc", "mlflow"]
    first = swarm.stores_first(make(config), config)
    assert set(first["services"]) == {"db", "minio", "migrate", "bucket-init"}
    # Deployed before those: the stores alone, for the schema check and a pre-upgrade backup.
    assert set(swarm.stores_first(make(config), config, with_jobs=False)["services"]) == {"db", "minio"}


def test_jobs_stores_and_the_edge_get_their_own_deploy_rules(config):
    services = make(config)["services"]
    for job in swarm.jobs(config):
        assert services[job]["deploy"]["mode"] == "replicated-job"
        assert services[job]["deploy"]["restart_policy"]["condition"] == "on-failure"
    # pitr reads db-data: beside it.
    assert "pitr" in services and "pitr" in swarm.BESIDE_STORES
    for name in (*swarm.STATEFUL, *swarm.BESIDE_STORES):
        deploy = services[name]["deploy"]
        assert deploy["placement"]["constraints"] == [f"node.labels.{swarm.DATA_LABEL} == true"]
        assert deploy["replicas"] == 1 and deploy["update_config"]["order"] == "stop-first"
    assert services["nginx"]["deploy"]["mode"] == "global"
    assert all(p["mode"] == "host" for p in services["nginx"]["ports"])
    mlflow = services["mlflow"]["deploy"]
    assert mlflow["replicas"] == config["services"]["mlflow"]["deploy"]["replicas"]
    assert mlflow["update_config"]["order"] == "start-first"
    assert mlflow["update_config"]["failure_action"] == "rollback"
    for name in swarm.waits_for_schema(config):
        assert services[name]["environment"]["STACK_WAIT_FOR_SCHEMA"] == "true"


def test_a_server_behind_nginx_serves_on_after_its_stop_while_nginx_may_still_send_to_it(config):
    services = make(config)["services"]
    dns = int(config["services"]["nginx"]["environment"]["NGINX_DNS_SECONDS"])
    template = (paths.ROOT / "nginx" / "templates" / "mlflow.conf.template").read_text()
    assert "resolver 127.0.0.11 valid=${NGINX_DNS_SECONDS}s" in template
    assert config["services"]["mlflow"]["environment"]["NGINX_DNS_SECONDS"] == str(dns)
    server = services["mlflow"]
    drain = int(server["environment"]["STACK_STOP_DRAIN_SECONDS"])
    assert drain == dns + swarm.DRAIN_MARGIN and swarm.DRAIN_MARGIN > 0
    assert server["stop_grace_period"] == f"{drain + swarm.STOP_GRACE}s"
    assert swarm.BEHIND_NGINX == ("mlflow",)
    for name, service in services.items():
        if name not in swarm.BEHIND_NGINX:
            assert "STACK_STOP_DRAIN_SECONDS" not in (service.get("environment") or {}), name


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
    """Swarm cannot change a config or secret in place: a changed file must be a new object.
    The names' hashes are keyed: without the key, a name does not confirm a guessed value."""
    before = make(config)
    assert make(config) == before
    assert set(make(config, key=b"other")["secrets"]) != set(before["secrets"])
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
    config["name"] = "x" * (swarm.MAX_PROJECT + 1)
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
    # Attachable: the backup scripts' one-off jobs join it from a manager.
    assert networks["backend"] == {"driver": "overlay", "internal": True, "attachable": True}
    assert "attachable" not in networks["frontend"]
    assert networks["frontend"]["driver"] == "overlay" and "internal" not in networks["frontend"]


def test_tmpfs_sizes_keep_their_unit():
    assert swarm._tmpfs("/cache:size=64m,uid=1")["tmpfs"]["size"] == 64 << 20
    assert swarm._tmpfs("/x") == {"type": "tmpfs", "target": "/x"}


def test_options_it_would_lose_are_refused(config):
    config["volumes"]["db-data"]["driver"] = "nfs"
    with pytest.raises(swarm.SwarmError, match="driver"):
        make(config)
    del config["volumes"]["db-data"]["driver"]
    config["services"]["db"]["security_opt"] = ["seccomp=unconfined"]
    with pytest.raises(swarm.SwarmError, match="security_opt"):
        make(config)


def test_profiles_and_keys_it_cannot_carry_are_refused(config, tmp_path):
    with_monitoring = compose_config(tmp_path, extra={"COMPOSE_PROFILES": "monitoring"})
    with pytest.raises(swarm.SwarmError, match="monitoring"):
        swarm.stack_file(with_monitoring, "", private_files=[key_path(config)])
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
    # A replaced server still serving out its drain.
    ([{"Name": "s_mlflow", "Replicas": "3/2", "update": "completed"}], []),
    ([{"Name": "s_mlflow", "Replicas": "1/2", "update": "completed"}], ["s_mlflow: 1/2"]),
])
def test_unsettled_names_what_is_not_as_deployed(rows, problems):
    assert swarm.unsettled(rows) == problems


class FakeDocker:
    """swarm._docker's answers for preflight: docker info, node ls, version."""

    def __init__(self, state="active", manager=True, nodes=3, labelled=1, cli="28.2.2"):
        self.info = {"LocalNodeState": state, "ControlAvailable": manager, "Nodes": nodes}
        self.labelled, self.cli = labelled, cli

    def __call__(self, *args, check=True):
        if args[:1] == ("info",):
            out = json.dumps(self.info)
        elif args[:2] == ("node", "ls"):
            out = "\n".join(f"node{i}" for i in range(self.labelled))
        else:
            out = self.cli
        return subprocess.CompletedProcess(args, 0, out, "")


GOOD = {"STACK_REGISTRY": "registry.example.com:5000", "BIND_ADDRESS": "0.0.0.0", "COMPOSE_PROFILES": "gc"}


@pytest.mark.parametrize("docker, values, compose_running, expected", [
    (FakeDocker(), GOOD, False, []),
    (FakeDocker(state="inactive"), GOOD, False, ["docker swarm init"]),
    (FakeDocker(manager=False), GOOD, False, ["manager node"]),
    (FakeDocker(labelled=0), GOOD, False, ["0 nodes carry the label"]),
    (FakeDocker(labelled=2), GOOD, False, ["2 nodes carry the label"]),
    (FakeDocker(cli="20.10.24"), GOOD, False, ["26.0 or later"]),
    (FakeDocker(), {**GOOD, "STACK_REGISTRY": ""}, False, ["set STACK_REGISTRY"]),
    (FakeDocker(), {**GOOD, "BIND_ADDRESS": "127.0.0.1"}, False, ["BIND_ADDRESS=0.0.0.0"]),
    (FakeDocker(), {**GOOD, "COMPOSE_PROFILES": "gc,monitoring"}, False, ["not available in swarm mode"]),
    (FakeDocker(), GOOD, True, ["take it down first"]),
    # Stores outside the stack: no node keeps data, so none needs the label.
    (FakeDocker(labelled=0), {**GOOD, "POSTGRES_HOST": "pg.example.com", "S3_ENDPOINT_URL": "https://s3.example.com"},
     False, []),
    (FakeDocker(labelled=0), {**GOOD, "POSTGRES_HOST": "pg.example.com"}, False, ["0 nodes carry the label"]),
])
def test_preflight_says_what_stops_a_swarm_deploy(monkeypatch, docker, values, compose_running, expected):
    monkeypatch.setattr(swarm, "_docker", docker)
    problems = swarm.preflight(values, "mlflow-stack", compose_running)
    assert len(problems) == len(expected), problems
    for problem, words in zip(problems, expected):
        assert words in problem, problem


def test_stores_outside_the_stack_leave_no_stateful_service_and_a_route_out(tmp_path):
    outside = with_files(compose_config(tmp_path, extra={"POSTGRES_HOST": "pg.example.com",
                                                         "S3_ENDPOINT_URL": "https://s3.example.com"}), tmp_path)
    document = make(outside)
    assert not {"db", "minio"} & set(document["services"])
    assert not any("placement" in svc["deploy"] for svc in document["services"].values())
    assert document["networks"]["backend"].get("internal") is not True
    assert set(swarm.stores_first(document, outside)["services"]) == {"migrate", "bucket-init"}
    assert document["services"]["migrate"]["environment"]["POSTGRES_HOST"] == "pg.example.com"


def test_one_off_jobs_join_the_swarm_stacks_stores_network(tmp_path):
    """`python3 -m stack swarm-compose run ...` (backups, restores, gc, the schema check on a
    swarm): the same services, secrets and hardening as Compose's, on the swarm stack's
    attachable backend network instead of one Compose would make."""
    plain = compose_config(tmp_path, extra={"COMPOSE_PROJECT_NAME": "team-a"})
    argv, environ = compose.invocation({**os.environ, "STACK_ENV_FILE": str(tmp_path / ".env"),
                                        "STACK_CERT_DIR": str(tmp_path / "certs"), "COMPOSE_PROJECT_NAME": "team-a"},
                                       on_swarm=True)
    assert str(paths.SWARM_ONE_OFF_FILE) in argv
    result = subprocess.run([*argv, "--profile", "backup", "--profile", "gc", "config", "--format", "json"],
                            capture_output=True, text=True, env=environ, check=True)
    on_swarm = json.loads(result.stdout)
    # The network the override names is the one the stack file makes attachable.
    assert set(on_swarm["networks"]) >= {swarm.ONE_OFF_NETWORK}
    backend = on_swarm["networks"][swarm.ONE_OFF_NETWORK]
    assert (backend["name"], backend["external"], backend.get("internal")) == ("team-a_backend", True, None)
    for service in ("migrate", "backup", "gc"):
        assert on_swarm["services"][service]["networks"] == {swarm.ONE_OFF_NETWORK: None}
    assert on_swarm["services"]["migrate"] == plain["services"]["migrate"]
    # The same secrets, where Compose's (with the default profiles) has more services: each secret
    # the one-off jobs use is Compose's own, and each job gets the ones it gets there.
    assert on_swarm["secrets"] == {k: v for k, v in plain["secrets"].items() if k in on_swarm["secrets"]}
    for name in set(on_swarm["services"]) & set(plain["services"]):
        assert on_swarm["services"][name].get("secrets") == plain["services"][name].get("secrets"), name


def test_the_server_tier_a_restore_stops_comes_from_the_stack_file(config):
    document = make(config)
    assert swarm.servers(document) == {"gc": 1, "mlflow": int(settings.default("MLFLOW_REPLICAS"))}
    document["services"]["mlflow"]["deploy"]["replicas"] = 3
    assert swarm.servers(document)["mlflow"] == 3


def _service(mode: dict, update: str = "", job_iteration: int | None = None) -> dict:
    service = {"ID": "svc", "Spec": {"Name": "s_x", "Mode": mode}}
    if update:
        service["UpdateStatus"] = {"State": update, "Message": "update rolled back due to failure"}
    if job_iteration is not None:
        service["JobStatus"] = {"JobIteration": {"Index": job_iteration}}
    return service


def _task(state: str, slot: int = 1, node: str = "n1", desired: str = "running", iteration: int | None = None,
          err: str = "") -> dict:
    task = {"Slot": slot, "NodeID": node, "DesiredState": desired, "Status": {"State": state, "Err": err}}
    if iteration is not None:
        task["JobIteration"] = {"Index": iteration}
    return task


REPLICATED = {"Replicated": {"Replicas": 2}}


@pytest.mark.parametrize("service, tasks, verdict, what", [
    # Two slots running on the deployed spec, and no update under way (created, or unchanged).
    (_service(REPLICATED), [_task("running", 1), _task("running", 2)], "done", "s_x: 2/2 running"),
    (_service(REPLICATED, "completed"), [_task("running", 1), _task("running", 2)], "done", "s_x: 2/2 running"),
    # Just deployed, no task on the new spec yet (the old ones are not up to date): not done.
    (_service(REPLICATED), [], "waiting", "s_x: 0/2 running"),
    # A slot whose new task still starts (its healthcheck has not passed yet).
    (_service(REPLICATED), [_task("running", 1), _task("starting", 2)], "waiting", "s_x: 1/2 running"),
    (_service(REPLICATED), [_task("running", 1), _task("failed", 2, desired="shutdown", err="exit 1"),
                            _task("starting", 2)], "waiting", "s_x: 1/2 running (last error: exit 1)"),
    # Every new task runs, but Swarm still watches them (its update monitor): not done.
    (_service(REPLICATED, "updating"), [_task("running", 1), _task("running", 2)], "waiting",
     "s_x: update in progress"),
    (_service(REPLICATED, "rollback_completed"), [_task("running", 1), _task("running", 2)], "failed",
     "s_x: update rollback_completed (update rolled back due to failure)"),
    (_service(REPLICATED, "paused"), [], "failed", "s_x: update paused (update rolled back due to failure)"),
    (_service({"Global": {}}), [_task("running", node="a"), _task("running", node="b")], "done", "s_x: 2/2 running"),
    (_service({"Global": {}}), [_task("running", node="a"), _task("preparing", node="b")], "waiting",
     "s_x: 1/2 running"),
    (_service({"Global": {}}), [], "waiting", "s_x: 0/0 running"),
    # A job counts the tasks of its current run only.
    (_service({"ReplicatedJob": {"TotalCompletions": 1}}, job_iteration=3),
     [_task("complete", desired="complete", iteration=2)], "waiting", "s_x: 0/1 completed"),
    (_service({"ReplicatedJob": {"TotalCompletions": 1}}, job_iteration=3),
     [_task("complete", desired="complete", iteration=2), _task("complete", desired="complete", iteration=3)],
     "done", "s_x: 1/1 completed"),
    (_service({"ReplicatedJob": {}}, job_iteration=0),
     [_task("failed", desired="complete", iteration=0, err="no store")], "waiting",
     "s_x: 0/1 completed (last failure: no store)"),
])
def test_a_deployed_service_is_done_when_its_tasks_on_the_new_spec_run_and_swarm_finished_updating(
        service, tasks, verdict, what):
    assert swarm.convergence(service, tasks) == (verdict, what)


@pytest.mark.parametrize("states, status, said", [
    ([[("waiting", "s_db: 0/1 running")], [("waiting", "s_db: 0/1 running")], [("done", "s_db: 1/1 running")]],
     0, ["waiting for s_db: 0/1 running", "1 service(s) run as deployed"]),
    ([[("waiting", "s_db: update in progress")], [("failed", "s_db: update rollback_completed")]],
     1, ["waiting for s_db: update in progress", "s_db: update rollback_completed"]),
])
def test_swarm_wait_polls_until_every_service_is_done_and_stops_at_a_failure(monkeypatch, tmp_path, capsys,
                                                                             states, status, said):
    from stack import __main__ as cli

    file = tmp_path / "stack.json"
    file.write_text(json.dumps({"services": {"db": {}}}))
    asked = []

    def deployed_state(project, names):
        asked.append(names)
        return states[len(asked) - 1]

    monkeypatch.setattr(swarm, "deployed_state", deployed_state)
    monkeypatch.setattr("time.sleep", lambda _s: None)
    assert cli.main(["swarm-wait", "--timeout", "900", str(file)]) == status
    assert asked == [["db"]] * len(states)
    assert [line.strip() for line in capsys.readouterr().err.splitlines()] == said


def test_swarm_wait_gives_up_after_its_timeout(monkeypatch, tmp_path, capsys):
    from stack import __main__ as cli

    file = tmp_path / "stack.json"
    file.write_text(json.dumps({"services": {"db": {}}}))
    monkeypatch.setattr(swarm, "deployed_state", lambda project, names: [("waiting", "s_db: 0/1 running")])
    monkeypatch.setattr("time.sleep", lambda _s: None)
    assert cli.main(["swarm-wait", "--timeout", "0", str(file)]) == 1
    assert "still not as deployed after 0 s" in capsys.readouterr().err


def test_deployed_state_leaves_out_tasks_on_nodes_that_are_down(monkeypatch):
    service = {"ID": "svc", "Spec": {"Name": "p_mlflow", "Mode": {"Replicated": {"Replicas": 1}}}}
    tasks = [dict(_task("starting", slot=1, node="lost"), ServiceID="svc"),  # its node went away
             dict(_task("running", slot=1, node="alive"), ServiceID="svc")]
    outputs = {"service": json.dumps([service]), "inspect": json.dumps(tasks),
               "node": "lost Down\nalive Ready\n"}
    calls = []

    def docker(*args, check=True, timeout=None):
        calls.append((args[:2], timeout))
        out = "t1\nt2\n" if args[:2] == ("service", "ps") else outputs[args[0]]
        return subprocess.CompletedProcess(args, 0, out, "")

    monkeypatch.setattr(swarm, "_docker", docker)
    assert swarm.deployed_state("p", ["mlflow", "nginx"]) == [("done", "p_mlflow: 1/1 running"),
                                                                ("waiting", "p_nginx: not created yet")]
    # Each docker call has a bound: a hung engine cannot outlast the deploy's timeout.
    assert all(timeout for _args, timeout in calls)
    outputs["node"] = "lost Ready\nalive Ready\n"
    assert swarm.deployed_state("p", ["mlflow"]) == [("waiting", "p_mlflow: 0/1 running")]


def test_deployed_state_waits_when_the_engine_does_not_answer(monkeypatch):
    def docker(*args, check=True, timeout=None):
        raise subprocess.TimeoutExpired(["docker", *args], timeout)

    monkeypatch.setattr(swarm, "_docker", docker)
    assert swarm.deployed_state("p", ["db"]) == [("waiting", "the Docker engine did not answer within 60 s")]
