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
    text = QUICKSTART.replace("seed = 0", "sede = 0").replace("heads = 4", "hedas = 4")
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, text))
    # the schema problem is reported first; component options are checked once the schema holds
    assert len(info.value.problems) >= 1 and "sede" in str(info.value)


@pytest.mark.parametrize("label, text, expected", CASES, ids=[c[0] for c in CASES])
def test_cli_exit_code_2_and_no_traceback(tmp_path, capsys, label, text, expected):
    path = write(tmp_path, text)
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error:" in err
    assert not (tmp_path / "run").exists(), "nothing may be written for a bad recipe"


def test_recipes_validate_exits_1_on_first_bad(tmp_path, capsys):
    bad = write(tmp_path, QUICKSTART.replace("seed = 0", "sede = 0"))
    assert main(["recipes", "validate", str(ROOT / "recipes" / "quickstart.toml"), str(bad)]) == 1
    out = capsys.readouterr()
    assert "ok" in out.out and "sede" in out.err


def test_set_overrides_parse_toml_values():
    assert parse_value("3") == 3 and parse_value("0.5") == 0.5 and parse_value("true") is True
    assert parse_value("[1, 2]") == [1, 2] and parse_value("daps") == "daps"
    assert parse_value('{name="kl", bound=0.1}') == {"name": "kl", "bound": 0.1}
    raw = apply_overrides({"run": {"steps": 5}}, ["run.steps=7", "method.step_size.name=kl"], "x")
    assert raw == {"run": {"steps": 7}, "method": {"step_size": {"name": "kl"}}}


def test_malformed_override_is_an_error():
    with pytest.raises(RecipeError, match="expected dotted.key=value"):
        apply_overrides({}, ["run.steps"], "x")
