"""Every ``# example:`` block of docs/writing-a-plugin.md is a working plugin: each is loaded as a
module, registered, built the way a recipe would build it, and checked against its contract;
every hook has at least one example."""

from __future__ import annotations

import itertools

import contextlib
import re
import sys
import types
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

import ngkit.hookspecs
from ngkit import hookimpl
from ngkit.binding import build_component, check_component
from ngkit.components import EvalBatch, ImageSpec, LatentSpec
from ngkit.plugins import get_registry, temporary_plugin

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "writing-a-plugin.md"
EXAMPLES = dict(re.findall(r"```python\n# example: (\S+)\n(.*?)```", GUIDE.read_text(), re.S))
IMAGE = ImageSpec(1, 8, 8, (0.25,), (0.2,))
LATENT = LatentSpec((2, 2), 16)
CONTEXT = {"image": IMAGE, "latent": LATENT, "total_steps": 100}


def load(name: str) -> types.ModuleType:
    module = types.ModuleType(f"doc_example_{name}")
    sys.modules[module.__name__] = module  # annotations are resolved through sys.modules
    exec(compile(EXAMPLES[name], f"{GUIDE}:{name}", "exec"), module.__dict__)
    return module


@pytest.fixture
def plugin(request):
    """The named examples registered as plugins for one test."""
    names = request.param if isinstance(request.param, tuple) else (request.param,)
    with contextlib.ExitStack() as stack:
        for name in names:
            stack.enter_context(temporary_plugin(load(name), f"doc_{name}"))
        yield
    for name in names:
        sys.modules.pop(f"doc_example_{name}", None)


def build(kind: str, table: dict, context: dict | None = None):
    problems = check_component(kind, table, kind, get_registry())
    assert problems == []
    return build_component(kind, table, CONTEXT if context is None else context, kind)


def test_every_hook_has_an_example():
    implemented = {
        attr for source in EXAMPLES.values() for attr in re.findall(r"@hookimpl\ndef (\w+)\(", source)
    }
    assert set(ngkit.hookspecs.__all__) <= implemented, set(ngkit.hookspecs.__all__) - implemented


@pytest.mark.parametrize("plugin", ["dataset"], indirect=True)
def test_dataset_example(plugin):
    data = build("datasets", {"name": "ramps", "size": 8}, context={})
    stream = data.train(seed=0, epoch=0, shard=0, num_shards=1)
    x = next(iter(stream)).load()
    assert x.shape == data.spec.shape == (1, 8, 8) and 0 <= x.min() and x.max() <= 1
    # two shards partition the stream; a start skips within a shard without drawing
    whole = [e.load() for e in itertools.islice(data.train(seed=0, epoch=0, shard=0, num_shards=1), 6)]
    odd = [e.load() for e in itertools.islice(data.train(seed=0, epoch=0, shard=1, num_shards=2, start=1), 2)]
    assert torch.equal(odd[0], whole[3]) and torch.equal(odd[1], whole[5])
    first = torch.stack(list(data.test(shard=0, num_shards=1, limit=10)))
    assert first.shape == (10, 1, 8, 8)
    assert torch.equal(first, torch.stack(list(data.test(shard=0, num_shards=1, limit=10))))


@pytest.mark.parametrize("plugin", [("encoder", "decoder", "method", "beta")], indirect=True)
def test_encoder_decoder_method_and_beta_examples_train_together(plugin):
    torch.manual_seed(0)
    encoder = build("encoders", {"name": "patch-linear"})
    decoder = build("decoders", {"name": "patch-gaussian"})
    beta = build("beta_schedules", {"name": "warmup", "value": 0.1})
    assert beta(0) == 0.0 and beta(100) == pytest.approx(0.1)
    x = torch.rand(4, 1, 8, 8)
    z, logq = encoder.sample(x, 3)
    assert z.shape == (3, 4, 4) and logq.shape == (3, 4)
    out = encoder.log_prob(x, z)
    assert torch.allclose(out.logq, logq) and out.logits.shape == (3, 4, 4, 16) and out.entropy.shape == (3, 4, 4)
    assert encoder.mode(x).shape == (4, 4) and encoder.features(x).shape == (4, 4, encoder.feature_dim)
    with torch.no_grad():
        encoder.head.bias[1] = -1e4  # code 1 is dead: the case split_codes is for
    before = encoder.log_prob(x, z).logits[0].exp()  # [B, L, V]
    encoder.split_codes(torch.tensor([1]), torch.tensor([0]))
    after = encoder.log_prob(x, z).logits[0].exp()
    # code 1 is now a copy of code 0 taking half its probability; the rest is unchanged
    assert torch.allclose(after[..., 0], after[..., 1]) and torch.allclose(after[..., 0] * 2, before[..., 0], atol=1e-6)
    assert torch.allclose(after[..., 2:], before[..., 2:], atol=1e-6) and not torch.allclose(after, before)

    params = decoder(decoder.embed(z[0]))
    assert decoder.mean(params).shape == x.shape and decoder.log_prob(x, params).shape == (4,)
    soft = torch.nn.functional.one_hot(z[0], 16).float()
    assert torch.allclose(decoder.embed(soft), decoder.embed(z[0]))

    method = build("methods", {"name": "straight-through"}, {**CONTEXT, "encoder": encoder, "decoder": decoder, "beta": beta})
    optim = torch.optim.Adam(method.parameters(), lr=1e-2)
    batch = torch.rand(16, 1, 8, 8)
    losses = []
    for step in range(1, 41):
        out = method(batch, step)
        optim.zero_grad()
        out.loss.backward()
        optim.step()
        losses.append(out.logs["loss"])
    assert losses[-1] < losses[0]  # it learns
    assert method.decode(method.encode(batch)).shape == batch.shape


