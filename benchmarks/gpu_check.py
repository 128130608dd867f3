"""Every GPU question of issue 24 in one command: attention kernels, the ImageNet-256 step and its
MFU, AR sampling against the teacher-forced pass, torch.compile / channels-last, FID features.

Run on one GPU (about 6 minutes; each section has its own time box, and one that fails or runs
out of time records why while the others still run):

    .venv/bin/python benchmarks/gpu_check.py --out gpu_check.json

On CPU, the same sections on tiny shapes (what the test suite runs; xformers is then reported
as unavailable): ``.venv/bin/python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check.json``.

Each section runs in a child process of its own (``--section NAME``), so a hung kernel, an
out-of-memory or a broken NCCL start costs that section only; the parent stops a child that
overruns with SIGTERM and collects the JSON each child writes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "imagenet256.toml"

# Seconds each section may take on the GPU (the sum stays under 6 minutes with start-up); the
# dry run gets its own, for a loaded CPU.
BUDGET_S = {"attention": 45, "step": 110, "sampling": 60, "compile": 100, "fid": 30}
DRY_BUDGET_S = {"attention": 120, "step": 180, "sampling": 120, "compile": 180, "fid": 120}

# Dense bf16 tensor-core peak, TFLOP/s (no 2:4 sparsity), from NVIDIA's datasheets: H100 and H200
# "Tensor Core GPU" datasheets (H100 SXM 989, PCIe 756, NVL 835; H200 SXM/NVL the same chip as
# H100 SXM/NVL), the A100 datasheet (312), the L40S datasheet (362, "733 with sparsity"), the L4
# datasheet (121), the A10 datasheet (125) and the RTX 4090 spec sheet (165, FP16/BF16 with FP32
# accumulate: the Ada whitepaper, appendix A). Matched against torch.cuda.get_device_name().
BF16_PEAK_TFLOPS = [
    ("H200 NVL", 835.0), ("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0),
    ("H100", 989.0), ("GH200", 989.0), ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0),
    ("L4", 121.0), ("A10", 125.0), ("RTX 4090", 165.0),
]


def peak_tflops(device_name: str) -> float | None:
    """The table's peak for a device name (first match: the longer names come first)."""
    for key, value in BF16_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


# ---------------------------------------------------------------------------------------------
# shapes


def shapes(dry: bool) -> dict[str, Any]:
    """The ImageNet-256 recipe's model (1024 tokens, V = 1024, K = 8), or a tiny one on CPU."""
    if dry:
        return {"image": 16, "patch": 2, "codes": 32, "width": 32, "heads": 2, "batch": 2, "samples": 2,
                "step_batch": 2, "sampling_batch": 2, "fid_batch": 4, "repeats": 2, "steps": 1, "warmup": 1}
    return {"image": 256, "patch": 8, "codes": 1024, "width": 128, "heads": 4, "batch": 8, "samples": 8,
            "step_batch": 64, "sampling_batch": 8, "fid_batch": 200, "repeats": 5, "steps": 4, "warmup": 2}


def _device() -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up (device synchronised)."""
    times = []
    for i in range(repeats + 1):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _encoder(s: dict[str, Any], factorised: bool = False) -> Any:
    import torch

    from ngkit.components import ImageSpec, LatentSpec
    from ngkit_plugins.transformer_encoder import TransformerEncoder

    side = s["image"] // s["patch"]
    torch.manual_seed(0)
    return TransformerEncoder(image=ImageSpec(3, s["image"], s["image"]), latent=LatentSpec((side, side), s["codes"]),
                              width=s["width"], heads=s["heads"], depth=2, latent_depth=2, factorised=factorised)


class _Backend:
    """Force ngkit.nn's attention to one kernel inside the block (the probe is per process)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        import ngkit.nn as attention_module

        self.saved = attention_module._xformers_usable
        usable = self.saved() if self.name == "xformers" else False
        attention_module._xformers_usable = lambda: usable

    def __exit__(self, *exc: object) -> None:
        import ngkit.nn as attention_module

        attention_module._xformers_usable = self.saved


