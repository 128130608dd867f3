"""Property-based: random and mutated recipes, recipe files and ``--set`` values never give a
traceback from ``ngkit recipes validate`` (parse, bind and build on the meta device), run in
process through ``ngkit.cli.main.main``.

Each property tries ``NGKIT_FUZZ_EXAMPLES`` inputs (default 100, under a minute each on two busy
cores); docs/reliability.md gives the figures of a longer run. Integers stay below 1001 where a
mutation puts them, because a layer count of 2**31 is a valid recipe that takes forever to build.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import math
import os
from collections import Counter
from typing import Any

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ngkit.binding import factory_params, tables_of
from ngkit.cli.main import main
from ngkit.components import CONTEXT_ARGS
from ngkit.plugins import get_registry
from tiny_recipe import tiny

EXAMPLES = int(os.environ.get("NGKIT_FUZZ_EXAMPLES", "100"))
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=False, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)

# Recipes on the digits data (cheap to load), one per method family.
BASES: list[dict[str, Any]] = [
    tiny(),
    tiny(method={"name": "daps", "samples": 4, "step_size": {"name": "kl", "bound": 1.0}}),
    tiny(method={"name": "fsq", "quantizer": {"name": "fsq", "levels": [4, 4]}}),
    tiny(method={"name": "vqvae", "quantizer": {"name": "vq", "dim": 8, "kmeans_init": True}}),
    tiny(method={"name": "gumbel", "hard": True}),
    tiny(method={"name": "ppo", "samples": 2}),
    tiny(model={"codes": 16, "patch_size": 2, "encoder": {"name": "transformer", "width": 32, "depth": 1, "heads": 2},
                "decoder": {"name": "mlp", "hidden": 32}}, method={"name": "reinforce", "samples": 3}),
    tiny(compare={"variants": {"fsq": {"method": {"name": "fsq", "quantizer": {"name": "fsq", "levels": [4, 4]}}}}}),
]
NAMES = ["digits", "photos", "hf", "transformer", "conv", "mlp", "daps", "daps-na", "fsq", "vqvae", "vq", "gumbel",
         "gr-mck", "reinforce", "ppo", "kl", "ess", "fixed", "constant", "linear", "exponential", "cosine", "mse",
         "psnr", "ssim", "usage", "beta-elbo", "fid", "cuda", "cpu", "auto", "bf16", "fp16", "nccl"]

scalars = st.one_of(
    st.integers(-10, 1000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-300, 1e300, math.inf, -math.inf, math.nan]),
    st.booleans(),
    st.sampled_from(NAMES),
    st.text(max_size=12),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


TALLY: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def report_tally():
    """Print what the fuzzers tried (``pytest -s`` shows it; docs/reliability.md quotes it)."""
    yield
    print(f"\nfuzz: {TALLY['tried']} inputs tried: {TALLY['ok']} ok, {TALLY['invalid']} invalid, of which "
          f"{TALLY['built']} failed at build; tracebacks: {TALLY['traceback']}")


def run_cli(argv: list[str]) -> tuple[int, str]:
    """``main(argv)`` with stdout and stderr captured; any exception escaping it fails the test."""
    out, err = io.StringIO(), io.StringIO()
    TALLY["tried"] += 1
    TALLY["traceback"] += 1  # taken back below unless main raised
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    text = err.getvalue()
    TALLY["traceback"] -= "Traceback" not in text
    TALLY["ok" if code == 0 else "invalid"] += 1
    TALLY["built"] += "could not be built" in text or "dummy batch" in text or "has shape" in text
    return code, text


def assert_clean(code: int, err: str) -> None:
    assert code in (0, 2), f"exit {code}:\n{err}"
    assert "Traceback" not in err, err


def paths(node: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every key path of a nested dict (tables and their keys)."""
    out = []
    if isinstance(node, dict):
        for key, value in node.items():
            out.append((*prefix, key))
            out += paths(value, (*prefix, key))
    return out


def like(value: Any) -> st.SearchStrategy[Any]:
    """Values of the same type as ``value``, edge cases likely."""
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int):
        return st.sampled_from([-1, 0, 1, 2, 3]) | st.integers(-10, 1000)
    if isinstance(value, float):
        return st.sampled_from([0.0, -1.0, 1e-12, 1e12, math.inf, math.nan]) | st.floats(-10, 1000)
    if isinstance(value, str):
        return st.sampled_from(NAMES)
    if isinstance(value, list):
        return st.lists(st.sampled_from([-1, 0, 1, 2, 3, 4, 5, 8]), max_size=5) if all(
            isinstance(v, int) for v in value) else st.lists(st.sampled_from(NAMES), max_size=5)
    return values


