"""A certificate from a company's own CA (TLS_CERT_FILE signed directly by a private root,
TLS_CA_FILE that root): the shared deployment, redeployed with them for this module (nginx
and the server are recreated) and back to its local CA after it.

A client that trusts only that root logs a run with a 30 MiB artifact (multipart: presigned
parts to the S3 port, the server's own calls to the public endpoint) and reads it all back,
sha256 compared; ./stack_users.sh works; a certificate for another host or from another CA
is refused before anything changes, with the reason."""

from __future__ import annotations

import pytest
from pki import make_ca, make_server

MIB = 30


@pytest.fixture(scope="module")
def company(stack, tmp_path_factory):
    folder = tmp_path_factory.mktemp("company-ca")
    make_ca(folder, "root")
    cert, key = make_server(folder, "root", names="DNS:localhost,IP:127.0.0.1")
    chosen = {"TLS_CERT_FILE": str(cert), "TLS_KEY_FILE": str(key), "TLS_CA_FILE": str(folder / "root.crt")}
    stack.environ.update(chosen)
    try:
        stack.deploy()
        yield stack, folder
    finally:
        for name in chosen:
            del stack.environ[name]
        stack.deploy()


def test_a_client_trusting_only_the_company_root_round_trips_a_multipart_artifact(company, tmp_path):
    stack, folder = company
    root = str(folder / "root.crt")
    assert stack.client_env["MLFLOW_TRACKING_SERVER_CERT_PATH"] == root
    assert open(root).read() in open(stack.client_env["REQUESTS_CA_BUNDLE"]).read()
    only_the_root = {"MLFLOW_TRACKING_SERVER_CERT_PATH": root, "REQUESTS_CA_BUNDLE": root,
                     "E2E_EXPERIMENT": "company-ca"}
    described = tmp_path / "run.json"
    stack.client("write", str(described), "--blob-mib", str(MIB), extra=only_the_root)
    stack.client("read", str(described), extra=only_the_root)


def test_the_users_tool_trusts_the_company_root(company):
    stack, _folder = company
    listed = stack.script("stack_users.sh", "list")
    assert stack.values()["MLFLOW_ADMIN_USERNAME"] in listed.stdout


@pytest.mark.parametrize("change, reason", [
    ({"MLFLOW_PUBLIC_HOST": "mlflow.elsewhere.test"}, "MLFLOW_PUBLIC_HOST=mlflow.elsewhere.test"),
    ("another CA", "check that TLS_CA_FILE is the CA"),
])
def test_a_certificate_clients_cannot_verify_is_refused_with_the_reason(company, tmp_path, change, reason):
    stack, _folder = company
    if change == "another CA":
        make_ca(tmp_path, "other")
        change = {"TLS_CA_FILE": str(tmp_path / "other.crt")}
    before = stack.container_ids()
    refused = stack.script("stack_deploy.sh", "--yes", check=False, extra=change)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert reason in refused.stderr and "Nothing was started" in refused.stderr, refused.stderr
    assert stack.container_ids() == before
    assert stack.http("GET", "/api/2.0/mlflow/experiments/search?max_results=1").status_code == 200
