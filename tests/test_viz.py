"""Image grids are written at the images' own resolution, pixel for pixel, without a plotting library."""

import numpy as np
import torch
from PIL import Image

from onestep.viz import MIN_TILE, save_image_grid, save_samples_picture, to_uint8


def test_grid_holds_each_image_at_native_resolution(tmp_path):
    x = torch.rand(3, 3, 96, 80) * 2 - 1
    path = save_image_grid(x, tmp_path / "g.png", title="dmd2 step 7", nrow=2)
    with Image.open(path) as im:
        assert im.size == (1 + 2 * (80 + 1), 1 + 2 * (96 + 1))  # 2 a row, 1 px padding
        assert im.info["Title"] == "dmd2 step 7"
        grid = np.asarray(im)
    np.testing.assert_array_equal(grid[1 : 1 + 96, 1 : 1 + 80], to_uint8(x)[0])  # image 0, top left
    np.testing.assert_array_equal(grid[98 : 98 + 96, 1 : 1 + 80], to_uint8(x)[2])  # image 2, second row


def test_small_images_are_enlarged_by_a_whole_factor_and_scatter_stays_a_plot(tmp_path):
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    with Image.open(save_samples_picture(x, tmp_path / "d.png", nrow=10)) as im:
        grid = np.asarray(im)
    f = MIN_TILE // 16
    assert grid.shape == (1 + 16 * f + 1, 1 + 2 * (16 * f + 1))
    np.testing.assert_array_equal(grid[1 : 1 + 16 * f : f, 1 : 1 + 16 * f : f], to_uint8(x)[0, ..., 0])  # nearest
    pts = save_samples_picture(torch.randn(100, 2), tmp_path / "s.png")
    with Image.open(pts) as im:
        assert im.size == (500, 500)  # matplotlib's 5 x 5 in at 100 dpi


def test_a_comparison_s_title_sits_above_the_panel_headings(tmp_path, monkeypatch):
    """tight_layout alone ignores the suptitle and lays the panel headings over it."""
    import matplotlib.pyplot as plt

    from onestep import viz

    figs = []
    monkeypatch.setattr(viz, "_plt", lambda: _Keeping(plt, figs))
    x = torch.zeros(80, 1, 16, 16)
    panels = [("teacher: 50 DDIM steps", x), ("before: FID 3.82, grain 7.83e-3", x), ("after", x)]
    viz.save_comparison(panels, tmp_path / "c.png", [str(c) for c in range(10)], 8, title="same classes, same seeds")
    fig = figs[0]
    renderer = fig.canvas.get_renderer()
    title = fig._suptitle.get_window_extent(renderer)
    headings = [ax.title.get_window_extent(renderer) for ax in fig.axes]
    assert all(h.y1 <= title.y0 for h in headings), (title, headings)
    assert Image.open(tmp_path / "c.png").size[0] > 0


class _Keeping:
    """matplotlib.pyplot, keeping each figure it makes open for inspection."""

    def __init__(self, plt, figs):
        self.plt, self.figs = plt, figs

    def subplots(self, *args, **kwargs):
        fig, axes = self.plt.subplots(*args, **kwargs)
        self.figs.append(fig)
        return fig, axes

    def close(self, fig):
        pass

    def __getattr__(self, name):
        return getattr(self.plt, name)