@pytest.mark.parametrize("plugin", ["proxy"], indirect=True)
def test_proxy_example(plugin):
    proxy = build("posterior_proxies", {"name": "tempered"})
    logp, logq = torch.randn(8, 3) * 10, torch.randn(8, 3)
    out = proxy(logp, logq, eta=1.0, beta=0.5)
    assert torch.allclose(out.weights.sum(0), torch.ones(3, dtype=torch.float64))
    assert 1.0 <= float(out.ess) <= 8.0 and float(out.kl) >= 0
    flat = proxy(torch.zeros(8, 3), torch.zeros(8, 3), eta=1.0, beta=0.5)
    assert float(flat.ess) == pytest.approx(8.0)  # equal rewards: q~ = q


@pytest.mark.parametrize("plugin", ["step_size"], indirect=True)
def test_step_size_example(plugin):
    policy = build("step_size_policies", {"name": "halving", "start": 8.0, "every": 2})
    etas = []
    for _ in range(5):
        etas.append(float(policy.eta(None, None, 0.1)))
        policy.update(None, None, 0.1)
    assert etas == [8.0, 8.0, 4.0, 4.0, 2.0]
    assert "updates" in policy.state_dict()  # survives a checkpoint


@pytest.mark.parametrize("plugin", ["quantizer"], indirect=True)
def test_quantizer_example(plugin):
    quantizer = build("quantizers", {"name": "plain-vq", "dim": 4})
    h = torch.randn(2, 4, 4, requires_grad=True)
    quantized, codes, aux, logs = quantizer(h)
    assert quantized.shape == h.shape and codes.shape == (2, 4) and codes.dtype == torch.long
    assert torch.allclose(quantized, quantizer.codes_to_vectors(codes))
    (quantized.sum() + aux).backward()
    assert h.grad is not None and quantizer.codebook.grad is not None  # straight-through + codebook loss


@pytest.mark.parametrize("plugin", ["metric"], indirect=True)
def test_metric_example(plugin):
    metric = build("metrics", {"name": "max-error"}, context={})
    images = torch.zeros(4, 1, 8, 8)
    recon = images.clone()
    recon[:2, 0, 0, 0] = 0.5
    metric.update(EvalBatch(images, recon, torch.zeros(4, 4, dtype=torch.long), LATENT))
    assert metric.compute() == {"max_error": pytest.approx(0.25)}
    assert metric.protocol()["images"] == 4


@pytest.mark.parametrize("plugin", ["loss"], indirect=True)
def test_loss_example(plugin):
    loss = build("losses", {"name": "edges", "scale": 64.0})
    images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(loss(images, images), torch.zeros(3))
    recon = images.clone()
    recon[:, 0, 0, 0] += 0.5  # changes one horizontal difference by -0.5
    assert loss(images, recon).tolist() == pytest.approx([0.25] * 3)


@pytest.mark.parametrize("plugin", ["run_hooks"], indirect=True)
def test_run_hooks_example(plugin, tmp_path, capsys):
    from ngkit.plugins import get_plugin_manager

    hook = get_plugin_manager().hook
    run = types.SimpleNamespace(out_dir=tmp_path)
    hook.on_train_start(run=run)
    hook.on_step_end(run=run, step=1, logs={"loss": 2.5})
    hook.on_eval_end(run=run, step=1, metrics={"psnr": 20.0})
    hook.on_checkpoint(run=run, step=1, path=tmp_path / "ckpt")
    hook.on_train_end(run=run, summary={"metrics": {"psnr": 21.0}})
    assert (tmp_path / "my-log.jsonl").read_text() == '{"step": 1, "loss": 2.5}\n'
    assert "step 1: {'psnr': 20.0}" in capsys.readouterr().out


def test_commands_example():
    cli = typer.Typer()
    cli.command("noop")(lambda: None)  # a second command, so "hello" stays a sub-command
    load("commands").register_commands(cli=cli)
    result = CliRunner().invoke(cli, ["hello", "--name", "ngkit"])
    assert result.exit_code == 0 and result.output == "hello ngkit\n"


def test_the_context_error_the_guide_quotes_is_the_real_one():
    module = types.ModuleType("my_metric")
    exec("class Area:\n    def __init__(self, image):\n        pass\n", module.__dict__)
    plugin = types.SimpleNamespace(register_metrics=hookimpl(lambda register: register("area", module.Area)))
    with temporary_plugin(plugin, "my_metric"):
        msg = check_component("metrics", {"name": "area"}, "eval.metrics.area", get_registry())[0]
    assert f"```\n{msg}\n```" in GUIDE.read_text()


@pytest.mark.parametrize("plugin", ["prior"], indirect=True)
def test_prior_example(plugin):
    torch.manual_seed(0)
    prior = build("priors", {"name": "unigram"}, context={"latent": LATENT, "classes": 3})
    prior.allowed[5] = False  # a code the tokenizer never emits
    codes = torch.randint(0, 5, (64, LATENT.tokens))
    labels = torch.randint(0, 3, (64,))
    optimizer = torch.optim.Adam(prior.parameters(), lr=0.1)
    first = None
    for _ in range(50):
        out = prior.loss(codes, labels)
        first = first if first is not None else float(out.loss)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert float(out.loss) < first
    for guidance in (0.0, 1.0, 3.0):
        sampled = prior.sample(torch.tensor([0, 1, 2, 0]), guidance=guidance)
        assert sampled.shape == (4, LATENT.tokens) and int(sampled.max()) < LATENT.codes
        assert not (sampled == 5).any()
