"""Training our dVAE on real photos, with and without the codebook-usage term, side by side; prints JSON.

Data: scikit-image's colour photos and scikit-learn's two sample images cut into 64-px tiles (PNG files
in a temporary folder), trained through `train_dvae` exactly as `beit tokenizer train` does, with random
resized crops to the tiny preset's 32 px (x4 -> 8x8 cells, 512 codes, width 64).
Variants (same seed, data, steps and schedules):
- `usage_0.1`: our default, γ = 0.1 on KL(mean posterior ‖ uniform);
- `recipe`: γ = 0, the DALL-E recipe as published (per-cell KL to the uniform prior only).
Measured on every third tile, centre-resized to 32 px, before and after training, through the tokenizer
itself (encode -> hard ids -> decode): MSE and PSNR on [0,1] RGB, share of the 512 codes used, perplexity.

    .venv/bin/python bench/dvae_train.py [--steps 600] [--out bench/results/dvae_train_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from skimage import data as skdata
from sklearn.datasets import load_sample_images

from beit.tokenize.dvae import DiscreteVAE, DVAETokenizer, dvae_config
from beit.tokenize.dvae_train import DVAETrainConfig, codebook_usage, train_dvae
from beit.tokenize.loading import load_tokenizer

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")


def write_tiles(root: Path, tile: int = 64) -> list[Path]:
    photos = [getattr(skdata, name)() for name in PHOTOS] + list(load_sample_images().images)
    paths = []
    for i, photo in enumerate(photos):
        for r in range(0, photo.shape[0] - tile + 1, tile):
            for c in range(0, photo.shape[1] - tile + 1, tile):
                paths.append(root / f"{i}_{r:04d}_{c:04d}.png")
                Image.fromarray(photo[r : r + tile, c : c + tile]).save(paths[-1])
    return paths


def measure(tok: DVAETokenizer, images: torch.Tensor) -> dict[str, float]:
    ids = tok.encode(images)
    mse = (tok.decode(ids) - images.float() / 255).pow(2).mean().item()
    perplexity, used = codebook_usage(torch.bincount(ids.flatten(), minlength=tok.vocab_size))
    return {"mse": mse, "psnr_db": -10 * math.log10(mse), "codes_used": used, "perplexity": perplexity}


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (small convs: 1 is fastest)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model_cfg = dvae_config("tiny")
    variants = {"usage_0.1": 0.1, "recipe": 0.0}
    report: dict[str, Any] = {
        "model": model_cfg.to_dict(),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "torch_threads": args.threads,
        "load_avg_1m_at_start": os.getloadavg()[0],
        "variants": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "tiles"
        data.mkdir()
        tiles = write_tiles(data)
        lanczos = Image.Resampling.LANCZOS
        evaluation = (
            torch.from_numpy(
                np.stack([np.asarray(Image.open(p).resize((32, 32), lanczos)) for p in tiles[::3]])
            )
            .permute(0, 3, 1, 2)
            .contiguous()
        )
        report["tiles"], report["evaluation_images"] = len(tiles), len(evaluation)
        for name, gamma in variants.items():
            cfg = DVAETrainConfig(
                steps=args.steps,
                batch_size=args.batch_size,
                lr=args.lr,
                warmup_steps=args.steps // 10,
                kl_warmup_steps=args.steps // 10,
                usage_weight=gamma,
                num_workers=1,
                log_every=max(1, args.steps // 10),
                checkpoint_every=args.steps,
            )
            torch.manual_seed(cfg.seed)  # the trainer's initial weights
            start = measure(DVAETokenizer(DiscreteVAE(model_cfg).eval()), evaluation)
            t0 = time.perf_counter()
            train_dvae(data, Path(tmp) / name, model_cfg, cfg, device="cpu")
            seconds = time.perf_counter() - t0
            end = measure(load_tokenizer(Path(tmp) / name), evaluation)
            report["variants"][name] = {
                "usage_weight": gamma,
                "start": start,
                "end": end,
                "mse_end_over_start": end["mse"] / start["mse"],
                "train_seconds": seconds,
                "steps_per_second": args.steps / seconds,
            }
            print(json.dumps({name: report["variants"][name]}), flush=True)
    v = report["variants"]
    report["usage_0.1_over_recipe"] = {
        "codes_used": v["usage_0.1"]["end"]["codes_used"] / v["recipe"]["end"]["codes_used"],
        "mse": v["usage_0.1"]["end"]["mse"] / v["recipe"]["end"]["mse"],
    }
    report["load_avg_1m_at_end"] = os.getloadavg()[0]
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
