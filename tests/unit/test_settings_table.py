"""The settings table (stack/settings.py) against what it generates and what reads it:
.env.example, the configuration reference, the compose file, both images."""

import json
import re

from static_checks import ROOT, compose_config
from stack import settings


def test_generated_files_match_the_settings_table():
    """.env.example and the configuration reference's table come from stack/settings.py;
    regenerate them with `python3 -m stack.settings write` after changing the table."""
    assert (ROOT / ".env.example").read_text() == settings.example_text()
    assert settings.settings_table() in (ROOT / settings.TABLE_PAGE).read_text()
    assert settings.topology_table() in (ROOT / settings.TABLE_PAGE).read_text()


def test_every_default_and_rule_round_trips():
    for s in settings.SETTINGS:
        if not s.generated and s.default != "":
            s.rule(s.key, s.default)
        for other in s.rule.others:
            s.rule(s.key, other)
    assert settings.validate({s.key: s.default if not s.generated else "x" * 32 for s in settings.SETTINGS}) == []


def _services_reading(config: dict, needle: str) -> set[str]:
    return {name for name, svc in config["services"].items() if needle in json.dumps(svc)}


def test_compose_reads_each_setting_where_the_table_says(tmp_path):
    """Each key's `services` in stack/settings.py is exactly where Compose uses it:
    change the value, and only those services' configuration changes."""
    every = ("--profile", "*")
    base = compose_config(tmp_path, *every)
    wrong = []
    for s in settings.SETTINGS:
        if s.file:
            readers = {n for n, svc in base["services"].items()
                       if any(sec.get("source") == s.file for sec in svc.get("secrets", []))}
        else:
            # COMPOSE_PROFILES selects services: compare without forcing every profile on.
            profiles = () if s.key == "COMPOSE_PROFILES" else every
            base = compose_config(tmp_path, *profiles)
            changed = compose_config(tmp_path, *profiles, extra={s.key: s.rule.other_than(s.default)})
            readers = {n for n in base["services"].keys() | changed["services"].keys()
                       if base["services"].get(n) != changed["services"].get(n)}
        if readers != set(s.services):
            wrong.append(f"{s.key}: table says {sorted(s.services)}, compose reads it in {sorted(readers)}")
    assert not wrong, "\n".join(wrong)


def test_compose_file_has_no_second_default_for_a_setting():
    text = (ROOT / "docker-compose.yml").read_text()
    for key in re.findall(r"\$\{([A-Z][A-Z0-9_]*):?-", text):
        assert key not in settings.BY_KEY, f"{key} has a default in docker-compose.yml; its one home is stack/settings.py"


def test_shared_module_has_one_copy_that_both_images_take():
    for dockerfile in ("mlflow/Dockerfile", "db/Dockerfile"):
        assert "stack/common.py" in (ROOT / dockerfile).read_text(), dockerfile
    copies = [p for p in ROOT.rglob("*.py") if ".venv" not in p.parts and "def secret(name" in p.read_text()
              and p.parent.name != "unit"]
    assert copies == [ROOT / "stack" / "common.py"], copies
