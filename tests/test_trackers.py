"""Experiment trackers (plugins/trackers.py): what TensorBoard and W&B (offline) receive is what
``metrics.jsonl`` holds, plus the recipe and the reconstruction grid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ngkit.cli.main import main
from ngkit.engine.artifacts import read_jsonl
from ngkit.engine.train_loop import train
from ngkit.errors import RecipeError
from ngkit.recipe import parse_recipe
from tiny_recipe import tiny

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = {"steps": 6, "log_every": 2, "eval_every": 4, "checkpoint_every": 0}
EVAL = {"metrics": ["mse", "psnr"], "num_images": 16}


def jsonl_scalars(out: Path) -> dict[str, dict[int, float]]:
    """tag -> step -> value, as metrics.jsonl has them."""
    scalars: dict[str, dict[int, float]] = {}
    for record in read_jsonl(out / "metrics.jsonl"):
        for key, value in record.items():
            if key not in ("kind", "step"):
                scalars.setdefault(key, {})[record["step"]] = value
    return scalars


def test_tensorboard_events_hold_the_scalars_of_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(parse_recipe(tiny(run={**RUN, "trackers": ["tensorboard"]}, eval=EVAL), "t"), out, quiet=True)
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    want = jsonl_scalars(out)
    assert {"loss", "lr", "test/mse", "test/psnr"} <= set(want)
    assert set(events.Tags()["scalars"]) == set(want)
    for tag, by_step in want.items():
        got = {e.step: e.value for e in events.Scalars(tag)}
        assert got.keys() == by_step.keys(), tag
        for step, value in by_step.items():
            assert got[step] == pytest.approx(value, rel=1e-6), (tag, step)  # float32 in the event file
    assert set(want["test/mse"]) == {4, 6}  # the periodic and the final evaluation
    assert events.Tags()["images"] == ["reconstructions"]
    recipe = events.Tensors("recipe/text_summary")[0].tensor_proto.string_val[0].decode()
    assert 'name = "daps-na"' in recipe


def test_a_resumed_run_purges_the_events_after_its_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    run = {**RUN, "trackers": ["tensorboard"], "checkpoint_every": 2, "eval_every": 0}
    train(parse_recipe(tiny(run=run, eval=EVAL), "t"), out, quiet=True)
    # drop the newest checkpoint: the resume restarts from step 4 and trains 5 and 6 again
    import shutil

    shutil.rmtree(out / "checkpoints" / "step-00000006")
    train(parse_recipe(tiny(run=run, eval=EVAL), "t"), out, resume=True, quiet=True)
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [2, 4, 6]  # step 6 once, not twice
    want = jsonl_scalars(out)["loss"]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([want[s] for s in (2, 4, 6)], rel=1e-6)


def wandb_log(run_file: Path) -> tuple[dict[int, dict[str, object]], dict[str, object]]:
    """step -> history row, and the config, of an offline W&B run, read from its transaction log: LevelDB's
    log format (32 KiB blocks of records with a 7-byte header: CRC, length, type) after a 7-byte
    file header, each record a ``wandb_internal_pb2.Record`` protobuf."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, pos, block, pending, rows, config = run_file.read_bytes(), 7, 32768, b"", {}, {}
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the rest of a block too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # full/first start, middle/last continue
        if kind not in (1, 4):
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            rows[int(row["_step"])] = row
        if record.WhichOneof("record_type") == "run":
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
    return rows, config


def test_wandb_offline_history_holds_the_scalars_of_metrics_jsonl(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is the plugin's default
    out = tmp_path / "run"
    assert main(["run", str(write(tmp_path, tiny(run=RUN, eval=EVAL))), "--out", str(out), "--quiet",
                 "--tracker", "wandb"]) == 0
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    history, config = wandb_log(next(runs[0].glob("run-*.wandb")))
    want: dict[int, dict[str, float]] = {}  # W&B keeps one row per step: the records of a step merged
    for record in read_jsonl(out / "metrics.jsonl"):
        want.setdefault(record["step"], {}).update({k: v for k, v in record.items() if k not in ("kind", "step")})
    assert history.keys() == want.keys() == {2, 4, 6}
    for step, values in want.items():
        for key, value in values.items():
            assert history[step][key] == pytest.approx(value, rel=1e-12), (step, key)
    assert history[6]["reconstructions/_type"] == "image-file"
    assert config["method"]["name"] == "daps-na" and config["run"]["steps"] == 6  # the recipe


def write(tmp_path: Path, raw: dict) -> Path:
    import tomli_w

    path = tmp_path / "recipe.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


def test_an_unknown_tracker_is_a_recipe_error():
    with pytest.raises(RecipeError, match="run.trackers"):
        parse_recipe(tiny(run={**RUN, "trackers": ["mlflow"]}), "t")
