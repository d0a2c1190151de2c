"""Sample images for `make demo` and the tests: scikit-learn's handwritten digits and scikit-image's
photos, which ship inside those packages (the `dev` extra), written out as an ImageFolder.

    python -m beit.demo data/demo/images --digits 1797
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from beit.errors import BeitError

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")  # colour photos of different aspect ratios


def _import(module: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise BeitError(
            f"the sample images come from {module.split('.')[0]}, which is not installed; "
            "install the dev extra: pip install -e '.[dev]'"
        ) from None


def write_digits(
    root: str | Path, count: int = 1797, size: int = 32, *, formats: tuple[str, ...] = ("png",)
) -> Path:
    """The first `count` digits (8×8, 17 grey levels) as RGB images of `size` px, one folder per label,
    cycling through `formats` ("png", "jpg") by index. Returns `root`."""
    digits = _import("sklearn.datasets").load_digits()
    if not 0 < count <= len(digits.images):
        raise BeitError(f"there are {len(digits.images)} digits; count must be in 1..{len(digits.images)}")
    root = Path(root)
    for i in range(count):
        pixels = (digits.images[i] * (255 / 16)).round().astype(np.uint8)
        image = Image.fromarray(pixels).convert("RGB")
        if size != pixels.shape[0]:
            image = image.resize((size, size), Image.BICUBIC)
        folder = root / str(digits.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:04d}.{formats[i % len(formats)]}")
    return root


def write_photos(root: str | Path, names: tuple[str, ...] = PHOTOS, max_side: int = 64) -> Path:
    """scikit-image colour photos, shrunk to `max_side` px on the long side, as JPEGs under `root/photo/`."""
    skdata = _import("skimage.data")
    folder = Path(root) / "photo"
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        image = Image.fromarray(getattr(skdata, name)()).convert("RGB")
        image.thumbnail((max_side, max_side), Image.BICUBIC)
        image.save(folder / f"{name}.jpg", quality=90)
    return Path(root)


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the demo's sample images as an ImageFolder.")
    parser.add_argument("out", type=Path, help="output folder (one sub-folder per digit label)")
    parser.add_argument("--digits", type=int, default=1797, help="how many digits (max 1797)")
    parser.add_argument("--size", type=int, default=32, help="side of the upscaled digits in pixels")
    args = parser.parse_args()
    try:
        write_digits(args.out, args.digits, args.size)
    except BeitError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"wrote {args.digits} digit images to {args.out}")


if __name__ == "__main__":
    main()
