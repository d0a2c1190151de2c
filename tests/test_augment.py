"""The two-view augmentation equals the official torchvision pipeline and is reproducible per sample."""

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F
from PIL import Image
from skimage import data as skdata
from torchvision.transforms import InterpolationMode

from beit.tokenize.augment import TwoViewAugment, crop_box, view_generator, view_seed


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.fromarray(skdata.coffee()).resize((120, 80), Image.BICUBIC)


def official_views(image: Image.Image, seed: int, size: int, tok_size: int):
    """REFERENCE.md §3.1 with torchvision's own transforms on the global RNG: ColorJitter(0.4, 0.4, 0.4),
    RandomHorizontalFlip, one RandomResizedCrop box -> bicubic patch view and Lanczos tokenizer view."""
    torch.manual_seed(seed)
    x = T.ColorJitter(0.4, 0.4, 0.4)(image)
    x = T.RandomHorizontalFlip(0.5)(x)
    i, j, h, w = T.RandomResizedCrop.get_params(x, [0.08, 1.0], [3 / 4, 4 / 3])
    patch = F.resized_crop(x, i, j, h, w, [size, size], InterpolationMode.BICUBIC)
    tok = F.resized_crop(x, i, j, h, w, [tok_size, tok_size], InterpolationMode.LANCZOS)
    return patch, tok, [i, j, h, w]


def test_views_equal_torchvision_pipeline_pixel_for_pixel(photo):
    aug = TwoViewAugment(image_size=48, tokenizer_size=24)
    flips = 0
    for item in range(40):
        seed = view_seed(7, item, item % 3)
        ours = aug.apply(photo, torch.Generator().manual_seed(seed))
        patch, tok, box = official_views(photo, seed, 48, 24)
        assert np.array_equal(np.asarray(ours.patch), np.asarray(patch)), item
        assert np.array_equal(np.asarray(ours.tokenizer), np.asarray(tok)), item
        assert ours.params["crop"] == box
        flips += ours.params["flip"]
    assert 5 < flips < 35  # both branches of the flip were exercised


@pytest.mark.parametrize("size", [(120, 80), (400, 20), (20, 400), (1, 1), (33, 33)])
def test_crop_box_equals_torchvision_get_params(size):
    """Including the fallback centre crop of extreme aspect ratios, where 10 tries all fail."""
    image = Image.new("RGB", size)
    for seed in range(30):
        torch.manual_seed(seed)
        expected = T.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3])
        assert crop_box(*size, torch.Generator().manual_seed(seed)) == expected


def test_views_depend_only_on_seed_item_view(photo):
    aug = TwoViewAugment(image_size=32, tokenizer_size=16)
    torch.manual_seed(123)
    a = aug(photo, seed=0, item=5, view=1)
    state = torch.get_rng_state()
    torch.manual_seed(999)  # the global RNG neither influences the result nor is consumed
    b = aug(photo, seed=0, item=5, view=1)
    torch.manual_seed(123)
    assert torch.equal(state, torch.get_rng_state())
    assert a.params == b.params and np.array_equal(np.asarray(a.patch), np.asarray(b.patch))
    others = [aug(photo, seed=s, item=i, view=v).params for s, i, v in [(1, 5, 1), (0, 6, 1), (0, 5, 0)]]
    assert all(p != a.params for p in others)
    assert len({view_seed(0, i, v) for i in range(100) for v in range(4)}) == 400


def test_parameter_ranges_and_recorded_jitter(photo):
    aug = TwoViewAugment(image_size=32, tokenizer_size=16)
    fractions, ratios = [], []
    for item in range(300):
        p = aug(photo, 0, item, 0).params
        top, left, h, w = p["crop"]
        assert 0 <= top <= photo.height - h and 0 <= left <= photo.width - w
        fractions.append(h * w / (photo.width * photo.height))
        ratios.append(w / h)
        assert sorted(p["jitter"]["order"]) == ["brightness", "contrast", "saturation"]
        assert all(0.6 <= p["jitter"][k] <= 1.4 for k in ("brightness", "contrast", "saturation"))
    # area ~ U(0.08, 1) (mean 0.54), redrawn when the box does not fit: at 3:2 with ratio <= 4/3 at most
    # 8/9 of the image fits, and large boxes fit less often, so the mean drops
    assert 0.079 < min(fractions) < 0.15 and 0.8 < max(fractions) <= 8 / 9 and 0.3 < np.mean(fractions) < 0.5
    assert 0.7 < min(ratios) and max(ratios) < 1.45


def test_both_views_show_the_same_region(photo):
    """The tokenizer view is the same crop as the patch view: downsizing the patch view reproduces it
    far better than the tokenizer view of another item does."""
    aug = TwoViewAugment(image_size=64, tokenizer_size=16)
    for item in range(10):
        v = aug(photo, 0, item, 0)
        other = aug(photo, 0, item + 100, 0)
        small = np.asarray(v.patch.resize((16, 16), Image.LANCZOS), dtype=np.float64)
        same = np.abs(small - np.asarray(v.tokenizer, dtype=np.float64)).mean()
        different = np.abs(small - np.asarray(other.tokenizer, dtype=np.float64)).mean()
        assert same < 6 and same < different / 2, (item, same, different)


def test_view_generator_is_seeded_from_the_triple():
    a = torch.rand(4, generator=view_generator(3, 10, 2))
    b = torch.rand(4, generator=view_generator(3, 10, 2))
    c = torch.rand(4, generator=view_generator(3, 10, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)
