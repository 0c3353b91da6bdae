"""Test PKI with the openssl command: a company's root CA, an intermediate, a server
certificate (tests/unit/test_tls.py, tests/e2e/test_company_ca.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

HOST = "mlflow.acme.test"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(folder: Path, name: str, signer: str | None = None) -> None:
    """name.crt/.key: a CA, self-signed or (signer) an intermediate signed by signer."""
    ext = folder / f"{name}.ext"
    ext.write_text("basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n")
    if signer is None:
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.crt",
                "-days", "30", "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)
        return
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}", cwd=folder)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{signer}.crt", "-CAkey", f"{signer}.key",
            "-CAcreateserial", "-out", f"{name}.crt", "-days", "30", "-extfile", ext.name, cwd=folder)


def make_server(folder: Path, signer: str, names: str = f"DNS:{HOST}") -> tuple[Path, Path]:
    (folder / "server.ext").write_text(f"subjectAltName={names}\nbasicConstraints=CA:FALSE\n"
                                       "extendedKeyUsage=serverAuth\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", f"/CN={HOST}", cwd=folder)
    openssl("x509", "-req", "-in", "server.csr", "-CA", f"{signer}.crt", "-CAkey", f"{signer}.key",
            "-CAcreateserial", "-out", "server.crt", "-days", "30", "-extfile", "server.ext", cwd=folder)
    return folder / "server.crt", folder / "server.key"
