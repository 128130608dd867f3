"""DAPS's encoder_kl without a trust region is only a log: it is measured (one gradient-free
encoder pass) on the steps whose logs are read, and there it is the value the every-step
measurement gives, bit for bit; training itself does not change."""

from __future__ import annotations

import pytest
import torch
from tiny_recipe import tiny

import ngkit_plugins.daps_method as daps_method
from ngkit.components import LOGS_READ
from ngkit.engine.artifacts import read_jsonl
from ngkit.engine.step import logs_read_at
from ngkit.engine.train_loop import train
from ngkit.recipe import parse_recipe


def _train(tmp_path, name: str, log_every: int, monkeypatch, **method) -> tuple[list[dict], dict, int]:
    """Records, final weights and the number of encoder_kl measurements of a 8-step tiny run."""
    calls = []
    kl = daps_method.token_kl

    def counted(*args):
        calls.append(1)
        return kl(*args)

    monkeypatch.setattr(daps_method, "token_kl", counted)
    raw = tiny(method={"name": "daps-na", "samples": 4, **method},
               run={"steps": 8, "log_every": log_every, "eval_every": 0, "checkpoint_every": 0, "device": "cpu"})
    out = tmp_path / name
    train(parse_recipe(raw, "tiny"), out, quiet=True)
    records = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("kind") == "train"]
    ckpt = sorted((out / "checkpoints").iterdir())[-1] / "mp_rank_00_model_states.pt"
    return records, torch.load(ckpt, weights_only=True)["module"], len(calls)


def test_encoder_kl_measured_on_log_steps_only_and_equal_there(tmp_path, monkeypatch, one_thread):
    every, every_w, every_n = _train(tmp_path, "every", 1, monkeypatch)
    sparse, sparse_w, sparse_n = _train(tmp_path, "sparse", 4, monkeypatch)
    assert every_n == 8 and sparse_n == 2  # one pass per step read, none on the others
    assert [r["step"] for r in sparse] == [4, 8]
    by_step = {r["step"]: r for r in every}
    for r in sparse:
        # the log step's own measurement, the same bits as when every step is measured
        assert r["encoder_kl"] == by_step[r["step"]]["encoder_kl"] > 0
        # the other logs are still the window's mean over its 4 steps
        window = [by_step[s] for s in range(r["step"] - 3, r["step"] + 1)]
        assert r["loss"] == pytest.approx(sum(w["loss"] for w in window) / 4, rel=1e-12)
    assert every_w.keys() == sparse_w.keys()
    assert all(torch.equal(every_w[k], sparse_w[k]) for k in every_w)  # training unchanged


@pytest.mark.parametrize("mode", ["penalty", "project"])
def test_trust_region_measures_every_step(mode, tmp_path, monkeypatch, one_thread):
    """The trust region's dual step (penalty) or projection needs the KL after every step."""
    records, _, calls = _train(tmp_path, mode, 4, monkeypatch, trust_region=0.05, trust_region_mode=mode)
    assert calls >= 8 and all("encoder_kl" in r for r in records)


def test_after_step_measures_unless_told_the_logs_are_not_read():
    """Outside the training loop every step's logs count as read (tests, notebooks); told
    otherwise, a method without a trust region skips the pass, one with a trust region does not."""
    from test_daps_trust_region import _images, _method

    for trust, expect_when_unread in ((0.0, False), (0.05, True)):
        for read in (True, False):
            method = _method(trust_region=trust)
            opt = torch.optim.Adam(method.parameters(), lr=0.05)
            out = method(_images(), step=1)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            token = LOGS_READ.set(read) if not read else None
            try:
                logs = method.after_step(1)
            finally:
                if token is not None:
                    LOGS_READ.reset(token)
            assert ("encoder_kl" in logs) == (read or expect_when_unread), (trust, read, logs)


def test_logs_read_at():
    assert [s for s in range(1, 13) if logs_read_at(s, 5, 12)] == [5, 10, 12]
    # a [run] seconds budget: the steps that may be the last one are measured too
    assert not logs_read_at(3, 5, 100, seconds=60.0, elapsed=50.0, step_s=1.0)
    assert logs_read_at(3, 5, 100, seconds=60.0, elapsed=58.5, step_s=1.0)
    assert not logs_read_at(3, 5, 100, seconds=0.0, elapsed=1e9, step_s=1.0)
