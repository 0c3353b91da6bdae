"""Every version pinned, and the pins agreeing with each other (images, pip and conda, the
constraints lock)."""

import re

from static_checks import ROOT
from stack import pins


def test_every_image_is_pinned_to_a_version():
    found = pins.image_pins()
    assert set(found) == {"POSTGRES_IMAGE", "MINIO_IMAGE", "NGINX_IMAGE", "MLFLOW_BASE_IMAGE", "MLFLOW_CONDA_BASE_IMAGE",
                          "PROMETHEUS_IMAGE", "POSTGRES_EXPORTER_IMAGE", "NODE_EXPORTER_IMAGE", "ALERTMANAGER_IMAGE"}
    for name, image in found.items():
        tag = image.rsplit(":", 1)[-1]
        assert ":" in image and tag != "latest" and re.search(r"\d", tag), f"{name}={image} is not pinned"


def test_conda_variant_uses_the_pip_variant_pins():
    conda = (ROOT / "mlflow/conda.yml").read_text()
    assert "- -r requirements.txt" in conda and "- -c constraints.txt" in conda
    pip_python = re.search(r"python:(\d+\.\d+\.\d+)", pins.image_pins()["MLFLOW_BASE_IMAGE"]).group(1)
    assert f"- python={pip_python}" in conda
    install = (ROOT / "mlflow/install-env.sh").read_text()
    assert "conda env create" in install and "--file conda.yml" in install


def test_constraints_lock_agrees_with_requirements():
    locked = dict(l.split("==", 1) for l in (ROOT / "mlflow/constraints.txt").read_text().splitlines()
                  if "==" in l and not l.startswith("#"))
    locked = {k.lower(): v for k, v in locked.items()}
    for line in (ROOT / "mlflow/requirements.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            name = re.sub(r"\[.*\]", "", name).lower()
            assert locked.get(name) == version, f"{name}: requirements {version}, lock {locked.get(name)}"
