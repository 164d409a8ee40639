"""The automatic surface level of a density grid (meshing.surface_threshold)."""

import numpy as np
import pytest

from meshing import surface_threshold

LO, HI = -1.5, 1.5


def ball_field(n, radius=0.6, sigma_in=30.0, ramp=0.03, centre=(0.0, 0.0, 0.25), seed=0):
    """A NeRF-like density: ~0 outside a ball, sigma_in inside, a logistic ramp across the surface,
    and empty space at the tiny, decades-spread densities a softplus gives (1e-12 to 1e-2)."""
    x = np.linspace(LO, HI, n, dtype=np.float32)
    d = np.sqrt(
        (x[:, None, None] - centre[0]) ** 2 + (x[None, :, None] - centre[1]) ** 2 + (x[None, None, :] - centre[2]) ** 2
    )
    grid = sigma_in * 0.5 * (1 - np.tanh((d - radius) / (2 * ramp)))  # sigma_in / (1 + exp((d - r) / ramp))
    rng = np.random.default_rng(seed)
    grid += 10 ** rng.uniform(-12, -2, grid.shape)
    return grid.astype(np.float32), (HI - LO) / (n - 1)


def crossing_radius(level, radius=0.6, sigma_in=30.0, ramp=0.03):
    """Where the ball field's ramp crosses `level`."""
    return radius + ramp * np.log(sigma_in / level - 1)


def test_a_ball_is_cut_half_way_up_its_ramp():
    grid, voxel = ball_field(64)
    level, how = surface_threshold(grid, voxel)
    assert 0.25 * 30 < level < 0.75 * 30
    assert abs(crossing_radius(level) - 0.6) < voxel  # the surface within a voxel of the true one
    assert how == 'chosen from the density field: the valley of the density histogram between empty space and matter'


def test_the_level_scales_with_the_density():
    grid, voxel = ball_field(48)
    level, _ = surface_threshold(grid, voxel)
    for k in (0.1, 10.0):
        assert surface_threshold(grid * k, voxel)[0] == pytest.approx(k * level, rel=0.05)


def test_a_larger_box_and_a_small_object_do_not_move_the_surface():
    """The level does not depend on how much of the box is empty, down to an object 0.03% of the box."""
    grid, voxel = ball_field(64)
    level, _ = surface_threshold(grid, voxel)
    big = np.pad(grid, 32, constant_values=1e-6)  # a box twice as wide: 1/8 the occupancy
    assert abs(crossing_radius(surface_threshold(big, voxel)[0]) - crossing_radius(level)) < voxel / 4
    fine, _ = ball_field(128)  # the same box at twice the resolution
    assert abs(crossing_radius(surface_threshold(fine, voxel / 2)[0]) - 0.6) < voxel / 2
    small, voxel = ball_field(128, radius=0.12, ramp=0.01)  # 0.03% of the box
    level, _ = surface_threshold(small, voxel)
    assert abs(crossing_radius(level, radius=0.12, ramp=0.01) - 0.12) < voxel


def test_floaters_haze_and_spikes_barely_move_the_level():
    grid, voxel = ball_field(64)
    level, _ = surface_threshold(grid, voxel)
    rng = np.random.default_rng(1)
    x = np.arange(64)
    empty = grid < 1e-2
    floaters = grid.copy()  # 40 dense blobs of radius 3 voxels in empty space
    for _ in range(40):
        c = rng.integers(4, 60, 3)
        blob = ((x[:, None, None] - c[0]) ** 2 + (x[None, :, None] - c[1]) ** 2 + (x[None, None, :] - c[2]) ** 2) <= 9
        floaters[blob & empty] = rng.uniform(0.5, 2) * 30
    haze = grid.copy()  # 2% of empty space semi-transparent
    idx = rng.choice(np.flatnonzero(empty), int(0.02 * empty.sum()), replace=False)
    haze.ravel()[idx] = rng.uniform(0.05, 0.5, idx.size) * 30
    spikes = grid.copy()  # 50 voxels at 1000x the interior density
    spikes.ravel()[rng.choice(grid.size, 50, replace=False)] = 3e4
    for g in (floaters, haze, spikes):
        assert abs(crossing_radius(surface_threshold(g, voxel)[0]) - crossing_radius(level)) < voxel / 2


