"""stack/recovery_kit.py: the copy of .env and the local CA to keep off the machine, and the
deploy's warning while no current one exists."""

from __future__ import annotations

import stat

import pytest

from stack import recovery_kit


@pytest.fixture
def project(tmp_path):
    env = tmp_path / ".env"
    env.write_text("MLFLOW_FLASK_SECRET_KEY=" + "k" * 32 + "\nMINIO_ROOT_PASSWORD=s3cret\n")
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "ca.key").write_text("KEY")
    (certs / "ca.crt").write_text("CRT")
    (certs / "server.key").write_text("not in the kit: made again from the CA")
    environ = {"STACK_ENV_FILE": str(env), "STACK_CERT_DIR": str(certs), "COMPOSE_PROJECT_NAME": "kit"}
    values = {"MLFLOW_FLASK_SECRET_KEY": "k" * 32, "TLS_CERT_FILE": ""}
    return tmp_path, environ, values


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_kit_holds_env_and_the_local_ca_private_to_its_owner(project):
    root, environ, values = project
    kit = root / "offsite" / "kit"
    written = recovery_kit.write(values, kit, environ)
    assert sorted(p.relative_to(kit).as_posix() for p in written) == ["README.txt", "certs/ca.crt", "certs/ca.key",
                                                                       "env"]
    assert (kit / "env").read_text() == (root / ".env").read_text()
    assert (kit / "certs" / "ca.key").read_text() == "KEY"
    assert mode(kit) == 0o700 and all(mode(p) == 0o600 for p in written)
    readme = (kit / "README.txt").read_text()
    assert "OFF the machine" in readme and "Copy env into the project as .env" in readme
    assert "not in this kit" not in readme
    assert "s3cret" not in readme


def test_no_warning_while_the_kit_is_current_and_one_when_a_file_changes(project):
    root, environ, values = project
    assert recovery_kit.reminder(values, environ).startswith("WARNING: no copy of .env")
    assert "none made" in recovery_kit.status(values, environ)[1]
    recovery_kit.write(values, root / "kit", environ)
    assert recovery_kit.status(values, environ)[0] and recovery_kit.reminder(values, environ) == ""
    (root / ".env").write_text((root / ".env").read_text() + "S3_REGION=eu-central-1\n")
    current, said = recovery_kit.status(values, environ)
    assert not current and "out of date" in said
    assert "out of date" in recovery_kit.reminder(values, environ)


def test_a_kit_never_overwrites_anything(project):
    root, environ, values = project
    taken = root / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep me")
    with pytest.raises(recovery_kit.KitError, match="not an empty folder"):
        recovery_kit.write(values, taken, environ)
    assert (taken / "mine.txt").read_text() == "keep me" and not (taken / "env").exists()


def test_with_a_certificate_of_your_own_the_kit_is_env_alone(project):
    root, environ, values = project
    written = recovery_kit.write({**values, "TLS_CERT_FILE": "/etc/ssl/mine.pem"}, root / "kit", environ)
    assert sorted(p.name for p in written) == ["README.txt", "env"]


def test_the_record_is_keyed_so_it_is_no_test_of_guesses(project):
    root, environ, values = project
    files = recovery_kit.sources(values, environ)
    assert recovery_kit.digest(files, "a" * 32) != recovery_kit.digest(files, "b" * 32)


def test_files_of_your_own_that_env_names_are_listed(project):
    root, environ, values = project
    recovery_kit.write({**values, "ALERT_SMTP_CA_FILE": "/etc/ssl/acme-root.pem"}, root / "kit", environ)
    readme = (root / "kit" / "README.txt").read_text()
    assert "not in this kit" in readme and "ALERT_SMTP_CA_FILE=/etc/ssl/acme-root.pem" in readme
    assert '"A lost machine"' in readme and "NEW PITR_BUCKET" in readme
