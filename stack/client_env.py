"""The settings a remote client needs, as `export` lines.

Printed at the end of a deploy and by `./show_all.sh --client-env`: the only
places that show a credential, because the user asked for them there.
"""

from __future__ import annotations

import shlex


def _authority(host: str, port: str, scheme: str = "http") -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    default = {"http": "80", "https": "443"}[scheme]
    return host if port == default else f"{host}:{port}"


def client_env(values: dict[str, str]) -> list[tuple[str, str]]:
    host = values["MLFLOW_PUBLIC_HOST"]
    settings = [("MLFLOW_TRACKING_URI", f"http://{_authority(host, values['HTTP_PORT'])}")]
    if values["MLFLOW_ARTIFACTS_MODE"] == "direct":
        # Direct mode: the client writes artifacts to S3 itself.
        settings += [
            ("MLFLOW_S3_ENDPOINT_URL", f"http://{_authority(host, values['S3_PORT'])}"),
            ("AWS_ACCESS_KEY_ID", values["MINIO_ROOT_USER"]),
            ("AWS_SECRET_ACCESS_KEY", values["MINIO_ROOT_PASSWORD"]),
            ("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required"),
            ("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required"),
        ]
    return settings


def render(values: dict[str, str]) -> str:
    lines = [f"export {key}={shlex.quote(value)}" for key, value in client_env(values)]
    return "\n".join(lines) + "\n"
