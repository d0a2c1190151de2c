"""Helpers shared by the tokenization-job and shard tests: real images, the tiny dVAE, file digests."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import torch

from beit.demo import PHOTOS, write_digits, write_photos
from beit.tokenize.dvae import DiscreteVAE, DVAETokenizer, dvae_config


def make_image_folder(root: Path, digits: int = 24, photos: int = 4, size: int = 40) -> Path:
    """An ImageFolder: `digits` sklearn digits upscaled to `size` px (JPEG and PNG, one folder per label)
    plus colour skimage photos (about 64 px on the long side) under `photo/`."""
    write_digits(root, digits, size, formats=("jpg", "png"))
    return write_photos(root, PHOTOS[:photos])


def tiny_tokenizer(seed: int = 0) -> DVAETokenizer:
    """The tiny dVAE (32 px, 8×8 grid, 512 codes), randomly initialized with `seed`. The last layer's bias
    is zeroed: at random init it alone would pick nearly every cell's argmax, and tests need varied ids."""
    torch.manual_seed(seed)
    model = DiscreteVAE(dvae_config("tiny")).eval()
    with torch.no_grad():
        model.encoder[-1].bias.zero_()
    return DVAETokenizer(model)


def digest(directory: Path) -> dict[str, str]:
    """SHA-256 of every file in a directory, by name."""
    files = sorted(p for p in directory.iterdir() if p.is_file())
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def damage_jpegs(shard_set_dir: Path, every: int, first: int = 0) -> int:
    """Overwrite the JPEG of samples first, first + every, … of each shard in `shard_set_dir` with zeros after
    its SOI marker (the size and stats stay): undecodable samples the loader must skip. Returns how many."""
    damaged = 0
    for tar_path in sorted(shard_set_dir.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            jpgs = [m for m in tar.getmembers() if m.name.endswith(".jpg")][first::every]
        with open(tar_path, "r+b") as f:
            for member in jpgs:
                f.seek(member.offset_data + 2)
                f.write(b"\x00" * (member.size - 2))
        damaged += len(jpgs)
    return damaged
