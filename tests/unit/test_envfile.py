"""The .env rules: generated secrets, never overwritten, clear errors."""

import os
import stat

import pytest

from stack import envfile, settings

SECRET_KEYS = [s.key for s in settings.SETTINGS if s.generated]


def make(tmp_path, variant=None):
    env = tmp_path / ".env"
    return env, envfile.ensure(env, variant)


def test_first_run_creates_private_env_with_generated_secrets(tmp_path):
    env, result = make(tmp_path)
    assert result.create
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    values = envfile.parse(env.read_text())
    assert set(values) == set(settings.BY_KEY)
    for key in SECRET_KEYS:
        assert values[key] != envfile.GENERATED
        assert len(values[key]) >= settings.MIN_SECRET_LENGTH
    assert values["POSTGRES_PASSWORD"] != values["MINIO_ROOT_PASSWORD"]
    assert settings.validate(values) == []


def test_secrets_differ_between_installations(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, _ = make(tmp_path / "a")
    b, _ = make(tmp_path / "b")
    assert envfile.parse(a.read_text())["POSTGRES_PASSWORD"] != envfile.parse(b.read_text())["POSTGRES_PASSWORD"]


def test_rerun_changes_nothing(tmp_path):
    env, _ = make(tmp_path)
    before = env.read_bytes()
    result = envfile.ensure(env)
    assert not result.changes
    assert env.read_bytes() == before


def test_existing_values_are_never_overwritten_and_missing_keys_are_added(tmp_path):
    env, _ = make(tmp_path)
    text = env.read_text()
    values = envfile.parse(text)
    # A user-edited value, and a key that a newer .env.example added.
    text = text.replace("HTTP_PORT=8080", "HTTP_PORT=18080")
    text = "\n".join(l for l in text.splitlines() if not l.startswith("MINIO_ROOT_PASSWORD=")) + "\n"
    env.write_text(text)
    result = envfile.ensure(env)
    assert result.added == ["MINIO_ROOT_PASSWORD"]
    after = envfile.parse(env.read_text())
    assert after["HTTP_PORT"] == "18080"
    assert after["POSTGRES_PASSWORD"] == values["POSTGRES_PASSWORD"]
    assert len(after["MINIO_ROOT_PASSWORD"]) >= settings.MIN_SECRET_LENGTH
    assert env.read_text().startswith(text.rstrip("\n"))


def test_loose_permissions_are_tightened(tmp_path):
    env, _ = make(tmp_path)
    os.chmod(env, 0o644)
    envfile.ensure(env)
    assert stat.S_IMODE(env.stat().st_mode) == 0o600


def test_variant_switch_touches_only_that_line(tmp_path):
    env, _ = make(tmp_path)
    before = env.read_text()
    result = envfile.ensure(env, "conda")
    assert result.variant_change == ("pip", "conda")
    after = env.read_text()
    assert after == before.replace("MLFLOW_VARIANT=pip", "MLFLOW_VARIANT=conda")


def test_unknown_variant_is_refused(tmp_path):
    with pytest.raises(envfile.EnvError, match="pip or conda"):
        make(tmp_path, "docker")


def test_dry_run_plan_writes_nothing(tmp_path):
    env = tmp_path / ".env"
    result = envfile.plan(env)
    assert result.create and not env.exists()


@pytest.mark.parametrize("line, message", [
    ("this is not a setting", "not a KEY=value line"),
    ("HTTP_PORT=1\nHTTP_PORT=2", "set twice"),
])
def test_malformed_env_names_the_line(line, message):
    with pytest.raises(envfile.EnvError, match=message) as info:
        envfile.parse(line, "x.env")
    assert "x.env:" in str(info.value)


def _valid():
    values = {s.key: s.default for s in settings.SETTINGS}
    for key in SECRET_KEYS:
        values[key] = "s" * 24
    return values


@pytest.mark.parametrize("key, value, fragment", [
    ("POSTGRES_PASSWORD", "<generated>", "delete the line"),
    ("MINIO_ROOT_PASSWORD", "short", "at least 16 characters"),
    ("HTTP_PORT", "eighty", "port number"),
    ("S3_PORT", "70000", "port number"),
    ("S3_PORT", "8080", "same port"),
    ("HTTPS_PORT", "9000", "same port"),
    ("TLS_CERT_FILE", "/etc/ssl/mine.pem", "set both"),
    ("MLFLOW_AUTH", "no", "true or false"),
    ("MLFLOW_DEFAULT_PERMISSION", "ALL", "use READ or"),
    ("MLFLOW_ADMIN_USERNAME", "ad min", "letters"),
    ("MLFLOW_BUCKET", "My_Bucket", "lower-case"),
    ("MLFLOW_PUBLIC_HOST", "http://mlflow.example.com", "without scheme"),
    ("BIND_ADDRESS", "everywhere", "IP address"),
    ("MLFLOW_VARIANT", "docker", "pip or conda"),
    ("MLFLOW_ARTIFACTS_MODE", "s3", "proxied or direct"),
    ("MLFLOW_WORKERS", "0", "whole number"),
    ("POSTGRES_USER", "Robert'); DROP", "lower-case"),
    ("MLFLOW_ENABLE_JOBS", "yes", "true or false"),
])
def test_bad_values_get_errors_that_say_what_to_do(key, value, fragment):
    values = _valid()
    values[key] = value
    errors = settings.validate(values)
    assert errors, f"{key}={value} was accepted"
    assert any(fragment in e for e in errors), errors


def test_missing_and_empty_keys_are_reported():
    values = _valid()
    del values["S3_PORT"]
    values["MLFLOW_BUCKET"] = ""
    errors = settings.validate(values)
    assert any("S3_PORT is missing" in e for e in errors)
    assert any("MLFLOW_BUCKET is empty" in e for e in errors)


def test_valid_example_values_pass():
    assert settings.validate(_valid()) == []


def test_shell_environment_wins_like_compose():
    values = {"HTTP_PORT": "8080", "S3_PORT": "9000"}
    assert envfile.effective(values, {"HTTP_PORT": "1234"}) == {"HTTP_PORT": "1234", "S3_PORT": "9000"}


def test_load_checked_explains_a_missing_file(tmp_path):
    with pytest.raises(envfile.EnvError, match="run ./stack_deploy.sh"):
        envfile.load_checked(tmp_path / "nope.env")


def test_a_rejected_secret_is_never_echoed():
    values = _valid()
    values["POSTGRES_PASSWORD"] = "MyRealPass123"
    errors = settings.validate(values)
    assert any("POSTGRES_PASSWORD is too short" in e for e in errors), errors
    assert not any("MyRealPass123" in e for e in errors)


def test_an_env_older_than_the_project_still_loads_with_defaults_but_never_without_secrets(tmp_path):
    """After an update of the project, before the next deploy: show, backups and the
    users tool read new settings at their defaults; a missing secret is still an error."""
    values = _valid()
    del values["GC_INTERVAL_HOURS"]
    path = tmp_path / ".env"
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    loaded = envfile.load_checked(path, environ={})
    assert loaded["GC_INTERVAL_HOURS"] == settings.BY_KEY["GC_INTERVAL_HOURS"].default
    assert envfile.load_checked(path, environ={"GC_INTERVAL_HOURS": "6"})["GC_INTERVAL_HOURS"] == "6"
    del values["MLFLOW_CRYPTO_KEK_PASSPHRASE"]
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    with pytest.raises(envfile.EnvError, match="MLFLOW_CRYPTO_KEK_PASSPHRASE is missing"):
        envfile.load_checked(path, environ={})


@pytest.mark.parametrize("changes, fragment", [
    ({"MLFLOW_REPLICAS": "3", "MLFLOW_WORKERS": "2"}, "raise it to 290"),
    ({"MLFLOW_REPLICAS": "1", "MLFLOW_WORKERS": "8", "POSTGRES_MAX_CONNECTIONS": "300"}, "raise it to 380"),
    ({"MLFLOW_REPLICAS": "2", "MLFLOW_ENABLE_JOBS": "true"}, "needs MLFLOW_REPLICAS=1"),
    ({"MLFLOW_REPLICAS": "17"}, "whole number"),
])
def test_replicas_must_fit_the_database_and_the_job_runner(changes, fragment):
    values = {**_valid(), **changes}
    errors = settings.validate(values)
    assert any(fragment in e for e in errors), errors


def test_the_archive_needs_a_bucket_of_its_own():
    errors = settings.validate({**_valid(), "PITR_BUCKET": _valid()["MLFLOW_BUCKET"]})
    assert any("a bucket of its own" in e for e in errors), errors


def test_the_defaults_and_two_replicas_fit():
    assert settings.validate(_valid()) == []
    assert settings.validate({**_valid(), "MLFLOW_REPLICAS": "2"}) == []
    assert settings.connections_needed({"MLFLOW_REPLICAS": "2", "MLFLOW_WORKERS": "2"}) == 200


@pytest.mark.parametrize("changes, fragment", [
    ({"POSTGRES_HOST": "https://pg.example.com"}, "without scheme or port"),
    ({"S3_ENDPOINT_URL": "s3.example.com"}, "http(s) URL"),
    ({"S3_ENDPOINT_URL": "https://s3.example.com/bucket"}, "without a path"),
    ({"S3_REGION": "EU Central"}, "region name"),
    ({"POSTGRES_HOST": "pg.example.com", "COMPOSE_PROFILES": "monitoring"}, "not available with external stores"),
    ({"POSTGRES_HOST": "db"}, "names the stack's own store"),
    ({"S3_ENDPOINT_URL": "http://minio:9000"}, "names the stack's own store"),
    ({"POSTGRES_HOST": "fd00::5"}, "IPv4"),
])
def test_outside_stores_are_named_plainly(changes, fragment):
    errors = settings.validate({**_valid(), **changes})
    assert any(fragment in e for e in errors), errors


def test_outside_stores_are_valid_settings():
    assert settings.validate({**_valid(), "POSTGRES_HOST": "10.0.0.5", "POSTGRES_PORT": "6432",
                              "S3_ENDPOINT_URL": "https://s3.eu-central-1.amazonaws.com",
                              "S3_REGION": "eu-central-1", "COMPOSE_PROFILES": "backup,gc"}) == []
    assert settings.own_stores({"POSTGRES_HOST": "10.0.0.5"}) == ["minio"]
    assert settings.compose_profiles({"COMPOSE_PROFILES": "gc", "S3_ENDPOINT_URL": "http://s3:9000"}) == "gc,db"


def test_an_outside_database_is_not_held_to_the_own_servers_connection_limit():
    many = {**_valid(), "MLFLOW_REPLICAS": "4", "MLFLOW_WORKERS": "4"}
    assert any("POSTGRES_MAX_CONNECTIONS" in e for e in settings.validate(many))
    # Its own max_connections is compared by the deploy's store check instead.
    assert settings.validate({**many, "POSTGRES_HOST": "pg.example.com"}) == []
