"""The topology table (stack/common.py: TOPOLOGY, IMAGE_UID) is the one home of the internal
ports and the image's user. The files that cannot import it name the same values: the compose
file (as Compose reads it), Prometheus's configuration and the Dockerfiles."""

import re

from static_checks import ROOT, compose_config
from stack import common


def test_the_compose_file_names_the_tables_ports(tmp_path):
    services = compose_config(tmp_path, "--profile", "*")["services"]
    env = services["mlflow"]["environment"]
    assert env["MLFLOW_INTERNAL_URL"] == f"http://mlflow:{common.port('mlflow')}"
    assert env["MLFLOW_METRICS_PORT"] == str(common.port("mlflow-metrics"))
    assert services["nginx"]["environment"]["PROMETHEUS_INTERNAL_URL"] == \
        f"http://prometheus:{common.port('prometheus')}"
    assert services["pitr"]["environment"]["PITR_METRICS_PORT"] == str(common.port("pitr-metrics"))
    assert services["minio"]["command"][-2:] == ["--address", f":{common.port('minio')}"]
    assert services["postgres-exporter"]["environment"]["DATA_SOURCE_URI"].startswith(f"db:{common.port('db')}/")
    # Every healthcheck that asks a port on the container itself asks the service's own.
    asked = {}
    for name, service in services.items():
        test = " ".join(service.get("healthcheck", {}).get("test", []))
        for found in re.findall(r"127\.0\.0\.1:(\d+)", test):
            asked[name] = int(found)
    assert asked == {name: common.port(name) for name in asked}, asked
    assert set(asked) >= {"prometheus", "alertmanager", "postgres-exporter", "node-exporter"}


def test_prometheus_scrapes_the_tables_ports():
    import yaml

    config = yaml.safe_load((ROOT / "monitoring/prometheus.yml").read_text())
    seen = {}
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                seen[static["labels"]["service"] if host == "localhost" else host] = int(port)
        for found in job.get("dns_sd_configs", []):
            seen[f"{found['names'][0]}-metrics"] = found["port"]
    for manager in config["alerting"]["alertmanagers"]:
        for target in manager["static_configs"][0]["targets"]:
            host, port = target.rsplit(":", 1)
            assert int(port) == common.port(host), target
    assert seen == {name: common.port(name) for name in seen}, seen
    assert len(seen) >= 8, seen


def test_the_images_use_the_tables_ports_and_user():
    dockerfile = (ROOT / "mlflow" / "Dockerfile").read_text()
    assert f"--uid {common.IMAGE_UID} " in dockerfile
    assert f"USER {common.IMAGE_UID}:{common.IMAGE_UID}" in dockerfile
    assert f"EXPOSE {common.port('mlflow')}" in dockerfile
    for standin in ("prometheus", "alertmanager"):
        text = (ROOT / "tests" / "standins" / standin / "Dockerfile").read_text()
        assert re.findall(r"^EXPOSE (\d+)", text, re.M) == [str(common.port(standin))], standin


def test_the_compose_file_gives_the_images_user_its_tmpfs(tmp_path):
    text = (ROOT / "docker-compose.yml").read_text()
    owners = set(re.findall(r"uid=(\d+),gid=(\d+)", text))
    assert owners == {(str(common.IMAGE_UID), str(common.IMAGE_UID))}, owners


def test_alertmanager_finds_the_smtp_ca_where_its_configuration_says(tmp_path):
    from stack import alerts

    services = compose_config(tmp_path, "--profile", "*")["services"]
    mounted = {v["target"] for v in services["alertmanager"]["volumes"]}
    assert alerts.SMTP_CA in mounted, mounted
