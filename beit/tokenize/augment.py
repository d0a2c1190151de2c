"""The official two-view augmentation of BEiT pretraining (REFERENCE.md §3), made reproducible per sample.

`DataAugmentationForBEiT` applies, in order: ColorJitter(0.4, 0.4, 0.4) to the full image, a horizontal flip
(p = 0.5) to the full image, then ONE RandomResizedCrop box (scale 0.08–1, ratio 3/4–4/3) that yields both
the patch view (bicubic, 224 px) and the tokenizer view (Lanczos, 112 px) of the same region.

Here every random number comes from a `torch.Generator` seeded by `(seed, item id, view index)`, drawn with
exactly torchvision's calls in torchvision's order, and the image operations are the PIL calls torchvision
makes for PIL images (without importing torchvision, which costs seconds per process start). So a view never
depends on which process, machine or rerun makes it, and with the same seed it equals torchvision's own
transforms drawing from the global RNG (the test checks this pixel for pixel). The parameters are returned
so they can be stored with the sample.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image, ImageEnhance

JITTER_OPS = ("brightness", "contrast", "saturation", "hue")  # torchvision's fn_idx numbering
# torchvision's PIL implementations of adjust_brightness / adjust_contrast / adjust_saturation
_ENHANCERS = {
    "brightness": ImageEnhance.Brightness,
    "contrast": ImageEnhance.Contrast,
    "saturation": ImageEnhance.Color,
}


def view_seed(seed: int, item: int, view: int) -> int:
    """A 63-bit seed for one (run seed, item id, view index): stable across processes and platforms."""
    digest = hashlib.sha256(f"beit-view:{seed}:{item}:{view}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def view_generator(seed: int, item: int, view: int) -> torch.Generator:
    return torch.Generator().manual_seed(view_seed(seed, item, view))


def crop_box(
    width: int,
    height: int,
    gen: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random resized crop: torchvision's algorithm and calls, on `gen`."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))  # float32, as torchvision computes it
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=gen).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=gen)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = torch.randint(0, height - h + 1, size=(1,), generator=gen).item()
            left = torch.randint(0, width - w + 1, size=(1,), generator=gen).item()
            return top, left, h, w
    # Fallback: the centre crop with the aspect ratio clamped into `ratio`.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass(frozen=True)
class TwoViews:
    """The two views of one crop and the parameters that made them (JSON-serializable)."""

    patch: Image.Image  # RGB, image_size x image_size, bicubic
    tokenizer: Image.Image  # RGB, tokenizer_size x tokenizer_size, Lanczos
    params: dict[str, Any]


@dataclass(frozen=True)
class TwoViewAugment:
    """ColorJitter → horizontal flip → one crop box → bicubic patch view + Lanczos tokenizer view."""

    image_size: int = 224
    tokenizer_size: int = 112
    jitter: float = 0.4
    flip_p: float = 0.5
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __call__(self, image: Image.Image, seed: int, item: int, view: int) -> TwoViews:
        """The views of item `item`, view index `view`, under run seed `seed` (RGB input)."""
        return self.apply(image, view_generator(seed, item, view))

    def apply(self, image: Image.Image, gen: torch.Generator) -> TwoViews:
        """Draw every parameter from `gen` in torchvision's order: jitter, flip, crop."""
        # ColorJitter.get_params: a random op order, then one factor per enabled op (hue 0 is disabled).
        order = torch.randperm(4, generator=gen).tolist()
        lo, hi = max(0.0, 1 - self.jitter), 1 + self.jitter
        enabled = JITTER_OPS[:3] if self.jitter > 0 else ()
        factors = {op: float(torch.empty(1).uniform_(lo, hi, generator=gen)) for op in enabled}
        for op in (JITTER_OPS[i] for i in order):
            if op in factors:
                image = _ENHANCERS[op](image).enhance(factors[op])
        flip = torch.rand(1, generator=gen).item() < self.flip_p
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        top, left, h, w = crop_box(image.width, image.height, gen, self.scale, self.ratio)
        crop = image.crop((left, top, left + w, top + h))  # torchvision's resized_crop: crop, then resize
        patch = crop.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        tokenizer = crop.resize((self.tokenizer_size, self.tokenizer_size), Image.Resampling.LANCZOS)
        params = {
            "crop": [top, left, h, w],  # (top, left, height, width) in the flipped full image
            "flip": flip,
            "jitter": {"order": [JITTER_OPS[i] for i in order if JITTER_OPS[i] in factors], **factors},
        }
        return TwoViews(patch, tokenizer, params)
