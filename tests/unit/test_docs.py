"""The documentation: a short README that links into docs/, and the docs site built strictly
(mkdocs.yml), so that a broken link, a missing anchor or a page left out of the nav fails."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from stack.paths import ROOT

README_MAX_LINES = 250


def build(root: Path, out: Path) -> subprocess.CompletedProcess:
    mkdocs = Path(sys.executable).with_name("mkdocs")
    assert mkdocs.exists(), "mkdocs is not installed: tests/run.sh installs it from tests/requirements.txt"
    return subprocess.run([str(mkdocs), "build", "--strict", "-f", str(root / "mkdocs.yml"), "-d", str(out)],
                          capture_output=True, text=True, check=False, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})


def test_the_site_builds_strictly(tmp_path):
    built = build(ROOT, tmp_path / "site")
    assert built.returncode == 0, built.stderr[-4000:]
    assert (tmp_path / "site" / "configuration" / "index.html").exists()


def test_a_broken_link_fails_the_build(tmp_path):
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    with open(tmp_path / "docs" / "index.md", "a") as fh:
        fh.write("\n[gone](no-such-page.md)\n")
    broken = build(tmp_path, tmp_path / "site")
    assert broken.returncode != 0 and "no-such-page.md" in broken.stderr, broken.stderr[-2000:]


def test_the_readme_is_a_short_front_door_whose_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= README_MAX_LINES, len(text.splitlines())
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), target
    for needed in ("MLFLOW_PUBLIC_HOST", "TLS_CA_FILE", "HTTPS_PORT", "S3_PORT", "tests/run.sh", "./stack_deploy.sh"):
        assert needed in text, needed


def test_every_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in (ROOT / "docs").glob("*.md"):
        assert f" {page.name}" in nav, page.name