@st.composite
def mutated(draw: st.DrawFn) -> dict[str, Any]:
    """A base recipe after 1-3 mutations: a value changed (mostly to one of the same type), a key
    deleted, or a key added."""
    import copy

    raw = copy.deepcopy(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(1, 3))):
        keys = paths(raw)
        path = draw(st.sampled_from(keys))
        parent = raw
        for part in path[:-1]:
            parent = parent[part]
        if not isinstance(parent, dict):
            continue
        action = draw(st.sampled_from(["nudge", "nudge", "nudge", "set", "delete", "add"]))
        if action == "nudge":  # a value of the same type: it passes the schema and reaches the build
            parent[path[-1]] = draw(like(parent[path[-1]]))
        elif action == "set":
            parent[path[-1]] = draw(values)
        elif action == "delete":
            parent.pop(path[-1], None)
        else:
            target = parent[path[-1]] if isinstance(parent.get(path[-1]), dict) else parent
            target[draw(st.sampled_from(NAMES) | st.text(min_size=1, max_size=8))] = draw(values)
    return raw


def validate_cleanly(tmp_path_factory, raw: dict[str, Any]) -> None:
    """``ngkit recipes validate`` on ``raw`` written as TOML ends without a traceback."""
    text = dumps(raw)
    if text is None:
        return
    path = tmp_path_factory.mktemp("fuzz") / "r.toml"
    path.write_text(text)
    assert_clean(*run_cli(["recipes", "validate", str(path)]))


def dumps(raw: dict[str, Any]) -> str | None:
    """TOML text, or None for data TOML cannot hold (e.g. a key path that is a value elsewhere)."""
    try:
        return tomli_w.dumps(raw)
    except (TypeError, ValueError):
        return None


@FUZZ
@given(raw=mutated())
def test_mutated_recipes_never_give_a_traceback(tmp_path_factory, raw):
    validate_cleanly(tmp_path_factory, raw)


@st.composite
def option_edits(draw: st.DrawFn) -> dict[str, Any]:
    """A base recipe with 1-3 options of its components (from their factories' signatures), or
    [model] codes and patch_size, set to edge values of their type: these pass the schema and the
    type check and reach the constructors."""
    import copy

    raw = copy.deepcopy(draw(st.sampled_from(BASES)))
    registry = get_registry()
    for _ in range(draw(st.integers(1, 3))):
        tables = [(kind, where) for kind, _, where in tables_of(raw) if kind != "metrics"]
        kind, where = draw(st.sampled_from(tables + [("model", "model")]))
        node = raw
        for part in where.split("."):
            node = node[part]
        if kind == "model":
            node[draw(st.sampled_from(["codes", "patch_size"]))] = draw(st.sampled_from([1, 2, 3, 4, 8, 16, 17, 4096]))
            continue
        params, _ = factory_params(registry.entries[kind][node["name"]].factory)
        options = [p for p in params.values() if p.name not in CONTEXT_ARGS and p.ref is None]
        if options:
            param = draw(st.sampled_from(options))
            known = param.default is not inspect.Parameter.empty and param.default is not None
            node[param.name] = draw(like(param.default) if known else values)
    return raw


@FUZZ
@given(raw=option_edits())
def test_component_options_never_give_a_traceback(tmp_path_factory, raw):
    validate_cleanly(tmp_path_factory, raw)


@FUZZ
@given(raw=st.dictionaries(st.sampled_from(NAMES[:8] + ["data", "model", "method", "run", "eval", "optim"]) | st.text(max_size=6),
                           values, max_size=6))
def test_random_recipes_never_give_a_traceback(tmp_path_factory, raw):
    validate_cleanly(tmp_path_factory, raw)


@FUZZ
@given(
    base=st.sampled_from(BASES),
    edits=st.lists(st.tuples(st.floats(0, 1), st.sampled_from(["insert", "delete", "replace"]), st.binary(min_size=1, max_size=4)),
                   min_size=1, max_size=6),
)
def test_byte_mutated_files_never_give_a_traceback(tmp_path_factory, base, edits):
    data = bytearray(tomli_w.dumps(base).encode())
    for where, action, blob in edits:
        i = int(where * len(data))
        if action == "insert":
            data[i:i] = blob
        elif action == "delete":
            del data[i : i + len(blob)]
        else:
            data[i : i + len(blob)] = blob
    path = tmp_path_factory.mktemp("fuzz") / "r.toml"
    path.write_bytes(bytes(data))
    assert_clean(*run_cli(["recipes", "validate", str(path)]))


KEYS = sorted({".".join(p) for base in BASES for p in paths(base)})


def toml_literal(value: Any) -> str:
    """A value as an inline TOML literal (what a user types after ``--set key=``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(map(toml_literal, value)) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_literal(v)}" for k, v in value.items()) + "}"


@FUZZ
@given(
    key=st.sampled_from(KEYS) | st.text(max_size=12),
    value=values.map(toml_literal) | st.text(max_size=12),
    separator=st.sampled_from(["=", "=", "=", "", "==", " = "]),
)
def test_set_values_never_give_a_traceback(tmp_path_factory, key, value, separator):
    path = tmp_path_factory.mktemp("fuzz") / "r.toml"
    path.write_text(tomli_w.dumps(BASES[0]))
    assert_clean(*run_cli(["recipes", "validate", str(path), "--set", f"{key}{separator}{value}"]))
