"""The settings a remote client needs, as `export` lines.

Printed at the end of a deploy and by `./show_all.sh --client-env`: the only
places that show a credential, because the user asked for them there.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from .common import host_port, stack_version
from .compose import export_lines

# Downloads. From the stack's own store, the client asks the server (MLflow's
# proxied route) and nginx streams the file from the store once the server has
# checked the request (mlflow/stack_guard.py, NGINX_FETCH), near boto3's speed
# (docs/performance.md has the figures and their spread). MLflow's default instead
# fetches it from the S3 port in presigned parts of 100 MiB; those parts are
# read in 10 KiB pieces, which is what holds them back (0.5-0.8x). From a store
# outside the stack, the presigned parts stay, in boto3's part size: with 100
# MiB parts a 100 MiB file comes as one stream, at about half the speed, and
# every part a download thread holds is in memory.
DOWNLOAD_PART_BYTES = 8 << 20
# Uploads. A file of at least this size goes to the S3 port in presigned parts
# of this size, several at once (MLflow's defaults: from 500 MiB, in 10 MiB
# parts); a smaller one goes through the server, one stream. 100 MiB through
# the server moved slower than boto3, in these parts faster (docs/performance.md).
# Every part a thread sends is in memory (2 threads per CPU).
UPLOAD_PART_BYTES = 25 << 20


def client_env(values: dict[str, str], tls: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """tls: paths from stack.tls (ca, bundle) when the certificate comes from the local CA."""
    host = values["MLFLOW_PUBLIC_HOST"]
    uri = f"https://{host_port(host, values['HTTPS_PORT'])}{values['MLFLOW_BASE_PATH']}"
    settings = [("MLFLOW_TRACKING_URI", uri)]
    if values["MLFLOW_AUTH"] == "true":
        settings += [("MLFLOW_TRACKING_USERNAME", values["MLFLOW_ADMIN_USERNAME"]),
                     ("MLFLOW_TRACKING_PASSWORD", values["MLFLOW_ADMIN_PASSWORD"])]
    if tls and tls.get("ca"):
        # The API client takes the CA; presigned transfers go through requests,
        # which needs a bundle (the system CAs plus this one).
        settings += [("MLFLOW_TRACKING_SERVER_CERT_PATH", tls["ca"]),
                     ("REQUESTS_CA_BUNDLE", tls["bundle"])]
    if values["MLFLOW_ARTIFACTS_MODE"] == "proxied":
        if values.get("S3_ENDPOINT_URL"):
            settings.append(("MLFLOW_MULTIPART_DOWNLOAD_CHUNK_SIZE", str(DOWNLOAD_PART_BYTES)))
        else:
            settings.append(("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "false"))
        settings += [("MLFLOW_MULTIPART_UPLOAD_MINIMUM_FILE_SIZE", str(UPLOAD_PART_BYTES)),
                     ("MLFLOW_MULTIPART_UPLOAD_CHUNK_SIZE", str(UPLOAD_PART_BYTES))]
    if values["MLFLOW_ARTIFACTS_MODE"] == "direct":
        # Direct mode: the client writes artifacts to S3 itself.
        settings += [
            ("MLFLOW_S3_ENDPOINT_URL", values.get("S3_ENDPOINT_URL", "").rstrip("/") or f"https://{host_port(host, values['S3_PORT'])}"),
            ("AWS_DEFAULT_REGION", values["S3_REGION"]),
            ("AWS_ACCESS_KEY_ID", values["MINIO_ROOT_USER"]),
            ("AWS_SECRET_ACCESS_KEY", values["MINIO_ROOT_PASSWORD"]),
            ("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required"),
            ("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required"),
        ]
        if tls and tls.get("ca"):
            settings.append(("AWS_CA_BUNDLE", tls["bundle"]))
    return settings


def render(values: dict[str, str], tls: dict[str, str] | None = None, password: bool = True) -> str:
    """password=False: the admin's password is left out (a re-deploy's output; logs keep it)."""
    lines = []
    if tls and tls.get("ca"):
        lines.append(f"# Clients on other machines need copies of {tls['ca']} and {tls['bundle']}.")
    settings = client_env(values, tls)
    if values["MLFLOW_AUTH"] == "true":
        lines.append("# The admin account; give each person their own: ./stack_users.sh add NAME")
        if not password:
            lines.append("# MLFLOW_TRACKING_PASSWORD is not shown again: ./show_all.sh --client-env prints it")
            settings = [(k, v) for k, v in settings if k != "MLFLOW_TRACKING_PASSWORD"]
    return "".join(line + "\n" for line in lines) + export_lines(settings)


# What a bundle leaves out: the admin's login (the colleague has their own) and, in
# direct mode, the store's keys (they open every experiment's artifacts).
NOT_BUNDLED = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
# Settings that name a CA file: in a bundle, the copy beside the settings.
CA_FILES = {"MLFLOW_TRACKING_SERVER_CERT_PATH": "ca.crt", "REQUESTS_CA_BUNDLE": "ca-bundle.pem",
            "AWS_CA_BUNDLE": "ca-bundle.pem"}


def write_bundle(values: dict[str, str], tls: dict[str, str] | None, folder: Path, user: str) -> list[Path]:
    """A folder to hand to a colleague: mlflow.env (source it) with the settings for their own
    login, and the CA files beside it; no admin password, no path of this machine."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, source in (("ca.crt", (tls or {}).get("ca")), ("ca-bundle.pem", (tls or {}).get("bundle"))):
        if source:
            shutil.copyfile(source, folder / name)
            written.append(folder / name)
    settings = client_env(values, tls)
    lines = [f"# MLflow client settings for {dict(settings)['MLFLOW_TRACKING_URI']} (stack release "
             f"{stack_version()}). Use them with `. path/to/mlflow.env` in bash or zsh, or `. ./mlflow.env`",
             "# from this folder in another shell.",
             'here="$(cd "$(dirname "${BASH_SOURCE:-$0}")" && pwd)"']
    if values["MLFLOW_AUTH"] == "true":
        lines += ["# Your own login (the admin makes it: ./stack_users.sh add NAME); set your password yourself:",
                  f"export MLFLOW_TRACKING_USERNAME={shlex.quote(user)}",
                  "# export MLFLOW_TRACKING_PASSWORD=..."]
    if values["MLFLOW_ARTIFACTS_MODE"] == "direct":
        lines.append("# Direct artifact mode: the S3 keys are not in this file; ask the stack's admin for yours.")
    for key, value in settings:
        if key in NOT_BUNDLED:
            continue
        if key in CA_FILES:
            lines.append(f'export {key}="$here/{CA_FILES[key]}"')
        else:
            lines.append(f"export {key}={shlex.quote(value)}")
    (folder / "mlflow.env").write_text("\n".join(lines) + "\n")
    return [folder / "mlflow.env", *written]
