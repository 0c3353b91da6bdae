"""Prometheus's configuration and alert rules: the targets at the services' ports, alerts that say
what to do, the rules file chosen."""

import re

from static_checks import ROOT, compose_config
from stack import common


def test_prometheus_scrapes_the_services_at_their_ports(tmp_path):
    import yaml

    services = compose_config(tmp_path, "--profile", "*")["services"]
    config = yaml.safe_load((ROOT / "monitoring/prometheus.yml").read_text())
    targets = {job["job_name"]: t for job in config["scrape_configs"]
               for t in job.get("static_configs", [{}])[0].get("targets", [])}
    # The server's replicas are found by its name, each at the metrics port.
    for name in ("mlflow", "pitr"):
        (job,) = [job for job in config["scrape_configs"] if job["job_name"] == name]
        found = job["dns_sd_configs"][0]
        targets[name] = f"{found['names'][0]}:{found['port']}"
    for job, target in targets.items():
        host, port = target.rsplit(":", 1)
        assert host == "localhost" or host in services, (job, target)
    # MLflow's metrics port has one home: the mlflow service's environment.
    assert targets["mlflow"] == f"mlflow:{services['mlflow']['environment']['MLFLOW_METRICS_PORT']}"
    assert targets["pitr"] == f"pitr:{services['pitr']['environment']['PITR_METRICS_PORT']}"
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


def test_every_scrape_target_names_its_compose_service(tmp_path):
    import yaml

    services = compose_config(tmp_path, "--profile", "*")["services"]
    for job in yaml.safe_load((ROOT / "monitoring/prometheus.yml").read_text())["scrape_configs"]:
        if "dns_sd_configs" in job:
            (label,) = [r["replacement"] for r in job["relabel_configs"] if r["target_label"] == "service"]
        else:
            label = job["static_configs"][0]["labels"]["service"]
        assert label in services, job["job_name"]


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