# ---------------------------------------------------------------------------------------------
# sections: each returns a JSON-able dict


def section_attention(s: dict[str, Any]) -> dict[str, Any]:
    """xformers vs SDPA: the encoder's teacher-forced pass forward + backward at the recipe's
    shape, in fp32 and bf16 (autocast); max abs and relative difference (max |a - b| over max |b|)
    of log q and of every gradient, and the time of each kernel."""
    import torch

    from ngkit.nn import attention_backend

    device = _device()
    enc = _encoder(s).to(device)
    torch.manual_seed(1)
    x = torch.rand(s["batch"], 3, s["image"], s["image"], device=device)
    z = torch.randint(0, s["codes"], (s["samples"], s["batch"], enc.latent.tokens), device=device)
    kernels = ["sdpa"] + (["xformers"] if device.type == "cuda" and attention_backend() == "xformers" else [])

    def run(kernel: str, dtype: torch.dtype) -> tuple[list[torch.Tensor], float]:
        def once() -> list[torch.Tensor]:
            enc.zero_grad(set_to_none=True)
            with _Backend(kernel), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                logq = enc.log_prob(x, z).logq
            logq.float().sum().backward()
            return [logq.detach().float()] + [p.grad.detach().float().clone() for p in enc.parameters()]

        return once(), _timed(once, s["repeats"])

    def diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> dict[str, float]:
        abs_ = max(float((u - v).abs().max()) for u, v in zip(a, b))
        rel = max(float((u - v).abs().max() / v.abs().max().clamp_min(1e-30)) for u, v in zip(a, b))
        return {"max_abs": abs_, "max_rel": rel}

    out: dict[str, Any] = {"tokens": enc.latent.tokens, "batch": s["batch"], "samples": s["samples"],
                           "kernels": kernels, "ms": {}, "diff": {}}
    if "xformers" not in kernels:
        out["xformers"] = "unavailable (no CUDA, or xformers missing or broken)"
    results = {}
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for kernel in kernels:
            values, seconds = run(kernel, dtype)
            results[kernel, dtype_name] = values
            out["ms"][f"{kernel} {dtype_name}"] = 1e3 * seconds
        if "xformers" in kernels:
            out["diff"][f"xformers vs sdpa, {dtype_name}"] = diff(results["xformers", dtype_name], results["sdpa", dtype_name])
    # the yardstick: what bf16 itself changes (SDPA bf16 against SDPA fp32)
    out["diff"]["sdpa bf16 vs sdpa fp32"] = diff(results["sdpa", "bf16"], results["sdpa", "fp32"])
    return out


def _recipe(s: dict[str, Any], dry: bool, batch: int) -> Any:
    """recipes/imagenet256.toml's model and method on synthetic images (the photos dataset's
    random crops in place of ImageNet), bf16, ZeRO-2, one process."""
    import tomllib

    from ngkit.recipe import apply_overrides, parse_recipe

    raw = tomllib.loads(RECIPE.read_text())
    raw["data"] = {"name": "photos", "crop": s["image"], "scale": 1.0, "batch_size": batch, "workers": 0 if dry else 4}
    overrides = [
        "distributed.zero_stage=2", "distributed.precision=bf16", f"model.patch_size={s['patch']}",
        f"model.codes={s['codes']}", f"model.encoder.width={s['width']}", f"model.encoder.heads={s['heads']}",
        f"method.samples={s['samples']}", f"run.device={'cpu' if dry else 'cuda'}",
    ] + (["model.decoder.width=8"] if dry else [])
    return parse_recipe(apply_overrides(raw, overrides, str(RECIPE)), str(RECIPE))


