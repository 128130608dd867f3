"""Documentation that is generated from code must match it."""

from __future__ import annotations

from pathlib import Path

from ngkit.recipe import reference_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_recipe_reference_is_current():
    expected = reference_markdown()
    actual = (ROOT / "docs" / "recipes.md").read_text()
    assert actual == expected, "regenerate with: NGKIT_PLUGINS= ngkit recipes reference > docs/recipes.md"


def test_readme_commands_are_the_ci_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = 'bash scripts/bootstrap.sh && .venv/bin/python -m pytest -m "not slow"'
    assert test_cmd in readme and test_cmd in ci
    assert "bash scripts/bootstrap.sh && .venv/bin/ngkit run\n" in readme
