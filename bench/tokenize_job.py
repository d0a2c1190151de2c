"""Benchmark of the offline tokenization job (`beit tokenize`), side by side in one run; prints JSON.

For each tokenizer it measures, at the same batch size:
- `encode_img_s`: the bare `tokenizer.encode` throughput on ready uint8 tensors (the ceiling: the better of
  torch's default thread count and one thread);
- `job_img_s_1w` / `job_img_s_2w`: the whole job (plan, decode, augmentation, JPEG encoding, tokenizer,
  tar writing, stats, manifest) with 1 and 2 decode/augment worker processes, on real photos
  (scikit-image / scikit-learn sample images cut into distinct 320x240 JPEGs);
- ratios: `job_2w / encode` (target >= 0.8: the pipeline hides behind the tokenizer) and `2w / 1w`
  (target >= 1.7 where the tokenizer is not the bottleneck: the cheap "patch colour" tokenizer).
Tokenizers: "cheap" (mean colour of each 4x4 patch quantized to 512 ids: almost free), the tiny dVAE
(32 px, 8x8 grid) and a DALL-E-sized encoder (dall_e.Encoder defaults, random weights) at 112 px with
224-px patch views.

Memory: the job runs in fresh processes on 1k and 10k small images; peak RSS of the main process and of
the largest worker are reported (target: 10k <= 1.1x 1k).

    .venv/bin/python bench/tokenize.py [--quick] [--out bench/results/tokenize.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from beit.tokenize.job import tokenize_dataset


class PatchColourTokenizer:
    """A nearly free tokenizer: each 4x4 patch's mean colour, 3 bits per channel (512 ids)."""

    vocab_size, grid, input_size = 512, 8, 32

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        mean = torch.nn.functional.avg_pool2d(images.float(), 4)  # [B, 3, 8, 8]
        q = (mean / 32).long().clamp(0, 7)
        return q[:, 0] * 64 + q[:, 1] * 8 + q[:, 2]

    def fingerprint(self) -> dict[str, Any]:
        return {
            "name": "patch-colour",
            "vocab_size": 512,
            "input_size": 32,
            "grid": 8,
            "pixel_mapping": "none",
            "weights_sha256": "none",
        }

    def to(self, device: torch.device | str) -> PatchColourTokenizer:
        return self


def make_tokenizer(name: str):
    """(tokenizer, patch-view size, batch size)."""
    torch.manual_seed(0)
    if name == "cheap":
        return PatchColourTokenizer(), 32, 64
    if name == "tiny_dvae":
        from beit.tokenize.dvae import DiscreteVAE, DVAETokenizer, dvae_config

        return DVAETokenizer(DiscreteVAE(dvae_config("tiny")).eval()), 32, 64
    from dall_e import Encoder

    from beit.tokenize.dalle import DalleTokenizer

    return DalleTokenizer(Encoder().eval().requires_grad_(False)), 224, 8


def make_photos(root: Path, n: int, size: tuple[int, int] = (320, 240)) -> Path:
    """`n` distinct JPEGs: random crops of real photos, resized to `size`."""
    from skimage import data as skdata
    from sklearn.datasets import load_sample_images

    sources = [Image.fromarray(a) for a in load_sample_images().images]
    sources += [Image.fromarray(getattr(skdata, k)()) for k in ("astronaut", "coffee", "chelsea")]
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        src = sources[i % len(sources)]
        w, h = int(src.width * rng.uniform(0.5, 1)), int(src.height * rng.uniform(0.5, 1))
        x, y = int(rng.integers(0, src.width - w + 1)), int(rng.integers(0, src.height - h + 1))
        src.crop((x, y, x + w, y + h)).resize(size, Image.BICUBIC).save(root / f"{i:06d}.jpg", quality=90)
    return root