def _engine_steps(recipe: Any, steps: int, warmup: int, prepare: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """Build the recipe's engine as ``ngkit run`` does and time ``steps`` optimiser steps of the
    engine's own step without a phase timer (one device sync at the end, none per phase);
    then count the FLOPs of one more step (SDPA forced: xformers' kernel is not counted)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ngkit.data import TrainBatches
    from ngkit.engine.build import build
    from ngkit.engine.deepspeed_engine import DTYPES, make_engine
    from ngkit.engine.distributed import init_distributed, pick_device, set_accelerator_env
    from ngkit.engine.step import StepPlan, train_step
    from ngkit.engine.seeding import seed_everything

    device = pick_device(recipe.run.device)
    set_accelerator_env(device)
    init_distributed(device, recipe.distributed.backend)
    dtype = DTYPES[recipe.distributed.precision]
    seed_everything(recipe.run.seed)
    built = build(recipe)
    method = built.method.to(device)
    if prepare is not None:
        prepare(method)
    engine = make_engine(method, recipe)
    batches = TrainBatches(built.dataset, recipe.data.batch_size, recipe.run.seed, 0, 1, recipe.data.workers)
    plan = StepPlan.of(engine, recipe, device, dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(1, warmup + 1):
        train_step(engine, batches, step, plan)
    _sync()
    start = time.perf_counter()
    for step in range(warmup + 1, warmup + steps + 1):
        train_step(engine, batches, step, plan)
    _sync()
    step_s = (time.perf_counter() - start) / steps
    counter = FlopCounterMode(display=False)
    with _Backend("sdpa"), counter:
        train_step(engine, batches, warmup + steps + 1, plan)
    flops = counter.get_total_flops()
    out = {"batch": recipe.data.batch_size, "samples": recipe.method.options.get("samples"), "step_ms": 1e3 * step_s,
           "images_per_s": recipe.data.batch_size / step_s, "flops_per_step": flops,
           "achieved_tflops": flops / step_s / 1e12}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = peak_tflops(name)
        out.update(device=name, peak_bf16_tflops=peak, mfu=(flops / step_s / 1e12 / peak) if peak else None,
                   peak_cuda_mb=torch.cuda.max_memory_allocated(device) / 2**20)
    else:
        out.update(device="cpu", peak_bf16_tflops=None, mfu=None, peak_cuda_mb=None)
    return out


def _with_smaller_batch(run: Callable[[int], dict[str, Any]], batch: int) -> dict[str, Any]:
    """``run(batch)``, halving the batch after an out-of-memory (down to 8): the result says
    which batch fitted."""
    import torch

    while True:
        try:
            return run(batch)
        except torch.OutOfMemoryError:
            if batch <= 8:
                raise
            batch //= 2
            torch.cuda.empty_cache()


def section_step(s: dict[str, Any], dry: bool) -> dict[str, Any]:
    """The ImageNet-256 DAPS step, bf16, ZeRO-2, one GPU (NCCL): ``ngkit bench``'s phases, the
    un-instrumented step's images/s, peak CUDA memory and MFU from FlopCounterMode's count."""
    from ngkit.engine.bench import bench

    def run(batch: int) -> dict[str, Any]:
        recipe = _recipe(s, dry, batch)
        out = _engine_steps(recipe, s["steps"], s["warmup"])
        report = bench(recipe, "imagenet256", steps=max(1, s["steps"] - 1), warmup=1, baseline=None)
        out["bench_phases_ms"] = report.timing.phases_ms
        out["bench_step_ms"] = report.timing.step_ms
        out["bench_floor_ms"] = report.timing.floor_ms
        return out

    return _with_smaller_batch(run, s["step_batch"])


def section_compile(s: dict[str, Any], dry: bool) -> dict[str, Any]:
    """The same step with the decoder and the encoder's patch transformer under torch.compile,
    and the decoder's convolutions on channels-last activations, each alone against the plain
    step (at a quarter of the step's batch, to fit the time box)."""
    import torch

    def compiled(method: Any) -> None:
        method.decoder.compile()
        if not dry:  # inductor's C++ build on CPU is slow; the dry run compiles the decoder only
            for block in method.encoder.blocks:
                block.compile()

    def channels_last(method: Any) -> None:
        # activations only: DeepSpeed flattens the weights, which must stay contiguous; cuDNN
        # then runs channels-last kernels for channels-last inputs
        def to_channels_last(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
            return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])

        for module in method.decoder.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.register_forward_pre_hook(to_channels_last)

    out: dict[str, Any] = {}
    batch = max(8, s["step_batch"] // 4) if not dry else s["step_batch"]
    for name, prepare in (("plain", None), ("torch.compile", compiled), ("channels_last", channels_last)):
        try:
            result = _engine_steps(_recipe(s, dry, batch), s["steps"], s["warmup"], prepare)
            out[name] = {k: result[k] for k in ("batch", "step_ms", "images_per_s", "mfu")}
        except Exception as exc:  # one variant failing (a compiler error) leaves the others
            out[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    return out


def _sample_without_cache(enc: Any, feats: Any, samples: int, tokens: int) -> Any:
    """Draw ``tokens`` codes by rerunning the teacher-forced pass on the whole prefix for every
    token (no KV cache): the reference the cached sampler must match and beat."""
    import torch

    b = feats.shape[0]
    prev = feats.new_full((b, samples, 1), enc.latent.codes, dtype=torch.long)
    drawn = []
    for _ in range(tokens):
        logp = enc._teacher_forced(feats, prev)[:, :, -1]  # [B, K, V] for the newest position
        token = torch.multinomial(logp.softmax(-1).flatten(0, 1), 1).view(b, samples)
        drawn.append(token)
        prev = torch.cat([prev, token.unsqueeze(-1)], dim=-1)
    return torch.stack(drawn, -1)


def section_sampling(s: dict[str, Any], dry: bool) -> dict[str, Any]:
    """AR sampling of all L tokens (K samples of B images) over one teacher-forced pass forward
    + backward, bf16 on GPU; with the KV cache in full, without it on the first tokens only
    (it costs O(L^2)), extrapolated per token."""
    import torch

    device = _device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    enc = _encoder(s).to(device)
    b, k, length = s["sampling_batch"], s["samples"], enc.latent.tokens
    torch.manual_seed(1)
    x = torch.rand(b, 3, s["image"], s["image"], device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    with autocast:
        z, _ = enc.sample(x, k)

    def teacher_forced() -> None:
        with autocast:
            logq = enc.log_prob(x, z).logq
        logq.float().sum().backward()

    def sample() -> None:
        with autocast:
            enc.sample(x, k)

    tf_s = _timed(teacher_forced, s["repeats"])
    sample_s = _timed(sample, max(1, s["repeats"] // 2))
    prefix = min(length, 16 if dry else 64)
    with torch.no_grad(), autocast:
        feats = enc.features(x)
        nocache_s = _timed(lambda: _sample_without_cache(enc, feats, k, prefix), 1)
        # the cached and uncached samplers draw the same codes from the same generator state
        torch.manual_seed(2)
        cached = enc._autoregress(feats, k, lambda logp: torch.multinomial(logp.softmax(-1).flatten(0, -2), 1)
                                  .view(logp.shape[:-1]))[0][..., :prefix]
        torch.manual_seed(2)
        uncached = _sample_without_cache(enc, feats, k, prefix)
    # without the cache token t costs a pass over t tokens: the full sampler ~ L^2 / prefix^2 times the prefix
    nocache_full_s = nocache_s * (length / prefix) ** 2
    return {"tokens": length, "batch": b, "samples": k, "sequences": b * k, "dtype": str(dtype),
            "teacher_forced_fwd_bwd_ms": 1e3 * tf_s, "sample_kv_cache_ms": 1e3 * sample_s,
            "ratio_kv_cache": sample_s / tf_s, "no_cache_prefix_tokens": prefix,
            "no_cache_prefix_ms": 1e3 * nocache_s, "no_cache_full_ms_extrapolated": 1e3 * nocache_full_s,
            "ratio_no_cache_extrapolated": nocache_full_s / tf_s,
            "cached_equals_uncached_codes": bool(torch.equal(cached, uncached)),
            "cached_uncached_code_agreement": float((cached == uncached).float().mean())}


def section_fid(s: dict[str, Any], dry: bool) -> dict[str, Any]:
    """FID Inception-v3 pool features, images/s at batch 200 (random weights: same speed)."""
    import torch

    from ngkit.metrics import FIDInceptionV3

    device = _device()
    net = FIDInceptionV3().to(device)
    x = torch.rand(s["fid_batch"], 3, s["image"] if dry else 256, s["image"] if dry else 256, device=device)
    out = {}
    for name, dtype in (("fp32", torch.float32),) + ((("bf16", torch.bfloat16),) if device.type == "cuda" else ()):
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            seconds = _timed(lambda: net(x), s["repeats"])
        out[f"images_per_s {name}"] = s["fid_batch"] / seconds
    return {"batch": s["fid_batch"], **out}


def floor_flops(batch: int = 1) -> dict[str, float]:
    """FLOPs of the ImageNet-256 step's model work for ``batch`` images (K = 8): drawing the K
    sequences, the teacher-forced pass forward + backward, the decoder forward + backward on
    the K * B images; linear in the batch. Runs on a CPU (``--count-flops``, about a minute)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ngkit.components import ImageSpec, LatentSpec
    from ngkit_plugins.conv_decoder import ConvDecoder

    s = shapes(False)
    enc = _encoder(s)
    dec = ConvDecoder(image=ImageSpec(3, 256, 256), latent=enc.latent, width=64, res_blocks=2)
    x = torch.rand(batch, 3, 256, 256)
    parts = {}
    counter = FlopCounterMode(display=False)
    with counter:
        z, _ = enc.sample(x, s["samples"])
    parts["sampling"] = counter.get_total_flops()
    with counter:
        enc.log_prob(x, z).logq.sum().backward()
    parts["teacher-forced fwd+bwd"] = counter.get_total_flops()
    x_k = x.expand(s["samples"], *x.shape).flatten(0, 1)
    with counter:
        dec.log_prob(x_k, dec(dec.embed(z.flatten(0, 1)))).sum().backward()
    parts["decoder fwd+bwd"] = counter.get_total_flops()
    return {**parts, "total": sum(parts.values()), "batch": batch}


SECTIONS: dict[str, Callable[..., dict[str, Any]]] = {
    "attention": lambda s, dry: section_attention(s),
    "step": section_step,
    "sampling": section_sampling,
    "compile": section_compile,
    "fid": section_fid,
}


# ---------------------------------------------------------------------------------------------
# the parent: one child per section, time-boxed


def run_child(name: str, dry: bool, budget: float) -> dict[str, Any]:
    """Run one section in a child process; stop it with SIGTERM past ``budget`` seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        part = Path(tmp) / f"{name}.json"
        cmd = [sys.executable, __file__, "--section", name, "--out", str(part)] + (["--dry-run"] if dry else [])
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            log, _ = proc.communicate(timeout=budget)
        except subprocess.TimeoutExpired:
            proc.terminate()  # SIGTERM, never SIGKILL: DeepSpeed may hold a build lock
            try:
                log, _ = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                log, _ = proc.communicate()
            return {"status": "timeout", "seconds": time.perf_counter() - start,
                    "error": f"stopped after its {budget:.0f} s budget", "log_tail": (log or "")[-1500:]}
        seconds = time.perf_counter() - start
        if part.exists():
            result = json.loads(part.read_text())
            return {**result, "seconds": seconds}
        return {"status": "error", "seconds": seconds, "error": f"exit code {proc.returncode}",
                "log_tail": (log or "")[-3000:]}


def child(name: str, dry: bool, out: Path) -> None:
    """Inside the child: run the section and write its result (or its error) as JSON."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if dry:
        import torch

        torch.set_num_threads(1)
    try:
        result = {"status": "ok", "result": SECTIONS[name](shapes(dry), dry)}
    except Exception as exc:
        result = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:2000],
                  "traceback": traceback.format_exc()[-3000:]}
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")


def table(report: dict[str, Any]) -> str:
    """The figures a person reads first, one line each."""
    lines = [f"gpu_check on {report['device']} ({'dry run, tiny shapes' if report['dry_run'] else 'full shapes'})"]
    for name, part in report["sections"].items():
        if part.get("status") != "ok":
            lines.append(f"  {name:10s} {part.get('status')}: {part.get('error')}")
            continue
        r = part["result"]
        if name == "attention":
            ms = ", ".join(f"{k} {v:.1f} ms" for k, v in r["ms"].items())
            diffs = "; ".join(f"{k}: abs {v['max_abs']:.2e} rel {v['max_rel']:.2e}" for k, v in r["diff"].items())
            lines.append(f"  attention  {r['tokens']} tokens: {ms}; {diffs}" + (f"; xformers {r['xformers']}" if "xformers" in r else ""))
        elif name == "step":
            mfu = f"{100 * r['mfu']:.1f} % MFU of {r['peak_bf16_tflops']} TFLOP/s" if r.get("mfu") else "MFU n/a (no GPU peak)"
            mem = f", peak CUDA {r['peak_cuda_mb']:.0f} MiB" if r.get("peak_cuda_mb") else ""
            lines.append(f"  step       batch {r['batch']}: {r['step_ms']:.1f} ms, {r['images_per_s']:.1f} images/s, "
                         f"{r['achieved_tflops']:.2f} TFLOP/s, {mfu}{mem}")
        elif name == "sampling":
            lines.append(f"  sampling   {r['tokens']} tokens x {r['sequences']} sequences: KV cache "
                         f"{r['ratio_kv_cache']:.2f} x teacher-forced fwd+bwd ({r['sample_kv_cache_ms']:.0f} / "
                         f"{r['teacher_forced_fwd_bwd_ms']:.0f} ms), no cache ~{r['ratio_no_cache_extrapolated']:.0f} x "
                         f"(extrapolated), codes equal: {r['cached_equals_uncached_codes']}")
        elif name == "compile":
            cells = [f"{k} " + (f"{v['step_ms']:.1f} ms" if "step_ms" in v else v["error"][:80]) for k, v in r.items()]
            lines.append("  compile    " + ", ".join(cells))
        elif name == "fid":
            lines.append("  fid        batch " + str(r["batch"]) + ": " +
                         ", ".join(f"{k} {v:.0f}" for k, v in r.items() if k != "batch"))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (what the tests run)")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--only", nargs="*", choices=sorted(SECTIONS), help="run these sections only")
    parser.add_argument("--budget", action="append", default=[], metavar="SECTION=SECONDS",
                        help="change a section's time box")
    parser.add_argument("--section", choices=sorted(SECTIONS), help=argparse.SUPPRESS)  # the child
    parser.add_argument("--count-flops", action="store_true",
                        help="only print the FLOPs per image of the ImageNet-256 step's model work (CPU is fine)")
    args = parser.parse_args()
    if args.count_flops:
        print(json.dumps(floor_flops(), indent=2))
        return
    if args.section:
        child(args.section, args.dry_run, args.out)
        return
    budgets = dict(DRY_BUDGET_S if args.dry_run else BUDGET_S)
    for item in args.budget:
        name, _, seconds = item.partition("=")
        if name not in budgets or not seconds:
            parser.error(f"--budget {item!r}: expected SECTION=SECONDS with SECTION one of {', '.join(budgets)}")
        budgets[name] = float(seconds)
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    if not args.dry_run and device == "cpu":
        parser.error("no CUDA device: the full check needs a GPU (use --dry-run on CPU)")
    report: dict[str, Any] = {"device": device, "dry_run": args.dry_run, "torch": torch.__version__,
                              "budgets_s": budgets, "sections": {}}
    start = time.perf_counter()
    for name in args.only or list(SECTIONS):
        report["sections"][name] = run_child(name, args.dry_run, budgets[name])
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")  # what is done so far
    report["total_s"] = time.perf_counter() - start
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(table(report))
    print(f"total {report['total_s']:.0f} s; JSON in {args.out}")


if __name__ == "__main__":
    main()
