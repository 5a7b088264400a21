"""restok.io.save_png: the one atomic image writer of the stages (tensor grids and matplotlib figures)."""

from __future__ import annotations

import torch
from matplotlib.figure import Figure
from PIL import Image

from restok.io import save_png


def test_save_png_writes_a_tensor_grid_and_a_figure_leaving_no_temporary(tmp_path):
    images = torch.rand(6, 3, 8, 8)
    save_png(images, tmp_path / "grid.png", nrow=3, padding=1)
    assert Image.open(tmp_path / "grid.png").size == (3 * 8 + 4, 2 * 8 + 3)  # padding 1 around every tile
    save_png(images[0], tmp_path / "one.png")  # a single (3, H, W) image: no padding
    assert Image.open(tmp_path / "one.png").size == (8, 8)
    fig = Figure(figsize=(2, 1), dpi=50)
    fig.subplots().plot([0, 1], [1, 0])
    save_png(fig, tmp_path / "fig.png")
    save_png(fig, tmp_path / "fig100.png", dpi=100)
    assert Image.open(tmp_path / "fig.png").size == (100, 50)
    assert Image.open(tmp_path / "fig100.png").size == (200, 100)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.png", "fig100.png", "grid.png", "one.png"]
