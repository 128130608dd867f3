"""Command ``ngkit shapes-preview OUT.png``: a grid of training shapes. Its own module and entry
point, importing nothing heavy at the top, so ``ngkit --help`` stays fast."""

from __future__ import annotations

from pathlib import Path

import typer

from ngkit import hookimpl

NGKIT_PLUGIN_API = 3  # the ngkit plugin API this module was written for


@hookimpl
def register_commands(cli: typer.Typer) -> None:
    @cli.command("shapes-preview")
    def shapes_preview(
        out: Path = typer.Argument(..., help="PNG file to write."),
        count: int = typer.Option(16, help="Number of shapes (a square grid)."),
        size: int = typer.Option(16, help="Side of each shape in pixels."),
    ) -> None:
        """Write a grid of random images from the shapes dataset."""
        import torch
        from PIL import Image

        from ngkit_shapes.dataset import draw

        side = int(count**0.5)
        gen = torch.Generator().manual_seed(0)
        tiles = torch.stack([draw(gen, size)[0] for _ in range(side * side)]).view(side, side, size, size)
        grid = tiles.permute(0, 2, 1, 3).reshape(side * size, side * size)
        Image.fromarray((grid * 255).byte().numpy()).save(out)
        print(f"wrote {side * side} shapes to {out}")
