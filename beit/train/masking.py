"""Blockwise masking, exactly as the official BEiT `MaskingGenerator` (REFERENCE.md §2), and plain
random masking for the paper's ablation.

Both generators are callables returning a boolean numpy array of shape `grid` (row = patch row), which
the trainer flattens row-major to match the patch-embedding order. They draw from a Python
`random.Random`, in the official call order and with Python's banker's rounding, so a generator seeded
with `s` reproduces the official masks after `random.seed(s)` bit for bit.

A mask is drawn for every sample in every loader worker, so the blockwise generator keeps its mask as a
Python int (one bit per cell: a box's new cells are one AND and a popcount) and draws `uniform` and
`randint`'s values straight from `random()` and `getrandbits`, with the same draws: about 2.6x faster
than numpy boxes and the `random` helpers. The tests compare it with a literal copy of the official
algorithm; `mask_us` in bench/pretrain.py tracks its cost.
"""

from __future__ import annotations

import math
import random

import numpy as np

from beit.errors import BeitError

ATTEMPTS_PER_BLOCK = 10


def _grid(grid: int | tuple[int, int]) -> tuple[int, int]:
    height, width = (grid, grid) if isinstance(grid, int) else tuple(grid)
    if height < 1 or width < 1:
        raise BeitError(f"mask grid must be positive, got {grid!r}")
    return int(height), int(width)


def _check_count(num_masked: int, height: int, width: int) -> None:
    if not 0 < num_masked <= height * width:
        raise BeitError(
            f"num_masked must be in 1..{height * width} for a {height}x{width} grid, got {num_masked}"
        )


