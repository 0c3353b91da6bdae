"""Static checks: the real compose file, Dockerfiles, shell scripts, pins."""

import json
import os
import re
import shutil
import subprocess

import pytest

from stack import common, compose, envfile, paths, pins, settings

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


def test_compose_file_is_valid_with_a_generated_env(tmp_path):
    assert set(compose_config(tmp_path)["services"]) == {"db", "minio", "bucket-init", "migrate", "mlflow", "nginx"}


def test_generated_files_match_the_settings_table():
    """.env.example and the configuration reference's table come from stack/settings.py;
    regenerate them with `python3 -m stack.settings write` after changing the table."""
    assert (ROOT / ".env.example").read_text() == settings.example_text()
    assert settings.settings_table() in (ROOT / settings.TABLE_PAGE).read_text()


def test_every_default_and_rule_round_trips():
    for s in settings.SETTINGS:
        if not s.generated and s.default != "":
            s.rule(s.key, s.default)
        for other in s.rule.others:
            s.rule(s.key, other)
    assert settings.validate({s.key: s.default if not s.generated else "x" * 32 for s in settings.SETTINGS}) == []


def _services_reading(config: dict, needle: str) -> set[str]:
    return {name for name, svc in config["services"].items() if needle in json.dumps(svc)}


def test_compose_reads_each_setting_where_the_table_says(tmp_path):
    """Each key's `services` in stack/settings.py is exactly where Compose uses it:
    change the value, and only those services' configuration changes."""
    every = ("--profile", "*")
    base = compose_config(tmp_path, *every)
    wrong = []
    for s in settings.SETTINGS:
        if s.file:
            readers = {n for n, svc in base["services"].items()
                       if any(sec.get("source") == s.file for sec in svc.get("secrets", []))}
        else:
            # COMPOSE_PROFILES selects services: compare without forcing every profile on.
            profiles = () if s.key == "COMPOSE_PROFILES" else every
            base = compose_config(tmp_path, *profiles)
            changed = compose_config(tmp_path, *profiles, extra={s.key: s.rule.other_than(s.default)})
            readers = {n for n in base["services"].keys() | changed["services"].keys()
                       if base["services"].get(n) != changed["services"].get(n)}
        if readers != set(s.services):
            wrong.append(f"{s.key}: table says {sorted(s.services)}, compose reads it in {sorted(readers)}")
    assert not wrong, "\n".join(wrong)


def test_compose_file_has_no_second_default_for_a_setting():
    text = (ROOT / "docker-compose.yml").read_text()
    for key in re.findall(r"\$\{([A-Z][A-Z0-9_]*):?-", text):
        assert key not in settings.BY_KEY, f"{key} has a default in docker-compose.yml; its one home is stack/settings.py"


