"""Where the point-in-time archive is: the artifact store with its keys, or a store off the
machine with keys of its own (PITR_S3_*), and the rules across those settings."""

from __future__ import annotations

import pytest

from stack import compose, settings

OFF = {"PITR_S3_ENDPOINT_URL": "https://s3.eu-central-1.amazonaws.com", "PITR_S3_ACCESS_KEY": "AKIAEXAMPLE",
       "PITR_S3_SECRET_KEY": "x" * 40, "PITR_S3_REGION": "eu-central-1"}


def values(**extra: str) -> dict[str, str]:
    base = {s.key: settings.new_secret() if s.generated else s.default for s in settings.SETTINGS}
    base.update(extra)
    return base


def derived(vals: dict[str, str]) -> dict[str, str]:
    return dict(compose.stores(vals))


def test_by_default_the_archive_is_beside_the_artifacts_with_their_keys():
    got = derived(values())
    assert (got["STACK_PITR_ENDPOINT"], got["STACK_PITR_REGION"]) == ("http://minio:9000", "us-east-1")
    assert (got["STACK_PITR_ACCESS_KEY_NAME"], got["STACK_PITR_SECRET_KEY_NAME"]) == ("minio_root_user",
                                                                                      "minio_root_password")
    assert got["STACK_BACKEND_INTERNAL"] == "true"


def test_off_the_machine_it_has_its_own_store_keys_and_a_route_out():
    got = derived(values(**OFF))
    assert got["STACK_PITR_ENDPOINT"] == OFF["PITR_S3_ENDPOINT_URL"] and got["STACK_PITR_REGION"] == "eu-central-1"
    assert (got["STACK_PITR_ACCESS_KEY_NAME"], got["STACK_PITR_SECRET_KEY_NAME"]) == ("pitr_s3_access_key",
                                                                                      "pitr_s3_secret_key")
    assert got["STACK_BACKEND_INTERNAL"] == "false"
    assert settings.validate(values(**OFF)) == []
    # Off the machine it may share the artifact bucket's name: another store.
    assert settings.validate(values(**OFF, PITR_BUCKET="mlflow")) == []


def test_the_artifacts_on_a_store_outside_keep_the_archive_there():
    got = derived(values(S3_ENDPOINT_URL="https://s3.example.org", S3_REGION="eu-west-1"))
    assert (got["STACK_PITR_ENDPOINT"], got["STACK_PITR_REGION"]) == ("https://s3.example.org", "eu-west-1")


@pytest.mark.parametrize("extra, says", [
    ({"PITR_S3_ENDPOINT_URL": "https://s3.example.org"}, "without PITR_S3_ACCESS_KEY and PITR_S3_SECRET_KEY"),
    ({"PITR_S3_ACCESS_KEY": "a", "PITR_S3_SECRET_KEY": "b"}, "without PITR_S3_ENDPOINT_URL"),
])
def test_half_a_store_is_refused(extra, says):
    assert any(says in p for p in settings.validate(values(**extra))), settings.validate(values(**extra))


def test_the_secret_key_is_never_exported_or_echoed(tmp_path):
    assert settings.BY_KEY["PITR_S3_SECRET_KEY"].sensitive
    plain = dict(compose.environment(values(**OFF), create=False, environ={"STACK_ENV_FILE": "/nonexistent/.env"}))
    assert "PITR_S3_SECRET_KEY" not in plain and OFF["PITR_S3_SECRET_KEY"] not in plain.values()
    # Nor in the environment docker compose runs with (it reads the key from its file).
    env = tmp_path / ".env"
    env.write_text("".join(f"{k}={v}\n" for k, v in values(**OFF).items()))
    _argv, environ = compose.invocation({"STACK_ENV_FILE": str(env), "PATH": "/usr/bin"})
    assert "PITR_S3_SECRET_KEY" not in environ and OFF["PITR_S3_SECRET_KEY"] not in environ.values()
    assert environ["STACK_PITR_OFF_SITE"] == "true"


def test_the_artifacts_store_named_again_is_refused():
    problems = settings.validate(values(**{**OFF, "S3_ENDPOINT_URL": OFF["PITR_S3_ENDPOINT_URL"]}))
    assert any("PITR_S3_ENDPOINT_URL is S3_ENDPOINT_URL" in p for p in problems), problems
