"""TLS material for nginx: the user's certificate, or a local CA made at first deploy.

With TLS_CERT_FILE and TLS_KEY_FILE set in .env, those are used as they are, once
the certificate verifies for MLFLOW_PUBLIC_HOST against TLS_CA_FILE (the CA that
issued it) or the system's CAs: a certificate clients and the server's own calls
cannot verify is refused before anything starts, with the reason.
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
from . import host as machine

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
    # The chosen name first, then every other one a colleague (or this machine) may use.
    names = [host, "localhost", *machine.machine_names()]
    entries = []
    for name in names:
        try:
            ipaddress.ip_address(name.strip("[]"))
            entries.append(f"IP:{name.strip('[]')}")
        except ValueError:
            entries.append(f"DNS:{name}")
    entries += ["IP:127.0.0.1", "IP:::1"]
    return ",".join(dict.fromkeys(entries))


def check_certificate(cert: Path, ca: Path | None, host: str) -> None:
    """TlsError, saying why, unless the certificate (its file's first; any others are the
    chain) verifies for host against ca, or the system's CAs when ca is None."""
    if shutil.which("openssl") is None:
        raise TlsError("the openssl command is needed to check TLS_CERT_FILE: install it (e.g. apt-get install openssl)")
    try:
        ipaddress.ip_address(host.strip("[]"))
        name = ["-verify_ip", host.strip("[]")]
    except ValueError:
        name = ["-verify_hostname", host]
    trust = ["-CAfile", str(ca)] if ca is not None else []
    result = subprocess.run(["openssl", "verify", *trust, "-untrusted", str(cert), *name, str(cert)],
                            capture_output=True, text=True, check=False)
    if result.returncode == 0:
        return
    lines = [line for line in result.stderr.splitlines() + result.stdout.splitlines() if line.strip()]
    reason = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("error ")),
                  lines[-1] if lines else "openssl verify failed")
    against = f"TLS_CA_FILE={ca}" if ca is not None else "the system's CAs (TLS_CA_FILE is empty)"
    if any(word in reason.lower() for word in ("hostname", "ip address", "mismatch")):
        fix = "make the certificate name it (a subjectAltName), or set MLFLOW_PUBLIC_HOST to a name it has"
    elif ca is None:
        fix = ("set TLS_CA_FILE to the CA that issued it (your company's root), with any intermediates in "
               "TLS_CERT_FILE after the certificate")
    else:
        fix = ("check that TLS_CA_FILE is the CA that issued TLS_CERT_FILE (intermediates go in TLS_CERT_FILE "
               "after the certificate)")
    raise TlsError(f"TLS_CERT_FILE={cert} does not verify for MLFLOW_PUBLIC_HOST={host} against {against}: "
                   f"{reason}. Clients and the server's own calls would refuse it: {fix}. Nothing was started")


def ensure(values: dict[str, str], create: bool = True, environ=None) -> dict[str, str]:
    """Paths nginx and clients use: cert, key and (for a local CA) the CA to trust.

    With create=False nothing is made: the paths are returned as they would be
    (for ./show_all.sh), with ca empty when no local CA exists yet.
    """
    user_cert, user_key = values.get("TLS_CERT_FILE", ""), values.get("TLS_KEY_FILE", "")
    out = cert_dir(environ)
    if user_cert or user_key:
        cert, key = Path(user_cert).expanduser().resolve(), Path(user_key).expanduser().resolve()
        ca = Path(values["TLS_CA_FILE"]).expanduser().resolve() if values.get("TLS_CA_FILE") else None
        for label, path in (("TLS_CERT_FILE", cert), ("TLS_KEY_FILE", key), ("TLS_CA_FILE", ca)):
            if create and path is not None and not path.is_file():
                raise TlsError(f"{label}={path} does not exist: set TLS_CERT_FILE and TLS_KEY_FILE to your "
                               "certificate (full chain, PEM) and key, and TLS_CA_FILE to the CA that issued it "
                               "unless it is one of the system's, or leave all three empty for a local CA")
        material = {"cert": str(cert), "key": str(key), "ca": "", "bundle": "", "trust": str(cert)}
        if ca is not None:
            material.update(ca=str(ca), bundle=str(out / "ca-bundle.pem"), trust=str(ca))
        if create:
            check_certificate(cert, ca, values["MLFLOW_PUBLIC_HOST"])
            if ca is not None:
                out.mkdir(mode=0o700, exist_ok=True)
                common.write_ca_bundle(ca, out / "ca-bundle.pem")
        return material

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
    # Made again only when it does not name MLFLOW_PUBLIC_HOST (first among its names): the
    # machine's other names and addresses are taken when it is made, so that a laptop's new
    # address does not make every re-deploy issue a certificate and restart nginx.
    if crt.exists() and key.exists() and san_file.exists() \
            and san_file.read_text().strip().split(",")[:1] == wanted.split(",")[:1]:
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