def test_shared_module_has_one_copy_that_both_images_take():
    for dockerfile in ("mlflow/Dockerfile", "db/Dockerfile"):
        assert "stack/common.py" in (ROOT / dockerfile).read_text(), dockerfile
    copies = [p for p in ROOT.rglob("*.py") if ".venv" not in p.parts and "def secret(name" in p.read_text()
              and p.parent.name != "unit"]
    assert copies == [ROOT / "stack" / "common.py"], copies


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
    ({"POSTGRES_HOST": "pg.example.com", "POSTGRES_PORT": "6432"}, {"db"}),
    ({"S3_ENDPOINT_URL": "https://s3.example.com/"}, {"minio"}),
    ({"POSTGRES_HOST": "10.1.2.3", "S3_ENDPOINT_URL": "http://10.1.2.3:9000"}, {"db", "minio"}),
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


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_hadolint(dockerfile):
    result = subprocess.run([tool("hadolint"), "--failure-threshold", "warning", str(dockerfile)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shellcheck(script):
    result = subprocess.run([tool("shellcheck"), "-x", "-P", "SCRIPTDIR", str(script)],
                            capture_output=True, text=True, check=False, cwd=script.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_yamllint():
    files = [ROOT / "docker-compose.yml", ROOT / "mlflow" / "conda.yml"]
    result = subprocess.run([tool("yamllint"), "-d", "{extends: default, rules: {line-length: {max: 120}, document-start: disable, truthy: {check-keys: false}}}",
                             *map(str, files)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout


def test_every_image_is_pinned_to_a_version():
    found = pins.image_pins()
    assert set(found) == {"POSTGRES_IMAGE", "MINIO_IMAGE", "NGINX_IMAGE", "MLFLOW_BASE_IMAGE", "MLFLOW_CONDA_BASE_IMAGE",
                          "PROMETHEUS_IMAGE", "POSTGRES_EXPORTER_IMAGE", "NODE_EXPORTER_IMAGE"}
    for name, image in found.items():
        tag = image.rsplit(":", 1)[-1]
        assert ":" in image and tag != "latest" and re.search(r"\d", tag), f"{name}={image} is not pinned"


def test_conda_variant_uses_the_pip_variant_pins():
    conda = (ROOT / "mlflow/conda.yml").read_text()
    assert "- -r requirements.txt" in conda and "- -c constraints.txt" in conda
    pip_python = re.search(r"python:(\d+\.\d+\.\d+)", pins.image_pins()["MLFLOW_BASE_IMAGE"]).group(1)
    assert f"- python={pip_python}" in conda
    install = (ROOT / "mlflow/install-env.sh").read_text()
    assert "conda env create" in install and "--file conda.yml" in install


def test_constraints_lock_agrees_with_requirements():
    locked = dict(l.split("==", 1) for l in (ROOT / "mlflow/constraints.txt").read_text().splitlines()
                  if "==" in l and not l.startswith("#"))
    locked = {k.lower(): v for k, v in locked.items()}
    for line in (ROOT / "mlflow/requirements.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            name = re.sub(r"\[.*\]", "", name).lower()
            assert locked.get(name) == version, f"{name}: requirements {version}, lock {locked.get(name)}"


def test_python_sources_compile():
    files = [*ROOT.glob("stack/*.py"), ROOT / "mlflow/entrypoint.py"]
    for f in files:
        compile(f.read_text(), str(f), "exec")


def test_no_secret_files_tracked_by_git():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert ".env" not in tracked
    assert not [t for t in tracked if t.startswith("mlflow/certs/") and t.endswith(".crt")]


def test_every_service_is_hardened(tmp_path):
    services = compose_config(tmp_path, "--profile", "*")["services"]
    assert set(services) == {"db", "minio", "bucket-init", "migrate", "mlflow", "nginx", "backup", "gc",
                             "prometheus", "postgres-exporter", "node-exporter", "nginx-exporter"}
    for name, svc in services.items():
        assert "no-new-privileges:true" in svc.get("security_opt", []), name
        assert svc.get("cap_drop") == ["ALL"], name
        assert svc.get("read_only") is True, name
        assert svc.get("mem_limit"), name
        # Secrets arrive as files, never as plain environment values.
        for key, value in (svc.get("environment") or {}).items():
            assert not (key.endswith(("PASSWORD", "SECRET_KEY", "SECRET_ACCESS_KEY")) and value), (name, key)


@pytest.mark.parametrize("base_path", ["", "/mlflow"])
def test_nginx_config_passes_gixy(tmp_path, base_path):
    """gixy on the rendered template inside an nginx.conf shaped like the image's.

    Skipped checks, on purpose: host_spoofing (the proxied Host must be the
    client's host:port: MLflow checks it against its allow-list, which the e2e
    suite tests, and SigV4 signs it for S3); worker_rlimit_nofile_vs_connections
    (the image's own nginx.conf, not this project's)."""
    conf_d = tmp_path / "conf.d"
    conf_d.mkdir()
    (tmp_path / "mime.types").write_text("types {}\n")
    main = (ROOT / "tests/standins/nginx/nginx.conf").read_text()
    main = main.replace("/etc/nginx/mime.types", str(tmp_path / "mime.types")).replace(
        "/etc/nginx/conf.d", str(conf_d))
    (tmp_path / "nginx.conf").write_text(main)
    template = (ROOT / "nginx/templates/mlflow.conf.template").read_text()
    for key, value in {"HTTP_PORT": "8080", "HTTPS_PORT": "8443", "S3_PORT": "9000", "MLFLOW_API_MAX_BODY_MB": "64",
                       "API_RATE_PER_LOGIN": "500", "API_RATE_PER_ADDRESS": "1000",
                       "MLFLOW_INTERNAL_URL": "http://mlflow:5000", "S3_INTERNAL_ENDPOINT": "http://minio:9000",
                       "PROMETHEUS_INTERNAL_URL": "http://prometheus:9090", "MLFLOW_BASE_PATH": base_path,
                       # With and without the monitoring profile.
                       "NGINX_METRICS_LOG": common.nginx_metrics_log("monitoring" if base_path else ""),
                       "STORE_FULL_MESSAGE": common.STORE_FULL_MESSAGE, "NGINX_DNS_SECONDS": "10"}.items():
        template = template.replace("${" + key + "}", value)
    assert not re.findall(r"\$\{[A-Z_]+\}", template), "a template variable this test does not render"
    (conf_d / "mlflow.conf").write_text(template)
    result = subprocess.run([tool("gixy"), "--skips", "host_spoofing,worker_rlimit_nofile_vs_connections",
                             str(tmp_path / "nginx.conf")], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_the_store_full_message_fits_nginx_and_s3_xml():
    """nginx returns it inside '...' and an S3 <Error>: a quote, a $, a backslash or
    an XML special character would break its config or the clients' parsing."""
    import xml.etree.ElementTree as ET

    message = common.STORE_FULL_MESSAGE
    assert not set(message) & set("'\"$\\<>&"), message
    template = (ROOT / "nginx/templates/mlflow.conf.template").read_text()
    body = re.search(r"return 507 '(.*)';", template).group(1).replace("\\n", "\n")
    error = ET.fromstring(body.replace("${STORE_FULL_MESSAGE}", message).split("\n", 1)[1])
    assert (error.findtext("Code"), error.findtext("Message")) == (common.STORE_FULL_CODE, message)
    assert "./stack_gc.sh" in message


def test_prometheus_scrapes_the_services_at_their_ports(tmp_path):
    import yaml

    services = compose_config(tmp_path, "--profile", "*")["services"]
    config = yaml.safe_load((ROOT / "monitoring/prometheus.yml").read_text())
    targets = {job["job_name"]: t for job in config["scrape_configs"]
               for t in job.get("static_configs", [{}])[0].get("targets", [])}
    # The server's replicas are found by its name, each at the metrics port.
    (mlflow_job,) = [job for job in config["scrape_configs"] if job["job_name"] == "mlflow"]
    found = mlflow_job["dns_sd_configs"][0]
    targets["mlflow"] = f"{found['names'][0]}:{found['port']}"
    for job, target in targets.items():
        host, port = target.rsplit(":", 1)
        assert host == "localhost" or host in services, (job, target)
    # MLflow's metrics port has one home: the mlflow service's environment.
    assert targets["mlflow"] == f"mlflow:{services['mlflow']['environment']['MLFLOW_METRICS_PORT']}"
    assert targets["nginx"] == f"{common.NGINX_EXPORTER}:{common.NGINX_EXPORTER_METRICS_PORT}"
    assert services["minio"]["environment"]["MINIO_PROMETHEUS_AUTH_TYPE"] == "public"
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    mounted = {v["target"] for v in services["prometheus"]["volumes"]}
    assert {"/etc/prometheus/prometheus.yml", "/etc/prometheus/alerts.yml"} <= mounted


def test_every_alert_says_what_it_means_and_what_to_do():
    import yaml

    rules = [r for g in yaml.safe_load((ROOT / "monitoring/alerts.yml").read_text())["groups"] for r in g["rules"]]
    assert {r["alert"] for r in rules} >= {"ServiceDown", "ErrorRatioHigh", "SlowRequests",
                                           "VolumeNearlyFull", "ObjectStoreNearlyFull",
                                           "PostgresConnectionsNearLimit", "BackupTooOld"}
    for rule in rules:
        assert rule["expr"] and re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["action"], rule["alert"]


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
    assert pins.inactive_services(active) == ["gc", "nginx-exporter", "node-exporter", "postgres-exporter",
                                              "prometheus"]
    active = set(settings.compose_profiles({"COMPOSE_PROFILES": "", "POSTGRES_HOST": "pg.example.com"}).split(","))
    assert "db" in pins.inactive_services(active) and "minio" not in pins.inactive_services(active)
    assert "mlflow" not in pins.inactive_services(set())


def test_every_scrape_target_names_its_compose_service(tmp_path):
    import yaml

    services = compose_config(tmp_path, "--profile", "*")["services"]
    for job in yaml.safe_load((ROOT / "monitoring/prometheus.yml").read_text())["scrape_configs"]:
        if "dns_sd_configs" in job:
            (label,) = [r["replacement"] for r in job["relabel_configs"] if r["target_label"] == "service"]
        else:
            label = job["static_configs"][0]["labels"]["service"]
        assert label in services, job["job_name"]


def test_services_of_the_mlflow_image_own_their_tmp_as_its_user(tmp_path):
    """Docker 20.10 remounts a tmpfs as root's (mode 755) on a restart: only the owner survives."""
    uid = re.search(r"^USER (\d+):(\d+)$", (ROOT / "mlflow/Dockerfile").read_text(), re.M)
    services = compose_config(tmp_path, "--profile", "*")["services"]
    for name, svc in services.items():
        if svc["image"].startswith("mlflow-stack/mlflow:"):
            for mount in svc.get("tmpfs", []):
                assert mount.endswith(f":uid={uid[1]},gid={uid[2]}"), (name, mount)
    assert services["mlflow"]["tmpfs"] == [f"/run/mlflow-stack:uid={uid[1]},gid={uid[2]}"]


def test_every_location_that_proxies_to_the_server_is_rate_limited():
    """Artifact transfers (and nginx's internal admin check) are the only exceptions."""
    template = (ROOT / "nginx/templates/mlflow.conf.template").read_text()
    mlflow_server = template.split("listen ${HTTPS_PORT} ssl;", 1)[1].split("\n}\n", 1)[0]
    blocks = re.findall(r"\n    location (.*?) \{\n(.*?)\n    \}", mlflow_server, re.S)
    proxied = {where.strip(): body for where, body in blocks if "proxy_pass $mlflow_upstream" in body}
    assert len(proxied) >= 3, list(proxied)
    for where, body in proxied.items():
        if "mlflow-artifacts" in where or "_stack/admin-check" in where:
            continue
        assert "limit_req zone=api_login" in body and "limit_req zone=api_address" in body, where


@pytest.mark.parametrize("base", ["", "/mlflow"])
def test_only_posts_that_are_safe_twice_are_resent_to_another_replica(base):
    template = (ROOT / "nginx/templates/mlflow.conf.template").read_text()
    regexes = re.findall(r"location ~ (\S+) \{\n(?:[^\n]*\n){2}\s+proxy_next_upstream error timeout non_idempotent;",
                         template)
    assert len(regexes) == 2, regexes  # the writes (short read timeout) and the searches
    regex = "|".join(f"(?:{r})" for r in regexes).replace("${MLFLOW_BASE_PATH}", base).replace("\\\\", "\\")
    for path in ("runs/log-metric", "runs/log-batch", "runs/log-parameter", "runs/set-tag", "runs/search",
                 "experiments/search", "logged-models/search"):
        for api in ("api", "ajax-api"):
            assert re.search(regex, f"{base}/{api}/2.0/mlflow/{path}"), path
    for path in ("runs/create", "experiments/create", "registered-models/create", "model-versions/create",
                 "users/create", "runs/log-metrics", "runs/log-metric/", "runs/delete-tag", "logged-models"):
        assert not re.search(regex, f"{base}/api/2.0/mlflow/{path}"), path


def test_alert_rules_are_the_shipped_ones_or_the_file_named(tmp_path):
    shipped = compose_config(tmp_path, extra={"COMPOSE_PROFILES": "monitoring"})
    mounts = {v["target"]: v["source"] for v in shipped["services"]["prometheus"]["volumes"] if v["type"] == "bind"}
    assert mounts["/etc/prometheus/alerts.yml"] == str(ROOT / "monitoring" / "alerts.yml")
    own = compose_config(tmp_path, extra={"COMPOSE_PROFILES": "monitoring", "PROMETHEUS_ALERT_RULES": "rules/mine.yml"})
    mounts = {v["target"]: v["source"] for v in own["services"]["prometheus"]["volumes"] if v["type"] == "bind"}
    assert mounts["/etc/prometheus/alerts.yml"] == str(ROOT / "rules" / "mine.yml")
    from stack import preflight
    missing = preflight.check_alert_rules({"COMPOSE_PROFILES": "monitoring", "PROMETHEUS_ALERT_RULES": "rules/mine.yml"})
    assert [c.ok for c in missing] == [False] and "not a file" in missing[0].detail
    rules = tmp_path / "mine.yml"
    rules.write_text("groups: []\n")
    assert [c.ok for c in preflight.check_alert_rules({"COMPOSE_PROFILES": "monitoring",
                                                       "PROMETHEUS_ALERT_RULES": str(rules)})] == [True]


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
