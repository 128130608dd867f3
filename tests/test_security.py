"""Nothing ngkit reads runs code; crafted or damaged inputs are one clear error (exit 2).

A payload is a pickle whose ``__reduce__`` opens (creates) a marker file when unpickled. It is
planted in each kind of checkpoint file, with ``complete.json`` updated as an attacker would (size
and SHA-256), and every command that reads the file must refuse it without the marker appearing.
One tiny run is trained per module (and one ZeRO-3 run); each test works on a copy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import tomli_w
import torch

import ngkit
from ngkit.cli.main import main
from ngkit.engine import checkpoint, safe_load
from ngkit.engine.train_loop import train
from ngkit.errors import NgkitError, RecipeError, WeightsError
from ngkit.export import CONFIG, WEIGHTS, export
from ngkit.recipe import parse_recipe
from ngkit.weights import sha256_of
from tiny_recipe import tiny

pytestmark = pytest.mark.usefixtures("one_thread")

SHORT = {"run": {"steps": 4, "eval_every": 0, "checkpoint_every": 0}, "eval": {"metrics": ["mse"], "num_images": 16}}
TAG = "step-00000004"
REFUSAL = "will not execute code from checkpoints"


class Payload:
    """Unpickling this creates ``marker``: the proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (self.marker, "w"))


def plant(ckpt: Path, name: str, marker: Path) -> None:
    """Replace (or add) ``ckpt/name`` with a payload and update complete.json to match."""
    torch.save({"module": Payload(marker), "step": 4}, ckpt / name)
    meta = json.loads((ckpt / checkpoint.MARKER).read_text())
    meta["files"][name] = {"bytes": (ckpt / name).stat().st_size, "sha256": sha256_of(ckpt / name)}
    (ckpt / checkpoint.MARKER).write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("security") / "run"
    train(parse_recipe(tiny(**SHORT), "tiny"), out, quiet=True)
    export(out, out / "export")
    return out


