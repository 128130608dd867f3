"""Time the model work of one DAPS step without a dataset or an engine: drawing K codes per image,
the teacher-forced log q (forward + backward) and the decoder on all K*B samples (forward +
backward): the floor that ``ngkit bench`` compares a training step with, timed by the same code
(:func:`ngkit.engine.bench.floor_parts`), for model sizes no CPU can train (ImageNet-256).

Run (numbers in docs/models.md):
    .venv/bin/python benchmarks/model_step.py --config quickstart --batch 32 --samples 8 --threads 1
    .venv/bin/python benchmarks/model_step.py --config imagenet256 --batch 1 --samples 2 --threads 1
"""

from __future__ import annotations

import argparse

import torch

from ngkit.components import ImageSpec, LatentSpec
from ngkit.engine.bench import floor_parts
from ngkit.engine.step import PhaseTimer
from ngkit.nn import attention_backend
from ngkit_plugins.conv_decoder import ConvDecoder
from ngkit_plugins.transformer_encoder import TransformerEncoder

CONFIGS = {
    "quickstart": (ImageSpec(3, 32, 32), LatentSpec(grid=(4, 4), codes=256)),
    "imagenet256": (ImageSpec(3, 256, 256), LatentSpec(grid=(32, 32), codes=1024)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="quickstart")
    parser.add_argument("--batch", type=int, default=32, help="images B")
    parser.add_argument("--samples", type=int, default=8, help="codes K drawn per image")
    parser.add_argument("--factorised", action="store_true", help="DAPS-NA encoder")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="cpu: this process's CPU time")
    args = parser.parse_args()
    if args.threads:
        # On a busy machine one thread can beat several: the sampler's per-token ops are tiny,
        # and every op waits for all threads to be scheduled.
        torch.set_num_threads(args.threads)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    image, latent = CONFIGS[args.config]
    torch.manual_seed(0)
    enc = TransformerEncoder(image=image, latent=latent, factorised=args.factorised).to(device)
    dec = ConvDecoder(image=image, latent=latent).to(device)
    x = torch.rand(args.batch, *image.shape, device=device)
    k = args.samples
    print(f"config {args.config}: image {image.shape}, grid {latent.grid} "
          f"(L={latent.tokens}), V={latent.codes}")
    print(f"device {device}, torch threads {torch.get_num_threads()}, attention {attention_backend()}")
    print(f"B={args.batch} K={k} encoder {'factorised' if args.factorised else 'autoregressive'}")
    print(f"parameters: encoder {sum(p.numel() for p in enc.parameters()):,}, "
          f"decoder {sum(p.numel() for p in dec.parameters()):,}")
    times = floor_parts(enc, dec, k, x, args.repeats, PhaseTimer(device, args.clock))
    total = sum(times.values())
    for name, seconds in times.items():
        print(f"{name:>30}: {seconds * 1e3:9.1f} ms  ({seconds / total:5.1%})")


if __name__ == "__main__":
    main()
