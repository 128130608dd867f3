"""Hub-ready exports: the README.md model card, ``ngkit.load("user/repo")`` from the hub cache
with HF_HUB_OFFLINE=1, and ``ngkit export --push-to-hub`` up to the upload (a fake HfApi)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import ngkit
from ngkit.cli.main import main
from ngkit.engine.train_loop import train
from ngkit.errors import NgkitError
from ngkit.export import CONFIG, WEIGHTS, export
from ngkit.hub import FILES, is_hub_id
from ngkit.recipe import parse_recipe
from tiny_recipe import tiny

huggingface_hub = pytest.importorskip("huggingface_hub")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hub") / "run"
    raw = tiny(run={"steps": 4, "eval_every": 0, "checkpoint_every": 0, "ema": 0.9},
               eval={"metrics": ["mse", "psnr"], "num_images": 16})
    train(parse_recipe(raw, "tiny"), out, quiet=True)
    return out


@pytest.fixture(scope="module")
def exported(run_dir: Path) -> Path:
    export(run_dir, run_dir / "export")
    return run_dir / "export"


def test_the_model_card_has_front_matter_metrics_with_protocol_and_how_to_load(run_dir, exported):
    card = huggingface_hub.ModelCard.load(exported / "README.md")
    meta = card.data.to_dict()
    assert meta["library_name"] == "ngkit" and "daps-na" in meta["tags"]
    config = json.loads((exported / CONFIG).read_text())
    assert meta["ngkit"] == {
        "format": "ngkit-tokenizer", "format_version": 1, "method": "daps-na", "dataset": "digits",
        "image_size": [1, 8, 8], "tokens": 16, "codes": 16, "bits_per_image": 64.0, "step": 4,
        "weights": "ema", "dtype": "float32",
    } and config["weights"] == "ema"
    summary = json.loads((run_dir / "summary.json").read_text())
    text = card.text
    assert "64 bits per image" in text and "`digits`" in text and "exponential moving average" in text
    for key in ("mse", "psnr"):
        row = next(line for line in text.splitlines() if line.startswith(f"| {key} |"))
        assert f"{summary['metrics'][key]:.4g}" in row
        assert summary["protocol"][key]["definition"] in row  # how the number was made
    assert 'ngkit.load("path/to/this/folder")' in text and "no pickles" in text


def test_a_card_for_other_weights_than_the_evaluated_ones_shows_no_metrics(run_dir, tmp_path):
    export(run_dir, tmp_path / "raw", weights="raw")  # training evaluated the EMA weights
    text = (tmp_path / "raw" / "README.md").read_text()
    assert "No held-out metrics were recorded for step 4" in text and "| mse |" not in text


def fill_hub_cache(cache: Path, repo_id: str, folder: Path) -> Path:
    """An export in huggingface_hub's cache layout: blobs, a snapshot per commit, refs/main."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "README.md"):
        blob = repo / "blobs" / f"blob-{name}"
        shutil.copyfile(folder / name, blob)
        (snapshot / name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_load_by_hub_id_offline_from_the_filled_cache(exported, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)  # "someone/digits-tok" is no local path here
    fill_hub_cache(tmp_path / "hub", "someone/digits-tok", exported)
    assert is_hub_id("someone/digits-tok")
    tok, local = ngkit.load("someone/digits-tok"), ngkit.load(exported)
    images = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tok.encode(images), local.encode(images))
    assert torch.equal(tok.decode(tok.encode(images)), local.decode(local.encode(images)))
    with pytest.raises(NgkitError, match="not in the Hugging Face Hub cache"):
        ngkit.load("someone/not-there")


def test_a_hub_folder_without_an_export_is_refused(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pickled").mkdir()
    torch.save({"w": torch.zeros(1)}, tmp_path / "pickled" / "model.safetensors.pt")
    for name in ("config.json", "model.safetensors", "README.md"):
        (tmp_path / "pickled" / name).write_text("{}")
    snapshot = fill_hub_cache(tmp_path / "hub", "someone/pickles", tmp_path / "pickled")
    (snapshot / "model.safetensors").unlink()  # only a pickle and JSON: nothing ngkit will read
    with pytest.raises(NgkitError, match="holds no ngkit export"):
        ngkit.load("someone/pickles")


class FakeHfApi:
    """Stands in for huggingface_hub.HfApi: records the calls an upload would make."""

    calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id: str, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        self.calls.append(("upload_folder", {**kwargs, "files": sorted(p.name for p in folder.iterdir()),
                                             "card": (folder / "README.md").read_text()}))


def test_push_to_hub_creates_the_repo_and_uploads_the_export(run_dir, tmp_path, monkeypatch):
    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    out = tmp_path / "export"
    assert main(["export", str(run_dir), "--out", str(out), "--push-to-hub", "someone/digits-tok", "--private"]) == 0
    (create, created), (upload, uploaded) = FakeHfApi.calls
    assert create == "create_repo" and created == {"repo_id": "someone/digits-tok", "repo_type": "model",
                                                   "private": True, "exist_ok": True}
    assert upload == "upload_folder" and uploaded["repo_id"] == "someone/digits-tok"
    assert Path(uploaded["folder_path"]) == out and uploaded["allow_patterns"] == FILES
    assert {"README.md", CONFIG, WEIGHTS} <= set(uploaded["files"])
    assert 'ngkit.load("someone/digits-tok")' in uploaded["card"]


def test_push_to_hub_refuses_a_malformed_repo_id(run_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    with pytest.raises(NgkitError, match="user/name"):
        from ngkit.hub import push

        push(tmp_path, "not a repo id")
