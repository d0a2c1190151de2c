"""Resampling of position parameters when a checkpoint meets a model with a different patch grid.

Two kinds of parameter depend on the grid:

- a relative-position bias table ``[(2Wh-1)(2Ww-1) + 3, heads]`` (REFERENCE §5.4): resampled with the official
  geometric scheme (§6.5 step 5): offsets are warped by a geometric progression so that near-centre offsets
  are stretched least, then an interpolating bicubic spline per head is evaluated on the integer offsets of
  the new window; the 3 CLS rows at the end are kept as they are;
- an absolute position embedding ``[1, 1 + H*W, D]``: the grid part is resized bicubically
  (``align_corners=False``), the CLS row is kept.

The official code fits the spline with ``scipy.interpolate.interp2d(kind='cubic')``, removed in SciPy 1.14.
On a rectangular grid that is FITPACK's interpolating (s = 0) bicubic spline, whose knots sit at the data
points except the second and the second-to-last: the not-a-knot cubic spline. It is built here from its
B-spline basis in numpy, as one small matrix per axis applied separably, so SciPy is not a dependency.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

from beit.errors import BeitError

NUM_CLS_ENTRIES = 3  # rows n-3 (CLS -> patch), n-2 (patch -> CLS), n-1 (CLS -> CLS) of a table


def table_side(num_rows: int) -> int:
    """Side 2W-1 of the square offset grid of a table with ``num_rows`` rows (27 for 732 rows)."""
    side = math.isqrt(num_rows - NUM_CLS_ENTRIES) if num_rows > NUM_CLS_ENTRIES else 0
    if side * side + NUM_CLS_ENTRIES != num_rows or side % 2 == 0:
        raise BeitError(
            f"a relative-position table with {num_rows} rows is not (2W-1)^2 + 3 for a square W x W "
            "patch grid; the checkpoint is damaged or not a BEiT checkpoint"
        )
    return side


def geometric_ratio(src_side: int, dst_side: int) -> float:
    """The official ratio q: bisection on [1.01, 1.5] until the bracket is at most 1e-6 wide, so that
    ``1 + q + ... + q**(src_side//2 - 1)`` (the outermost warped source offset) reaches ``dst_side // 2``.
    Returns the last midpoint, as the official loop does (1.090307 for sides 27 -> 47)."""
    half_src, half_dst = src_side // 2, dst_side // 2
    left, right, q = 1.01, 1.5, 1.01
    while right - left > 1e-6:
        q = (left + right) / 2.0
        reach = (1.0 - q**half_src) / (1.0 - q)  # geometric series 1 + q + ... + q^(half_src - 1)
        if reach > half_dst:
            right = q
        else:
            left = q
    return q


def warped_offsets(src_side: int, q: float) -> np.ndarray:
    """Source offsets after the geometric warp: [-d_k, ..., -d_1, 0, d_1, ..., d_k], with
    d_i = 1 + q + ... + q^(i-1)."""
    dis = np.cumsum(q ** np.arange(src_side // 2, dtype=np.float64))
    return np.concatenate([-dis[::-1], [0.0], dis])


def _bspline_design(knots: np.ndarray, degree: int, points: np.ndarray) -> np.ndarray:
    """Values of every B-spline of the knot vector at ``points``: a matrix [len(points), num_basis].

    Cox-de Boor recursion on the non-empty knot interval holding each point; the last interval is closed
    so that the right end of the domain is covered."""
    num_basis = len(knots) - degree - 1
    out = np.zeros((len(points), num_basis))
    for row, x in enumerate(points):
        mu = int(np.clip(np.searchsorted(knots, x, side="right") - 1, degree, num_basis - 1))
        values = np.zeros(degree + 1)  # B_{mu-degree} ... B_mu at x
        values[0] = 1.0
        left = np.zeros(degree + 1)
        right = np.zeros(degree + 1)
        for j in range(1, degree + 1):
            left[j] = x - knots[mu + 1 - j]
            right[j] = knots[mu + j] - x
            saved = 0.0
            for r in range(j):
                temp = values[r] / (right[r + 1] + left[j - r])
                values[r] = saved + right[r + 1] * temp
                saved = left[j - r] * temp
            values[j] = saved
        out[row, mu - degree : mu + 1] = values
    return out


def cubic_spline_matrix(x: np.ndarray, xq: np.ndarray) -> np.ndarray:
    """Matrix S [len(xq), len(x)] with S @ y = the not-a-knot interpolating cubic spline through (x, y) at xq.

    This is FITPACK's s = 0 cubic spline (knots at x[2:-2] plus 4-fold end knots). Query points outside
    [x[0], x[-1]] are clamped to the ends, as FITPACK's evaluator does. ``x`` must be strictly increasing
    with at least 4 points."""
    x = np.asarray(x, dtype=np.float64)
    if len(x) < 4 or np.any(np.diff(x) <= 0):
        raise ValueError("a cubic spline needs at least 4 strictly increasing points")
    knots = np.concatenate([np.full(4, x[0]), x[2:-2], np.full(4, x[-1])])
    collocation = _bspline_design(knots, 3, x)  # [m, m], banded and nonsingular (Schoenberg-Whitney)
    evaluation = _bspline_design(knots, 3, np.clip(np.asarray(xq, dtype=np.float64), x[0], x[-1]))
    return np.linalg.solve(collocation.T, evaluation.T).T  # evaluation @ inv(collocation)


@functools.lru_cache(maxsize=16)
def table_spline(src_side: int, dst_side: int) -> np.ndarray:
    """The spline matrix [dst_side, src_side] of the official warp: warped source offsets to the integer
    offsets -t..t of the new window (t = dst_side // 2). Cached, since every block's table shares it."""
    x = warped_offsets(src_side, geometric_ratio(src_side, dst_side))
    t = dst_side // 2
    return cubic_spline_matrix(x, np.arange(-t, t + 0.1, 1.0))


def resample_rel_pos_table(table: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Resample a relative-position bias table [n, heads] to ``num_rows`` rows with the official scheme.

    A table of the right length is returned untouched; the 3 CLS rows are carried over unchanged."""
    if table.shape[0] == num_rows:
        return table
    src_side, dst_side = table_side(table.shape[0]), table_side(num_rows)
    if src_side < 4:
        raise BeitError(
            f"cannot resample a relative-position table from a {(src_side + 1) // 2}x{(src_side + 1) // 2} "
            "patch grid; a grid of at least 3x3 is needed"
        )
    s = torch.from_numpy(table_spline(src_side, dst_side))  # [dst_side, src_side], for rows and columns
    grid, cls_rows = table[:-NUM_CLS_ENTRIES], table[-NUM_CLS_ENTRIES:]
    z = grid.detach().to("cpu", torch.float64).T.reshape(-1, src_side, src_side)  # [heads, src(y), src(x)]
    resized = s @ z @ s.T  # [heads, dst(y), dst(x)]: the tensor-product spline, one head at a time
    resized = resized.reshape(-1, dst_side * dst_side).T.to(table.dtype).to(table.device)
    return torch.cat([resized, cls_rows], dim=0)


def resample_abs_pos_embed(pos_embed: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Resize an absolute position embedding [1, 1 + g*g, D] to [1, num_tokens, D]: CLS row kept,
    the g x g grid resized bicubically (align_corners=False), as the official fine-tuning loader does."""
    if pos_embed.shape[1] == num_tokens:
        return pos_embed
    src, dst = math.isqrt(pos_embed.shape[1] - 1), math.isqrt(num_tokens - 1)
    if src * src + 1 != pos_embed.shape[1] or dst * dst + 1 != num_tokens:
        raise BeitError(
            f"cannot resize pos_embed from {pos_embed.shape[1]} to {num_tokens} tokens: "
            "both must be 1 + a square number of patches"
        )
    cls_row, grid = pos_embed[:, :1], pos_embed[:, 1:]
    dim = grid.shape[-1]
    grid = grid.reshape(1, src, src, dim).permute(0, 3, 1, 2).float()  # [1, D, src, src]
    grid = F.interpolate(grid, size=(dst, dst), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, dst * dst, dim).to(pos_embed.dtype)
    return torch.cat([cls_row, grid], dim=1)
