"""TLS material (stack/tls.py) and what clients are told of it (stack/client_env.py), without
a server: a company CA's certificate is checked and trusted, a wrong one refused with the reason."""

from __future__ import annotations

from pathlib import Path

import pytest
from pki import HOST, make_ca, make_server

from stack import client_env, tls


def values(cert: Path, key: Path, ca: Path | None, host: str = HOST) -> dict[str, str]:
    return {"TLS_CERT_FILE": str(cert), "TLS_KEY_FILE": str(key), "TLS_CA_FILE": str(ca or ""),
            "MLFLOW_PUBLIC_HOST": host, "HTTPS_PORT": "8443", "S3_PORT": "9000", "MLFLOW_BASE_PATH": "",
            "MLFLOW_AUTH": "true", "MLFLOW_ADMIN_USERNAME": "admin", "MLFLOW_ADMIN_PASSWORD": "secret",
            "MLFLOW_ARTIFACTS_MODE": "proxied", "S3_ENDPOINT_URL": ""}


@pytest.fixture
def company(tmp_path):
    make_ca(tmp_path, "root")
    cert, key = make_server(tmp_path, "root")
    return tmp_path, cert, key


def test_a_certificate_from_the_companys_ca_is_trusted_and_named_to_clients(company, tmp_path):
    folder, cert, key = company
    env = {"STACK_CERT_DIR": str(tmp_path / "certs")}
    material = tls.ensure(values(cert, key, folder / "root.crt"), environ=env)
    assert material["trust"] == material["ca"] == str(folder / "root.crt")
    bundle = Path(material["bundle"]).read_text()
    assert (folder / "root.crt").read_text() in bundle
    printed = dict(client_env.client_env(values(cert, key, folder / "root.crt"), material))
    assert printed["MLFLOW_TRACKING_SERVER_CERT_PATH"] == str(folder / "root.crt")
    assert printed["REQUESTS_CA_BUNDLE"] == material["bundle"]
    assert printed["MLFLOW_TRACKING_URI"] == f"https://{HOST}:8443"
    # Again: nothing changes.
    before = Path(material["bundle"]).stat().st_mtime_ns
    assert tls.ensure(values(cert, key, folder / "root.crt"), environ=env) == material
    assert Path(material["bundle"]).stat().st_mtime_ns == before


def test_an_intermediate_in_the_chain_file_verifies(tmp_path):
    make_ca(tmp_path, "root")
    make_ca(tmp_path, "issuing", signer="root")
    cert, key = make_server(tmp_path, "issuing")
    chain = tmp_path / "chain.pem"
    chain.write_text(cert.read_text() + (tmp_path / "issuing.crt").read_text())
    tls.check_certificate(chain, tmp_path / "root.crt", HOST)
    with pytest.raises(tls.TlsError, match="intermediates go in TLS_CERT_FILE"):
        tls.check_certificate(cert, tmp_path / "root.crt", HOST)


def test_without_the_ca_the_deploy_says_to_name_it(company, tmp_path):
    _folder, cert, key = company
    with pytest.raises(tls.TlsError) as info:
        tls.ensure(values(cert, key, None), environ={"STACK_CERT_DIR": str(tmp_path / "certs")})
    assert "set TLS_CA_FILE" in str(info.value) and "Nothing was started" in str(info.value)


def test_a_certificate_for_another_host_is_refused(company, tmp_path):
    folder, cert, key = company
    with pytest.raises(tls.TlsError) as info:
        tls.ensure(values(cert, key, folder / "root.crt", host="mlflow.other.test"),
                   environ={"STACK_CERT_DIR": str(tmp_path / "certs")})
    assert "MLFLOW_PUBLIC_HOST=mlflow.other.test" in str(info.value) and "subjectAltName" in str(info.value)


def test_another_ca_is_refused(company, tmp_path):
    _folder, cert, key = company
    other = tmp_path / "other"
    other.mkdir()
    make_ca(other, "root")
    with pytest.raises(tls.TlsError, match="check that TLS_CA_FILE is the CA"):
        tls.ensure(values(cert, key, other / "root.crt"), environ={"STACK_CERT_DIR": str(tmp_path / "certs")})


def test_an_address_is_checked_as_an_address(tmp_path):
    make_ca(tmp_path, "root")
    cert, _key = make_server(tmp_path, "root", names="IP:10.1.2.3")
    tls.check_certificate(cert, tmp_path / "root.crt", "10.1.2.3")
    with pytest.raises(tls.TlsError):
        tls.check_certificate(cert, tmp_path / "root.crt", "10.1.2.4")


def test_the_local_ca_names_the_host_and_is_made_once(tmp_path):
    env = {"STACK_CERT_DIR": str(tmp_path / "certs")}
    local = {"MLFLOW_PUBLIC_HOST": HOST}
    made = tls.ensure(local, environ=env)
    tls.check_certificate(Path(made["cert"]), Path(made["ca"]), HOST)
    tls.check_certificate(Path(made["cert"]), Path(made["ca"]), "127.0.0.1")
    first = Path(made["cert"]).read_bytes()
    assert tls.ensure(local, environ=env) == made and Path(made["cert"]).read_bytes() == first