@pytest.fixture(scope="module")
def trained_zero3(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("security3") / "run"
    train(parse_recipe(tiny(distributed={"zero_stage": 3}, optim={"clip": "norm"}, **SHORT), "tiny"), out, quiet=True)
    return out


@pytest.fixture
def run(trained: Path, tmp_path: Path) -> Path:
    shutil.copytree(trained, tmp_path / "run", symlinks=True)
    return tmp_path / "run"


def prior_recipe(tmp_path: Path, tokenizer: Path, **prior) -> Path:
    raw = {
        "prior": {"name": "autoregressive", "tokenizer": str(tokenizer), "width": 32, "depth": 1, "heads": 2, **prior},
        "data": {"name": "digits", "batch_size": 16},
        "run": {"steps": 2, "seed": 0, "log_every": 1},
        "eval": {"metrics": ["usage"], "num_images": 10, "batch_size": 10},
    }
    path = tmp_path / "prior.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


def refused(code: int, capsys, marker: Path, *names: str) -> None:
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert not marker.exists(), "the payload ran"
    assert REFUSAL in " ".join(err.split()), err[-2000:]
    assert "Traceback" not in err
    for name in names:
        assert name in err


COMMANDS = ["eval", "run --resume", "export", "encode", "prior train"]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt", "rank-0.pt"])
def test_a_payload_in_a_checkpoint_file_never_runs(run, tmp_path, capsys, command, name):
    marker = tmp_path / "pwned"
    plant(run / "checkpoints" / TAG, name, marker)
    args = {
        "eval": ["eval", str(run), "--metric", "mse", "--num-images", "8"],
        "run --resume": ["run", "--resume", str(run), "--quiet"],
        "export": ["export", str(run), "--out", str(tmp_path / "export")],
        "encode": ["encode", str(run), "--split", "test", "--num-images", "8", "--out", str(tmp_path / "codes"), "--quiet"],
        "prior train": ["prior", "train", str(prior_recipe(tmp_path, run)), "--out", str(tmp_path / "prior"), "--quiet"],
    }[command]
    code = main(args)
    if name == "rank-0.pt" and command != "run --resume":
        assert code == 0 and not marker.exists()  # only a resume reads the ranks' own state
        return
    refused(code, capsys, marker, name)


def test_a_payload_in_a_prior_checkpoint_never_runs_on_sample(run, tmp_path, capsys):
    """``ngkit sample`` reads the prior's weights with read_model_state: a prior run whose
    checkpoint holds a payload (its tokenizer a clean export) is refused."""
    prior_run = tmp_path / "prior-run"
    shutil.copytree(run, prior_run)
    shutil.copy(prior_recipe(tmp_path, run / "export", classes=10), prior_run / "recipe.toml")
    marker = tmp_path / "pwned"
    plant(prior_run / "checkpoints" / TAG, "mp_rank_00_model_states.pt", marker)
    refused(main(["sample", str(prior_run), "--num", "1", "--out", str(tmp_path / "s")]), capsys, marker)


def test_ngkit_load_refuses_a_payload(run, tmp_path):
    marker = tmp_path / "pwned"
    plant(run / "checkpoints" / TAG, "mp_rank_00_model_states.pt", marker)
    with pytest.raises(WeightsError, match=REFUSAL):
        ngkit.load(run)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_zero3_consolidation_reads_safely(trained_zero3, tmp_path, name):
    run = tmp_path / "run"
    shutil.copytree(trained_zero3, run)
    assert ngkit.load(run).encode(torch.rand(2, 1, 8, 8)).shape == (2, 16)  # clean: consolidates
    marker = tmp_path / "pwned"
    plant(run / "checkpoints" / TAG, name, marker)
    with pytest.raises(WeightsError, match=REFUSAL):
        ngkit.load(run)
    assert not marker.exists()


def test_zero3_files_that_complete_json_does_not_list_are_refused(trained_zero3, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_zero3, run)
    marker, ckpt = tmp_path / "pwned", run / "checkpoints" / TAG
    torch.save({"module": Payload(marker)}, ckpt / "zero_pp_rank_1_mp_rank_00_model_states.pt")
    with pytest.raises(NgkitError, match="zero_pp_rank_1_mp_rank_00_model_states.pt, which its complete.json does not list"):
        ngkit.load(run)
    assert main(["export", str(run), "--out", str(tmp_path / "x")]) == 2
    assert not marker.exists()


def test_a_changed_byte_fails_the_sha256_check(run):
    states = run / "checkpoints" / TAG / "mp_rank_00_model_states.pt"
    data = bytearray(states.read_bytes())
    data[len(data) // 2] ^= 0xFF
    states.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="mp_rank_00_model_states.pt does not match the SHA-256"):
        ngkit.load(run)


def test_rank_state_loads_weights_only_and_restores_every_generator(tmp_path):
    import random

    import numpy as np

    from ngkit.engine.seeding import rng_state, set_rng_state

    torch.manual_seed(3), np.random.seed(4), random.seed(5)
    np.random.standard_normal()  # a cached gaussian in numpy's state
    state = {"data": {"epoch": 1, "start": 7}, "rng": rng_state(), "unreadable": [2]}
    torch.save(checkpoint.encode_rank_state(state), tmp_path / "rank-0.pt")
    want = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    loaded = checkpoint.decode_rank_state(safe_load.safe_torch_load(tmp_path / "rank-0.pt"))
    set_rng_state(loaded["rng"])
    got = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and want[2] == got[2]
    assert loaded["data"] == {"epoch": 1, "start": 7} and loaded["unreadable"] == [2]


# ---- exports: crafted configs and damaged weights
def edit_config(folder: Path, change) -> None:  # type: ignore[no-untyped-def]
    config = json.loads((folder / CONFIG).read_text())
    change(config)
    (folder / CONFIG).write_text(json.dumps(config))


def _set(path: str, value):  # type: ignore[no-untyped-def]
    """Set a key of the config; ``/`` separates levels (component keys hold dots)."""

    def change(config: dict) -> None:
        *parents, last = path.split("/")
        node = config
        for key in parents:
            node = node[key]
        node[last] = value

    return change


CONFIG_CASES = {
    "dtype __class__": (_set("dtype", "__class__"), "'dtype' is '__class__'"),
    "unknown table": (_set("extras", {"a": 1}), "unknown top-level key 'extras'"),
    "depth 1000000": (_set("components/model.encoder/depth", 1_000_000), "depth = 1000000 is more than 4096 layers"),
    "image a string": (_set("image", "big"), "'image' must be dict"),
    "missing latent": (lambda c: c.pop("latent"), "missing key 'latent'"),
    "grid of strings": (_set("latent/grid", ["a"]), "latent.grid must be a list of positive integers"),
    "sources malformed": (_set("sources/model.encoder", 3), "sources.model.encoder must hold the strings"),
    "component width": (_set("components/model.decoder/width", 24), "size mismatch for decoder"),
    "list config": (lambda c: None, None),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_a_crafted_export_config_is_one_clear_error(trained, tmp_path, case):
    folder = tmp_path / "export"
    shutil.copytree(trained / "export", folder)
    change, message = CONFIG_CASES[case]
    if message is None:
        (folder / CONFIG).write_text("[1, 2]")
        message = "not an ngkit tokenizer config"
    else:
        edit_config(folder, change)
    with pytest.raises(WeightsError, match=message.replace("(", r"\(")):
        ngkit.load(folder)


@pytest.mark.parametrize("damage", ["not JSON", "truncated weights", "empty weights", "huge header", "pickle as weights"])
def test_damaged_export_files_are_one_clear_error(trained, tmp_path, capsys, damage):
    folder = tmp_path / "export"
    shutil.copytree(trained / "export", folder)
    weights = folder / WEIGHTS
    if damage == "not JSON":
        (folder / CONFIG).write_text('{"format": ')
    else:
        if damage == "truncated weights":
            weights.write_bytes(weights.read_bytes()[:1000])
        elif damage == "empty weights":
            weights.write_bytes(b"")
        elif damage == "huge header":
            weights.write_bytes((2**62).to_bytes(8, "little") + b"{}")
        else:
            torch.save({"w": Payload(tmp_path / "pwned")}, weights)
        edit_config(folder, lambda c: c.pop("files"))  # as an older export, without hashes
    code = main(["encode", str(folder), "--split", "test", "--num-images", "4", "--out", str(tmp_path / "c"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and str(folder) in " ".join(err.split()), err[-2000:]
    assert not (tmp_path / "pwned").exists()


def test_a_torn_export_is_refused(trained, tmp_path):
    """New weights under an old config (an export killed between its two files) fail the SHA-256
    check that config.json records."""
    folder = tmp_path / "export"
    shutil.copytree(trained / "export", folder)
    export(trained, tmp_path / "bf16", dtype="bfloat16")
    shutil.copy(tmp_path / "bf16" / WEIGHTS, folder / WEIGHTS)
    with pytest.raises(WeightsError, match="torn"):
        ngkit.load(folder)


def test_an_export_killed_before_it_finished_leaves_the_old_one(trained, tmp_path, monkeypatch):
    folder = tmp_path / "export"
    export(trained, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    import ngkit.export_files as export_files

    def killed(*args):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr(export_files, "_exchange", killed)
    with pytest.raises(KeyboardInterrupt):
        export(trained, folder, dtype="bfloat16")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary folder left
    assert ngkit.load(folder).dtype == torch.float32


def test_export_refuses_to_replace_a_folder_that_is_not_an_export(trained, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(NgkitError, match="not an ngkit export folder"):
        export(trained, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# ---- paths
@pytest.mark.parametrize("label", ["../../../tmp/x", "/tmp/x", "a/b", "..", "a\\b"])
def test_variant_names_cannot_leave_out(label, tmp_path):
    raw = tiny(compare={"variants": {label: {"method": {"name": "daps-na", "samples": 4}}}})
    with pytest.raises(RecipeError, match="is not a plain name"):
        parse_recipe(raw, "tiny")
    assert main(["compare", str(write(tmp_path, tiny())), "--methods", label, "--out", str(tmp_path / "c")]) == 2
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("section", [
    {"run": {"out_dir": "/tmp/elsewhere"}},
    {"run": {"out_dir": "runs/../../elsewhere"}},
    {"distributed": {"deepspeed": {"csv_monitor": {"enabled": True, "output_path": "/tmp/monitor"}}}},
    {"distributed": {"deepspeed": {"tensorboard": {"enabled": True, "output_path": "../tb"}}}},
    {"distributed": {"deepspeed": {"wandb": {"enabled": False, "output_path": "~/wandb"}}}},
])
def test_paths_a_recipe_writes_stay_below_here(section, tmp_path, capsys):
    assert main(["recipes", "validate", str(write(tmp_path, tiny(**section)))]) == 2  # validate: invalid
    assert "a recipe writes only below the directory it runs in" in " ".join(capsys.readouterr().err.split())
    with pytest.raises(RecipeError):
        parse_recipe(tiny(**section), "tiny")


def write(tmp_path: Path, raw: dict, name: str = "r.toml") -> Path:
    path = tmp_path / name
    path.write_text(f"# {name}\n" + tomli_w.dumps(raw))
    return path


@pytest.mark.parametrize("artifact", ["curves.png", "reconstructions.png", "metrics.jsonl", "checkpoints/.tmp-step-00000006"])
def test_symlinks_in_a_run_directory_are_not_written_through(run, tmp_path, capsys, artifact):
    victim = tmp_path / "victim"
    victim.mkdir() if artifact.startswith("checkpoints") else victim.write_text("precious")
    (run / artifact).unlink(missing_ok=True)
    (run / artifact).symlink_to(victim)
    code = main(["run", "--resume", str(run), "--set", "run.steps=6", "--set", "run.checkpoint_every=6", "--quiet"])
    assert code == 2 and "symlink" in capsys.readouterr().err
    assert (list(victim.iterdir()) == []) if victim.is_dir() else victim.read_text() == "precious"


# ---- sizes
@pytest.mark.parametrize("override", ["model.encoder.depth=2147483648", "model.encoder.width=1000000000", "data.batch_size=1000000000"])
def test_absurd_sizes_are_refused_at_validation_with_the_estimate(tmp_path, capsys, override):
    assert main(["recipes", "validate", str(write(tmp_path, tiny())), "--set", override]) == 2  # validate: invalid
    err = " ".join(capsys.readouterr().err.split())
    assert ("GiB" in err or "layers" in err or "wider" in err), err


def test_a_recipe_with_a_byte_order_mark_is_read(tmp_path):
    path = write(tmp_path, tiny())
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert main(["recipes", "validate", str(path)]) == 0


def test_an_older_pickled_run_is_refused_then_converted_on_trust(run, capsys):
    """A run of an older ngkit: rank-0.pt pickled with numpy's generator state, complete.json with
    sizes only. It is refused with the way out; ``checkpoint convert`` needs --trust; then it resumes."""
    import numpy as np

    ckpt = run / "checkpoints" / TAG
    own = checkpoint.decode_rank_state(safe_load.safe_torch_load(ckpt / "rank-0.pt"))
    torch.save(own, ckpt / "rank-0.pt")  # numpy arrays: a weights-only load refuses them
    assert isinstance(own["rng"]["numpy"][1], np.ndarray)
    meta = json.loads((ckpt / checkpoint.MARKER).read_text())
    meta["files"] = {name: (ckpt / name).stat().st_size for name in meta["files"]}
    (ckpt / checkpoint.MARKER).write_text(json.dumps(meta))
    resume = ["run", "--resume", str(run), "--set", "run.steps=6", "--quiet"]
    assert main(resume) == 2
    assert "ngkit checkpoint convert RUN --trust" in " ".join(capsys.readouterr().err.split())
    assert main(["checkpoint", "convert", str(run)]) == 2
    assert main(["checkpoint", "convert", str(run), "--trust"]) == 0
    assert "sha256" in json.loads((ckpt / checkpoint.MARKER).read_text())["files"]["rank-0.pt"]
    assert main(resume) == 0


def test_a_corrupt_checkpoint_is_one_clear_error_on_export_and_eval(run, tmp_path, capsys):
    ckpt = run / "checkpoints" / TAG
    (ckpt / "mp_rank_00_model_states.pt").write_bytes(b"PK\x03\x04 not really a zip archive")
    meta = json.loads((ckpt / checkpoint.MARKER).read_text())  # the marker updated to match, as a copy tool might
    name = "mp_rank_00_model_states.pt"
    meta["files"][name] = {"bytes": (ckpt / name).stat().st_size, "sha256": sha256_of(ckpt / name)}
    (ckpt / checkpoint.MARKER).write_text(json.dumps(meta))
    for args in (["export", str(run), "--out", str(tmp_path / "x")], ["eval", str(run), "--metric", "mse", "--num-images", "8"]):
        assert main(args) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert f"{ckpt / name} is not a readable PyTorch checkpoint" in err and "Traceback" not in err, err


def test_a_recipe_whose_widths_do_not_fit_the_weights_names_the_tensor_and_both_shapes(run, capsys):
    import tomllib

    raw = tomllib.loads((run / "recipe.toml").read_text())
    raw["model"]["decoder"]["width"] = 24
    (run / "recipe.toml").write_text(tomli_w.dumps(raw))
    assert main(["eval", str(run), "--metric", "mse", "--num-images", "8"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "size mismatch for" in err and "torch.Size([" in err and "Traceback" not in err, err
    with pytest.raises(WeightsError, match=r"size mismatch for decoder\..*torch.Size"):
        ngkit.load(run)


@pytest.mark.parametrize("text", ['{"image": 3}', "not json", '{"image": {"channels": 1}, "latent": {}}'])
def test_a_damaged_specs_json_is_one_clear_error(run, text):
    (run / "specs.json").write_text(text)
    with pytest.raises(WeightsError, match="specs.json is damaged"):
        ngkit.load(run)