@pytest.mark.parametrize('seed', range(20))
def test_the_level_is_always_strictly_inside_the_range(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 12))
    kind = seed % 5
    if kind == 0:  # random densities over many decades
        grid = 10 ** rng.uniform(-40, 3, (n, n, n))
    elif kind == 1:  # two values
        grid = np.where(rng.random((n, n, n)) < 0.5, 0.0, rng.uniform(1e-3, 1e3))
    elif kind == 2:  # one voxel differs
        grid = np.zeros((n, n, n))
        grid[tuple(rng.integers(0, n, 3))] = rng.uniform(1e-30, 1e30)
    elif kind == 3:  # two float32 values 2 ulps apart: the level is the one between them
        grid = np.full((n, n, n), np.float32(rng.uniform(0, 100)))
        grid.ravel()[0] = np.nextafter(np.nextafter(grid.ravel()[1], np.float32(np.inf)), np.float32(np.inf))
    else:  # negative and positive (a signed field)
        grid = rng.normal(size=(n, n, n))
    grid = grid.astype(np.float32)
    level, _ = surface_threshold(grid, float(rng.uniform(1e-3, 1)))
    assert isinstance(level, float) and grid.min() < level < grid.max()


def test_adjacent_float32_values():
    """No float32 lies between them: the level is their float64 midpoint (inside, compared as float64)."""
    grid = np.full((3, 3, 3), np.float32(1.0))
    grid[0, 0, 0] = np.nextafter(np.float32(1.0), np.float32(2.0))
    level, _ = surface_threshold(grid, 0.1)
    assert float(grid.min()) < level < float(grid.max())


def test_a_lone_voxel_missed_by_the_subsample_is_still_found():
    grid = np.zeros((160, 160, 160), np.float32)  # 4.1M voxels: subsampled
    grid[3, 4, 5] = 7.0
    level, _ = surface_threshold(grid, 0.02)
    assert 0 < level < 7


def test_constant_and_non_finite_grids():
    level, how = surface_threshold(np.full((4, 4, 4), 2.5, np.float32), 0.1)
    assert level == 2.5 and 'no surface' in how
    level, how = surface_threshold(np.full((4, 4, 4), np.nan, np.float32), 0.1)
    assert level == 0 and 'no surface' in how
    grid, voxel = ball_field(32)
    clean, _ = surface_threshold(grid, voxel)
    grid[0, 0, :3] = [np.nan, np.inf, -np.inf]  # ignored
    level, _ = surface_threshold(grid, voxel)
    assert np.isfinite(level) and level == pytest.approx(clean, rel=0.01)


def test_a_256_grid_is_deterministic():
    grid = np.zeros((256, 256, 256), np.float32)
    grid[64:192, 64:192, 64:192] = 20.0
    grid[:, :, :] += np.linspace(0, 1, 256, dtype=np.float32)  # not two-valued
    first = surface_threshold(grid, 3 / 255)
    assert first == surface_threshold(grid, 3 / 255)
    assert 1 < first[0] < 20


def test_an_unconstrained_inside_below_the_skin_gets_no_inner_surface():
    """Only the first opaque layer is seen in training: the inside may be far less dense than the skin
    (the demo's pedestal). The level stays below the inside, so marching cubes makes no inner sheet."""
    grid, voxel = ball_field(64)  # skin of 30 ...
    x = np.linspace(LO, HI, 64, dtype=np.float32)
    d = np.sqrt(x[:, None, None] ** 2 + x[None, :, None] ** 2 + (x[None, None, :] - 0.25) ** 2)
    deep = 0.5 * (1 - np.tanh((d - 0.45) / 0.06))  # ... over an inside of 10 from 0.15 deep
    grid = grid * (1 - deep * (1 - 10 / 30))
    level, _ = surface_threshold(grid, voxel)
    assert level < 10 and abs(crossing_radius(level) - 0.6) < voxel


def test_densities_near_the_float32_limits():
    grid = np.zeros((8, 8, 8), np.float32)
    grid[0, 0, 0], grid[1, 1, 1] = 3e38, -3e38
    level, _ = surface_threshold(grid, 0.1)
    assert np.isfinite(level) and grid.min() < level < grid.max()
