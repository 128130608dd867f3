"""Malformed recipes: each problem named with file, dotted key, expected and found; CLI exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from ngkit.cli.main import main
from ngkit.errors import RecipeError
from ngkit.recipe import apply_overrides, load_recipe, parse_value

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = (ROOT / "recipes" / "quickstart.toml").read_text()


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    return path


CASES = [
    ("bad toml", QUICKSTART + "\n[run\n", ["not valid TOML"]),
    ("unknown key", QUICKSTART.replace("seed = 0", "sede = 0"), ["[run.sede] unknown key", 'did you mean "seed"']),
    ("wrong type", QUICKSTART.replace("steps = 600", 'steps = "many"'), ["[run.steps]", "valid integer", "'many'"]),
    ("unknown plugin", QUICKSTART.replace('name = "transformer"', 'name = "vit-ar2"'),
     ['[model.encoder] unknown encoder name "vit-ar2"', "transformer (transformer_encoder)"]),
    ("unknown option", QUICKSTART.replace("heads = 4", "hedas = 4"),
     ['[model.encoder.hedas] unknown option for encoders "transformer"', 'did you mean "heads"']),
    ("bad option type", QUICKSTART.replace("samples = 8", "samples = 2.5"), ["[method.samples]", "2.5"]),
    ("unknown sub-component", QUICKSTART.replace('name = "kl"', 'name = "kll"'),
     ['[method.step_size] unknown step-size policy name "kll"', 'Did you mean "kl"']),
    ("missing section", QUICKSTART.replace("[run]", "[runs]"), ["[run] is required but missing", "[runs] unknown key"]),
]


@pytest.mark.parametrize("label, text, expected", CASES, ids=[c[0] for c in CASES])
def test_error_message(tmp_path, label, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    msg = str(info.value)
    assert str(path) in msg
    for fragment in expected:
        assert fragment in msg, f"{fragment!r} not in:\n{msg}"


def test_all_problems_reported_at_once(tmp_path):
    """Schema problems and component-option problems together, each exactly once."""
    text = (
        QUICKSTART.replace("seed = 0", "sede = 0")
        .replace("heads = 4", "hedas = 4")
        .replace("steps = 600", "steps = -1")
        .replace('name = "kl"', 'name = "kll"')
    )
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, text))
    keys = sorted(p.split("]")[0] + "]" for p in info.value.problems)
    assert keys == ["[method.step_size]", "[model.encoder.hedas]", "[run.sede]", "[run.steps]"], info.value.problems


def test_a_table_the_schema_refuses_is_not_checked_twice(tmp_path):
    text = QUICKSTART.replace('name = "transformer"\n', "")  # [model.encoder] without a name
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, text))
    assert info.value.problems == ["[model.encoder.name] is required but missing"]


UNREADABLE = [
    ("not UTF-8", lambda p: p.write_bytes(b"\xff\xfe[run]\n"), "not UTF-8 text"),
    ("a directory", lambda p: p.mkdir(), "is a directory"),
    ("nested too deeply", lambda p: p.write_text("a = " + "[" * 2000 + "]" * 2000), "nested more than"),
    ("deep tables", lambda p: p.write_text("[" + ".".join(["t"] * 40) + "]\nx = 1\n"), "nested more than"),
    ("dotted key 1,200 deep", lambda p: p.write_text("a" + ".b" * 1200 + " = 1\n"), "nested more than"),
    ("table header 700 deep", lambda p: p.write_text("[" + ".".join(["t"] * 700) + "]\nx = 1\n"), "nested more than"),
]


@pytest.mark.parametrize("label, make, expected", UNREADABLE, ids=[c[0] for c in UNREADABLE])
def test_unreadable_recipe_file_is_one_message(tmp_path, capsys, label, make, expected):
    path = tmp_path / "r.toml"
    make(path)
    assert main(["recipes", "validate", str(path)]) == 2
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count(expected) == 2 and "Traceback" not in err


BAD_SETS = [
    ("no value", "run.steps", "expected dotted.key=value"),
    ("empty key part", "run..steps=3", "expected dotted.key=value"),
    ("not a table", "run.steps.x=3", "[steps] is not a table"),
    ("nested too deeply", "run.steps=" + "[" * 500 + "]" * 500, "nested more than"),
    ("inf where a number is needed", "optim.lr=inf", "[optim.lr]"),
    ("wrong type", 'run.steps="many"', "[run.steps]"),
    ("a section replaced by a number", "model=3", "[model]"),
]


@pytest.mark.parametrize("label, value, expected", BAD_SETS, ids=[c[0] for c in BAD_SETS])
def test_bad_set_value_is_one_message(tmp_path, capsys, label, value, expected):
    path = write(tmp_path, QUICKSTART)
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--set", value]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


@pytest.mark.parametrize("label, text, expected", CASES, ids=[c[0] for c in CASES])
def test_cli_exit_code_2_and_no_traceback(tmp_path, capsys, label, text, expected):
    path = write(tmp_path, text)
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error:" in err
    assert not (tmp_path / "run").exists(), "nothing may be written for a bad recipe"


def test_recipes_validate_checks_and_reports_every_file(tmp_path, capsys):
    bad = write(tmp_path, QUICKSTART.replace("seed = 0", "sede = 0"))
    worse = tmp_path / "worse.toml"
    worse.write_text(QUICKSTART.replace("steps = 600", "stepz = 600"))
    good = ROOT / "recipes" / "quickstart.toml"
    assert main(["recipes", "validate", str(bad), str(good), str(worse)]) == 2
    out = capsys.readouterr()
    assert f"ok {good}" in " ".join(out.out.split())
    assert "sede" in out.err and "stepz" in out.err and "2 of 3 recipes are invalid" in out.err


def test_set_overrides_parse_toml_values():
    assert parse_value("3") == 3 and parse_value("0.5") == 0.5 and parse_value("true") is True
    assert parse_value("[1, 2]") == [1, 2] and parse_value("daps") == "daps"
    assert parse_value('{name="kl", bound=0.1}') == {"name": "kl", "bound": 0.1}
    raw = apply_overrides({"run": {"steps": 5}}, ["run.steps=7", "method.step_size.name=kl"], "x")
    assert raw == {"run": {"steps": 7}, "method": {"step_size": {"name": "kl"}}}


def test_malformed_override_is_an_error():
    with pytest.raises(RecipeError, match="expected dotted.key=value"):
        apply_overrides({}, ["run.steps"], "x")