class MaskGenerator:
    """Official BEiT blockwise masking: blocks of at least `min_block` patches with a log-uniform aspect
    ratio in [min_aspect, 1/min_aspect] are added until `num_masked` patches are masked or a block
    cannot be placed in 10 tries. The count never exceeds `num_masked`; about 1 mask in 3 ends below it.
    """

    def __init__(
        self,
        grid: int | tuple[int, int] = (14, 14),
        num_masked: int = 75,
        *,
        min_block: int = 16,
        max_block: int | None = None,
        min_aspect: float = 0.3,
        seed: int | None = None,
    ) -> None:
        self.height, self.width = _grid(grid)
        _check_count(num_masked, self.height, self.width)
        if min_block < 1:
            raise BeitError(f"min_block must be at least 1, got {min_block}")
        if not 0 < min_aspect <= 1:
            raise BeitError(f"min_aspect must be in (0, 1], got {min_aspect}")
        self.num_masked = num_masked
        self.min_block = min_block
        self.max_block = num_masked if max_block is None else max_block
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
        self.rng = random.Random(seed)
        self._boxes: dict[tuple[int, int], int] = {}

    def __repr__(self) -> str:
        return (
            f"MaskGenerator({self.height}, {self.width} -> [{self.min_block} ~ {self.max_block}], "
            f"max = {self.num_masked}, {self.log_aspect[0]:.3f} ~ {self.log_aspect[1]:.3f})"
        )

    def _box(self, h: int, w: int) -> int:
        """The bits of an h×w box at the top-left corner of the grid; `<< top·W + left` moves it."""
        box = self._boxes.get((h, w))
        if box is None:
            row = (1 << w) - 1
            box = self._boxes[h, w] = sum(row << (r * self.width) for r in range(h))
        return box

    def _place_block(self, mask: int, budget: int, rng: random.Random) -> tuple[int, int]:
        """Try up to 10 random boxes; mask the first whose *new* cells fit the budget.
        Returns (mask, cells added); 0 added means no box fitted."""
        for _ in range(ATTEMPTS_PER_BLOCK):
            # rng.uniform(a, b) is a + (b - a)·random(): the same numbers, without its call overhead.
            area = self.min_block + (budget - self.min_block) * rng.random()
            aspect = math.exp(self.log_aspect[0] + (self.log_aspect[1] - self.log_aspect[0]) * rng.random())
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if w < self.width and h < self.height:
                top = _randint(rng, self.height - h)
                left = _randint(rng, self.width - w)
                box = self._box(h, w) << (top * self.width + left)
                new = h * w - (mask & box).bit_count()
                if 0 < new <= budget:
                    return mask | box, new
        return mask, 0

    def __call__(self, rng: random.Random | None = None) -> np.ndarray:
        """One mask, bool [H, W]. Draws from `rng` if given (e.g. seeded per sample), else the own stream."""
        rng = self.rng if rng is None else rng
        mask = count = 0  # the mask is a Python int: bit r·W + c is cell (r, c)
        while count < self.num_masked:
            mask, added = self._place_block(mask, min(self.num_masked - count, self.max_block), rng)
            if added == 0:
                break
            count += added
        cells = self.height * self.width
        packed = np.frombuffer(mask.to_bytes((cells + 7) // 8, "little"), dtype=np.uint8)
        return (
            np.unpackbits(packed, count=cells, bitorder="little").view(bool).reshape(self.height, self.width)
        )


def _randint(rng: random.Random, high: int) -> int:
    """`rng.randint(0, high)` drawn as CPython draws it (rejection sampling on getrandbits), at a third
    of its cost. tests/test_masking.py compares masks drawn with it against ones drawn with `randint`."""
    n = high + 1
    bits = n.bit_length()
    value = rng.getrandbits(bits)
    while value >= n:
        value = rng.getrandbits(bits)
    return value


class RandomMaskGenerator:
    """Masks exactly `num_masked` patches chosen uniformly at random (the paper's random-masking ablation)."""

    def __init__(
        self, grid: int | tuple[int, int] = (14, 14), num_masked: int = 75, *, seed: int | None = None
    ) -> None:
        self.height, self.width = _grid(grid)
        _check_count(num_masked, self.height, self.width)
        self.num_masked = num_masked
        self.rng = random.Random(seed)

    def __repr__(self) -> str:
        return f"RandomMaskGenerator({self.height}, {self.width} -> {self.num_masked})"

    def __call__(self, rng: random.Random | None = None) -> np.ndarray:
        """One mask, bool [H, W]."""
        rng = self.rng if rng is None else rng
        cells = rng.sample(range(self.height * self.width), self.num_masked)
        mask = np.zeros(self.height * self.width, dtype=bool)
        mask[cells] = True
        return mask.reshape(self.height, self.width)


def scaled_mask_size(num_patches: int) -> tuple[int, int]:
    """The official 75 masked patches with blocks of at least 16, out of 196, scaled to another grid:
    (round(75/196·N), max(4, round(16/196·N))); for 196 patches exactly (75, 16), for 8×8 (24, 5)."""
    return round(75 / 196 * num_patches), max(4, round(16 / 196 * num_patches))


def mask_generator(
    grid: int,
    num_masked: int | None = None,
    min_block: int | None = None,
    *,
    max_block: int | None = None,
    min_aspect: float = 0.3,
    random_masking: bool = False,
) -> MaskGenerator | RandomMaskGenerator:
    """The blockwise generator for a `grid`×`grid` patch grid; unset sizes follow `scaled_mask_size`.
    `random_masking` gives the paper's uniform-random ablation instead."""
    default_count, default_block = scaled_mask_size(grid * grid)
    num_masked = default_count if num_masked is None else num_masked
    if random_masking:
        return RandomMaskGenerator(grid, num_masked)
    min_block = default_block if min_block is None else min_block
    if min_block > num_masked:
        raise BeitError(f"min_block ({min_block}) is above num_masked ({num_masked}): no block would fit")
    if max_block is not None and max_block < min_block:
        raise BeitError(f"max_block ({max_block}) is below min_block ({min_block})")
    return MaskGenerator(grid, num_masked, min_block=min_block, max_block=max_block, min_aspect=min_aspect)
