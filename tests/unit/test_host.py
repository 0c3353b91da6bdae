"""What a first deploy makes of this machine's name (stack/host.py): MLFLOW_PUBLIC_HOST
when the user chose none, the local certificate's names, the warning for loopback."""

from __future__ import annotations

import os
import subprocess

from stack import envfile, host, tls


def test_a_new_env_gets_the_name_colleagues_reach(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_PUBLIC_HOST", raising=False)
    monkeypatch.setattr(host, "reachable_name", lambda: "mlflow.acme.test")
    made = envfile.ensure(tmp_path / ".env")
    assert made.detected == {"MLFLOW_PUBLIC_HOST": "mlflow.acme.test"}
    assert envfile.parse((tmp_path / ".env").read_text())["MLFLOW_PUBLIC_HOST"] == "mlflow.acme.test"
    # Once written, it is the user's: a re-run changes nothing.
    monkeypatch.setattr(host, "reachable_name", lambda: "10.9.9.9")
    again = envfile.ensure(tmp_path / ".env")
    assert not again.changes and not again.detected


def test_a_chosen_name_or_a_machine_without_one_keeps_the_table(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_PUBLIC_HOST", "mlflow.chosen.test")
    monkeypatch.setattr(host, "reachable_name", lambda: "mlflow.acme.test")
    assert not envfile.ensure(tmp_path / "a.env").detected
    monkeypatch.delenv("MLFLOW_PUBLIC_HOST")
    monkeypatch.setattr(host, "reachable_name", lambda: None)
    assert not envfile.ensure(tmp_path / "b.env").detected
    assert envfile.parse((tmp_path / "b.env").read_text())["MLFLOW_PUBLIC_HOST"] == "localhost"


def test_a_name_that_is_loopback_here_gives_way_to_the_default_routes_address(monkeypatch):
    """As on machines like this project's, where /etc/hosts maps `hostname -f` to 127.0.0.1."""
    monkeypatch.setattr(host, "fully_qualified_name", lambda: "vm")
    monkeypatch.setattr(host, "resolves_to_loopback", lambda name: name == "vm")
    monkeypatch.setattr(host, "default_route_address", lambda: "10.1.2.3")
    assert host.reachable_name() == "10.1.2.3"
    monkeypatch.setattr(host, "fully_qualified_name", lambda: "localhost")
    assert host.reachable_name() == "10.1.2.3"


def test_a_fully_qualified_name_that_resolves_elsewhere_is_taken(monkeypatch):
    monkeypatch.setattr(host, "fully_qualified_name", lambda: "vm.acme.test")
    monkeypatch.setattr(host, "resolves_to_loopback", lambda name: False)
    monkeypatch.setattr(host.socket, "getaddrinfo", lambda name, port: [(0, 0, 0, "", ("10.1.2.3", 0))])
    assert host.reachable_name() == "vm.acme.test"


def test_the_certificate_is_not_made_again_when_only_the_machines_address_changed(tmp_path, monkeypatch):
    env = {"STACK_CERT_DIR": str(tmp_path)}
    monkeypatch.setattr(host, "machine_names", lambda: ["vm", "10.1.2.3"])
    tls.ensure({"MLFLOW_PUBLIC_HOST": "vm.acme.test"}, environ=env)
    first = (tmp_path / "server.crt").read_bytes()
    monkeypatch.setattr(host, "machine_names", lambda: ["vm", "10.9.9.9"])
    tls.ensure({"MLFLOW_PUBLIC_HOST": "vm.acme.test"}, environ=env)
    assert (tmp_path / "server.crt").read_bytes() == first
    tls.ensure({"MLFLOW_PUBLIC_HOST": "mlflow.acme.test"}, environ=env)
    assert (tmp_path / "server.crt").read_bytes() != first
    tls.check_certificate(tmp_path / "server.crt", tmp_path / "ca.crt", "mlflow.acme.test")
    tls.check_certificate(tmp_path / "server.crt", tmp_path / "ca.crt", "10.9.9.9")


def test_the_local_certificate_names_the_machine_too(tmp_path, monkeypatch):
    monkeypatch.setattr(host, "machine_names", lambda: ["vm", "vm.acme.test", "10.1.2.3"])
    made = tls.ensure({"MLFLOW_PUBLIC_HOST": "vm.acme.test"}, environ={"STACK_CERT_DIR": str(tmp_path)})
    for name in ("vm.acme.test", "vm", "10.1.2.3", "localhost", "127.0.0.1"):
        tls.check_certificate(tmp_path / "server.crt", tmp_path / "ca.crt", name)
    assert made["cert"] == str(tmp_path / "server.crt")


def test_loopback_client_settings_come_with_a_warning(tmp_path):
    from stack.paths import ROOT

    env = tmp_path / ".env"
    environ = {**os.environ, "STACK_ENV_FILE": str(env), "MLFLOW_PUBLIC_HOST": "localhost",
               "STACK_CERT_DIR": str(tmp_path / "certs"), "PYTHONPATH": str(ROOT)}
    envfile.ensure(env)
    shown = subprocess.run(["python3", "-m", "stack", "client-env"], env=environ, capture_output=True, text=True,
                           check=False, cwd=ROOT)
    assert shown.returncode == 0, shown.stderr
    assert "export MLFLOW_TRACKING_URI=https://localhost:" in shown.stdout
    assert "WARNING: MLFLOW_PUBLIC_HOST=localhost is this machine's loopback" in shown.stderr