def bare_encode(tokenizer, n: int, batch: int, threads: int) -> float:
    """Images/s of `encode` alone on uint8 batches of the tokenizer's input size (after one warm-up)."""
    default = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.randint(0, 256, (batch, 3, tokenizer.input_size, tokenizer.input_size), dtype=torch.uint8)
        tokenizer.encode(x)
        t0 = time.perf_counter()
        for _ in range(max(1, n // batch)):
            tokenizer.encode(x)
        return max(1, n // batch) * batch / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(default)


def _cpu_seconds() -> tuple[float, float]:
    """User + system CPU seconds of this process and of its finished children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def throughput(name: str, photos: Path, n: int, work: Path) -> dict[str, Any]:
    tokenizer, image_size, batch = make_tokenizer(name)
    row: dict[str, Any] = {
        "tokenizer": name,
        "images": n,
        "batch_size": batch,
        "image_size": image_size,
        "tokenizer_size": tokenizer.input_size,
    }
    # the ceiling: the better of all threads and one thread (on a loaded machine one thread can win)
    threads = sorted({torch.get_num_threads(), 1})
    row["encode_img_s_by_threads"] = {t: bare_encode(tokenizer, n, batch, t) for t in threads}
    row["encode_img_s"] = max(row["encode_img_s_by_threads"].values())
    for workers in (1, 2):
        before = _cpu_seconds()
        summary = tokenize_dataset(
            photos,
            work / f"{name}-{workers}w",
            tokenizer,
            image_size=image_size,
            batch_size=batch,
            shard_size=max(batch, n // 4),
            num_workers=workers,
            device="cpu",
            progress=False,
        )
        assert summary.samples == n, summary
        row[f"job_img_s_{workers}w"] = summary.images_per_second
        # CPU time per image (main process, and the joined workers): if it does not grow from 1 to 2
        # workers, a missing speed-up means missing free cores, not a serial section in the job
        main_s, workers_s = (after - b for after, b in zip(_cpu_seconds(), before, strict=True))
        row[f"cpu_ms_per_img_{workers}w"] = {"main": 1000 * main_s / n, "workers": 1000 * workers_s / n}
    row["job_2w_over_encode"] = row["job_img_s_2w"] / row["encode_img_s"]
    row["job_2w_over_1w"] = row["job_img_s_2w"] / row["job_img_s_1w"]
    return row


def memory_child(n: int, work: Path) -> None:
    """Run the job over `n` small images in this (fresh) process; print peak RSS in MiB."""
    src = make_photos(work / "src", n, size=(64, 64))
    tokenizer, _, batch = make_tokenizer("tiny_dvae")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # imports, tokenizer, image making
    summary = tokenize_dataset(
        src,
        work / "out",
        tokenizer,
        image_size=32,
        batch_size=batch,
        shard_size=500,
        num_workers=2,
        device="cpu",
        progress=False,
    )
    main = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    worker = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "images": n,
                "samples": summary.samples,
                "img_s": summary.images_per_second,
                "peak_rss_before_job_mib": before,
                "peak_rss_main_mib": main,
                "peak_rss_worker_mib": worker,
            }
        )
    )


def memory(sizes: list[int]) -> dict[str, Any]:
    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            out = subprocess.run(
                [sys.executable, __file__, "--memory-child", str(n), "--work", tmp],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    small, large = rows[0], rows[-1]
    return {
        "runs": rows,
        "main_ratio": large["peak_rss_main_mib"] / small["peak_rss_main_mib"],
        "worker_ratio": large["peak_rss_worker_mib"] / small["peak_rss_worker_mib"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images (a smoke run, noisy ratios)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        return memory_child(args.memory_child, args.work)

    n_small, n_dalle = (128, 8) if args.quick else (512, 16)
    result: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "load_avg_1m_at_start": os.getloadavg()[0],
        },
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        photos = make_photos(work / "photos", n_small)
        result["throughput"] = [
            throughput("cheap", photos, n_small, work),
            throughput("tiny_dvae", photos, n_small, work),
        ]
        dalle_photos = make_photos(work / "photos-dalle", n_dalle)
        result["throughput"].append(throughput("dalle_sized", dalle_photos, n_dalle, work))
    result["memory"] = memory([200, 2000] if args.quick else [1000, 10000])
    result["machine"]["load_avg_1m_at_end"] = os.getloadavg()[0]
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
