"""The collapse monitor: one warning per kind in the run log, a flag column in ngkit compare."""

from __future__ import annotations


from ngkit.compare import aggregate, markdown
from ngkit.engine.progress import TrainProgress, collapse_reason


def test_collapse_reason_thresholds() -> None:
    assert collapse_reason({"entropy": 0.05}, 256) is not None
    assert collapse_reason({"entropy": 0.5}, 256) is None
    assert "perplexity" in (collapse_reason({"test/code_perplexity": 2.7}, 256) or "")
    assert collapse_reason({"test/code_perplexity": 18.3}, 256) is None  # FSQ on the photos
    assert collapse_reason({"code_perplexity": 2.7}, None) is None  # no vocabulary size known: no claim
    assert collapse_reason({"loss": 1.0}, 256) is None  # a method without these numbers


def test_progress_warns_once_per_kind(capsys) -> None:
    progress = TrainProgress(10, 0, {"codes": 256}, enabled=True)
    with progress:
        progress.update(1, {"kind": "train", "entropy": 2.0})
        progress.update(2, {"kind": "train", "entropy": 0.05})
        progress.update(3, {"kind": "train", "entropy": 0.04})
        progress.update(4, {"kind": "eval", "test/code_perplexity": 2.5})
    err = capsys.readouterr().err
    assert err.count("code collapse") == 2, err
    assert "step 2: per-token entropy 0.05" in err and "step 4: code perplexity 2.5" in err
    # each kind says what it means: near-certain codes per image (the update vanishes) vs few codes in use
    lines = " ".join(err.split())
    assert "0.1. Each image's codes are nearly certain: its K samples coincide" in lines
    assert "of 256 codes. The encoder uses a handful of codes" in lines


def test_compare_table_flags_collapsed_seeds() -> None:
    def row(variant: str, seed: int, perplexity: float) -> dict:
        reason = collapse_reason({"code_perplexity": perplexity}, 256)
        return {"variant": variant, "method": "m", "seed": seed, "code_perplexity": perplexity, "collapse": reason}

    table = aggregate([row("daps-na", 0, 2.7), row("daps-na", 1, 9.0), row("fsq", 0, 18.0), row("fsq", 1, 20.0)])
    assert [e["collapse"] for e in table] == ["1/2 seeds", "no"]
    md = markdown(table)
    assert md.splitlines()[0].endswith("| collapse |")
    assert "| 1/2 seeds |" in md and md.splitlines()[-1].endswith("| no |")
