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
