"""Blockwise masking against the official algorithm's published statistics and anchor (REFERENCE.md §2)."""

import math
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from beit import BeitError, MaskGenerator, RandomMaskGenerator
from beit.train.masking import mask_generator


def test_seeded_mask_reproduces_the_official_anchor():
    # After random.seed(42) the official generator's first mask is a 4x13 band (rows 4-7, cols 0-12)
    # plus rows 8-9 x cols 0-4 plus rows 10-13 x cols 1-3: 74 cells.
    expected = np.zeros((14, 14), dtype=bool)
    expected[4:8, 0:13] = True
    expected[8:10, 0:5] = True
    expected[10:14, 1:4] = True
    mask = MaskGenerator((14, 14), 75, min_block=16, seed=42)()
    assert mask.dtype == bool and mask.shape == (14, 14)
    np.testing.assert_array_equal(mask, expected)


def official_masks(rng, height, width, num_masked, min_block, max_block, min_aspect):
    """The official `MaskingGenerator.__call__`, transcribed literally (numpy boxes, `random` helpers)."""
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    mask = np.zeros((height, width), dtype=int)
    count = 0
    while count < num_masked:
        budget = min(num_masked - count, max_block)
        delta = 0
        for _ in range(10):
            target_area = rng.uniform(min_block, budget)
            aspect_ratio = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < width and h < height:
                top = rng.randint(0, height - h)
                left = rng.randint(0, width - w)
                num_masked_box = mask[top : top + h, left : left + w].sum()
                if 0 < h * w - num_masked_box <= budget:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
            if delta > 0:
                break
        if delta == 0:
            break
        count += delta
    return mask


@pytest.mark.parametrize(
    "grid, num_masked, min_block, max_block, min_aspect",
    [
        ((14, 14), 75, 16, None, 0.3),
        ((14, 14), 75, 4, None, 0.3),
        ((8, 8), 24, 5, None, 0.3),
        ((7, 20), 50, 3, 12, 0.5),
        ((24, 24), 300, 16, 100, 0.2),
    ],
)
def test_masks_equal_the_literal_official_algorithm(grid, num_masked, min_block, max_block, min_aspect):
    gen = MaskGenerator(grid, num_masked, min_block=min_block, max_block=max_block, min_aspect=min_aspect)
    for seed in range(400):
        rng, official_rng = random.Random(seed), random.Random(seed)
        expected = official_masks(
            official_rng, *grid, num_masked, min_block, max_block or num_masked, min_aspect
        )
        np.testing.assert_array_equal(gen(rng=rng), expected.astype(bool), err_msg=f"seed {seed}")
        assert rng.random() == official_rng.random()  # the same number of draws, too


def test_official_statistics_over_20k_masks():
    gen = MaskGenerator((14, 14), 75, min_block=16, seed=0)
    masks = np.stack([gen() for _ in range(20_000)])
    counts = masks.sum(axis=(1, 2))
    assert counts.max() <= 75
    assert counts.min() > 0
    assert abs(counts.mean() - 74.47) <= 0.05
    assert abs((counts == 75).mean() - 0.666) <= 0.015
    assert abs((counts >= 70).mean() - 0.996) <= 0.004
    marginal = masks.mean(axis=0)
    corners = marginal[[0, 0, 13, 13], [0, 13, 0, 13]]
    assert np.all(np.abs(corners - 0.04) <= 0.015)
    assert abs(marginal[7, 7] - 0.72) <= 0.02
    assert abs(marginal[0, 7] - 0.19) <= 0.02
    centre_row = [0.19, 0.35, 0.48, 0.59, 0.65, 0.70, 0.72, 0.72, 0.70, 0.65, 0.58, 0.48, 0.35, 0.19]
    np.testing.assert_allclose(marginal[7], centre_row, atol=0.02)


def test_class_default_min_block_differs_from_the_pretraining_setting():
    # The official class default (4) gives a mean of 74.93: min_block must be passed, not assumed.
    gen = MaskGenerator((14, 14), 75, min_block=4, seed=1)
    counts = np.array([gen().sum() for _ in range(5_000)])
    assert abs(counts.mean() - 74.93) <= 0.05


def test_per_sample_rng_is_deterministic_and_leaves_own_stream_alone():
    gen = MaskGenerator(seed=3)
    first = gen(rng=random.Random(99))
    own = MaskGenerator(seed=3)()
    np.testing.assert_array_equal(gen(rng=random.Random(99)), first)
    np.testing.assert_array_equal(gen(), own)


@settings(max_examples=60, deadline=None)
@given(
    height=st.integers(4, 24),
    width=st.integers(4, 24),
    fraction=st.floats(0.05, 0.6),
    min_block=st.integers(1, 16),
    min_aspect=st.floats(0.2, 1.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_block_masks_never_exceed_the_target(height, width, fraction, min_block, min_aspect, seed):
    num_masked = max(1, int(fraction * height * width))
    gen = MaskGenerator((height, width), num_masked, min_block=min_block, min_aspect=min_aspect, seed=seed)
    for _ in range(5):
        mask = gen()
        assert mask.shape == (height, width) and mask.dtype == bool
        assert 0 <= mask.sum() <= num_masked
    np.testing.assert_array_equal(
        MaskGenerator((height, width), num_masked, min_block=min_block, min_aspect=min_aspect, seed=seed)(),
        MaskGenerator((height, width), num_masked, min_block=min_block, min_aspect=min_aspect, seed=seed)(),
    )


@settings(max_examples=40, deadline=None)
@given(side=st.integers(8, 20), seed=st.integers(0, 2**32 - 1))
def test_scaled_official_setting_always_masks_something(side, seed):
    n = side * side
    gen = MaskGenerator((side, side), round(75 / 196 * n), min_block=max(4, round(16 / 196 * n)), seed=seed)
    assert all(0 < gen().sum() <= round(75 / 196 * n) for _ in range(5))


@settings(max_examples=40, deadline=None)
@given(height=st.integers(1, 20), width=st.integers(1, 20), data=st.data())
def test_random_masks_have_exactly_the_target_count(height, width, data):
    num_masked = data.draw(st.integers(1, height * width))
    mask = RandomMaskGenerator((height, width), num_masked, seed=data.draw(st.integers(0, 1000)))()
    assert mask.shape == (height, width) and mask.sum() == num_masked


def test_random_masking_is_uniform():
    gen = RandomMaskGenerator((14, 14), 75, seed=0)
    marginal = np.mean([gen() for _ in range(4_000)], axis=0)
    np.testing.assert_allclose(marginal, 75 / 196, atol=0.04)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(grid=(0, 14)),
        dict(num_masked=0),
        dict(num_masked=197),
        dict(min_block=0),
        dict(min_aspect=0.0),
        dict(min_aspect=2.0),
    ],
)
def test_bad_arguments_are_user_errors(kwargs):
    with pytest.raises(BeitError):
        MaskGenerator(**kwargs)


def test_mask_generator_passes_its_options_on():
    gen = mask_generator(8, 20, 4, max_block=10, min_aspect=0.5)
    assert (gen.num_masked, gen.min_block, gen.max_block) == (20, 4, 10)
    assert gen.log_aspect == pytest.approx((math.log(0.5), math.log(2)))
