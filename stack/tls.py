"""TLS material for nginx: the user's certificate, or a local CA made at first deploy.

With TLS_CERT_FILE and TLS_KEY_FILE set in .env, those are used as they are.
Otherwise certs/ gets a local CA (ca.crt, ca.key) and a server certificate for
MLFLOW_PUBLIC_HOST signed by it (server.crt, server.key), made once with the
openssl command and kept: re-deploys change nothing. Changing
MLFLOW_PUBLIC_HOST makes a new server certificate from the same CA, so
clients that trust the CA keep working. Keys are mode 600; certs/ is not in git.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from . import common, paths

CA_DAYS, SERVER_DAYS = 3650, 825


class TlsError(Exception):
    pass


def cert_dir(environ=None) -> Path:
    environ = os.environ if environ is None else environ
    return Path(environ.get("STACK_CERT_DIR", paths.ROOT / "certs")).resolve()


def _openssl(*args: str, cwd: Path) -> None:
    if shutil.which("openssl") is None:
        raise TlsError("the openssl command is needed to make a local certificate: install it "
                       "(e.g. apt-get install openssl), or set TLS_CERT_FILE and TLS_KEY_FILE in .env")
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise TlsError(f"openssl {args[0]} failed: {result.stderr.strip()[-500:]}")


def _san(host: str) -> str:
    names = [host, "localhost"] if host != "localhost" else ["localhost"]
    entries = []
    for name in names:
        try:
            ipaddress.ip_address(name.strip("[]"))
            entries.append(f"IP:{name.strip('[]')}")
        except ValueError:
            entries.append(f"DNS:{name}")
    entries += ["IP:127.0.0.1", "IP:::1"]
    return ",".join(dict.fromkeys(entries))


def ensure(values: dict[str, str], create: bool = True, environ=None) -> dict[str, str]:
    """Paths nginx and clients use: cert, key and (for a local CA) the CA to trust.

    With create=False nothing is made: the paths are returned as they would be
    (for ./show_all.sh), with ca empty when no local CA exists yet.
    """
    user_cert, user_key = values.get("TLS_CERT_FILE", ""), values.get("TLS_KEY_FILE", "")
    if user_cert or user_key:
        cert, key = Path(user_cert).expanduser(), Path(user_key).expanduser()
        for label, path in (("TLS_CERT_FILE", cert), ("TLS_KEY_FILE", key)):
            if create and not path.is_file():
                raise TlsError(f"{label}={path} does not exist: set both TLS_CERT_FILE and TLS_KEY_FILE to "
                               "your certificate (full chain, PEM) and key, or leave both empty for a local CA")
        return {"cert": str(cert.resolve()), "key": str(key.resolve()), "ca": "", "bundle": "",
                "trust": str(cert.resolve())}

    out = cert_dir(environ)
    ca_crt, ca_key = out / "ca.crt", out / "ca.key"
    if not create:
        have = ca_crt.exists()
        return {"cert": str(out / "server.crt"), "key": str(out / "server.key"),
                "ca": str(ca_crt) if have else "", "bundle": str(out / "ca-bundle.pem") if have else "",
                "trust": str(ca_crt)}
    out.mkdir(mode=0o700, exist_ok=True)
    crt, key = out / "server.crt", out / "server.key"
    host = values["MLFLOW_PUBLIC_HOST"]
    if not ca_crt.exists() or not ca_key.exists():
        _openssl("req", "-x509", "-newkey", "rsa:3072", "-nodes", "-sha256", "-days", str(CA_DAYS),
                 "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=MLflow stack local CA",
                 "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                 cwd=out)
        os.chmod(ca_key, 0o600)
        crt.unlink(missing_ok=True)
    wanted = _san(host)
    san_file = out / "server.san"
    result = {"cert": str(crt), "key": str(key), "ca": str(ca_crt), "bundle": str(out / "ca-bundle.pem"),
              "trust": str(ca_crt)}
    common.write_ca_bundle(ca_crt, out / "ca-bundle.pem")
    if crt.exists() and key.exists() and san_file.exists() and san_file.read_text().strip() == wanted:
        return result
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        work = Path(tmp)
        ext = work / "ext.cnf"
        ext.write_text(f"subjectAltName={wanted}\nbasicConstraints=CA:FALSE\n"
                       "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-sha256", "-keyout", "server.key",
                 "-out", "server.csr", "-subj", f"/CN={host}", cwd=work)
        _openssl("x509", "-req", "-in", "server.csr", "-CA", str(ca_crt), "-CAkey", str(ca_key),
                 "-CAcreateserial", "-out", "server.crt", "-days", str(SERVER_DAYS), "-sha256",
                 "-extfile", str(ext), cwd=work)
        os.chmod(work / "server.key", 0o600)
        os.replace(work / "server.key", key)
        os.replace(work / "server.crt", crt)
        san_file.write_text(wanted + "\n")
    return result
