"""Encode throughput of the tokenizers, side by side in one run; prints JSON.

`tokenizer.encode` (uint8 in, int64 ids out, including the pixel mapping) in images/s at batch 1, 16 and
64 for:
- `dall-e`: the DALL-E encoder at its real size (dall_e.Encoder defaults: n_hid 256, 8192 codes), 112 px
  -> 14x14; random weights unless --dalle points at encoder.pkl/.safetensors (the speed is the same);
- `dvae-base`: our dVAE's base preset (112 px, x8 -> 14x14, 8192 codes), the like-for-like alternative;
- `dvae-tiny`: the tiny preset (32 px, x4 -> 8x8, 512 codes) that pairs with the tiny BEiT.
Ratios: dvae-base / dall-e at each batch size. Each cell: one warm-up call, then calls until
--min-seconds have passed (at least one).

    .venv/bin/python bench/tokenizer.py [--device cpu] [--dalle weights/encoder.pkl] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import dall_e
import torch

from beit.tokenize.dalle import DalleTokenizer
from beit.tokenize.dvae import DiscreteVAE, DVAETokenizer, dvae_config
from beit.tokenize.loading import load_tokenizer

BATCHES = (1, 16, 64)


def images_per_second(tokenizer: Any, batch: int, min_seconds: float) -> float:
    device = next(tokenizer.encoder.parameters()).device
    size = tokenizer.input_size
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8).to(device)
    tokenizer.encode(images)  # warm-up
    calls, start = 0, time.perf_counter()
    while True:
        tokenizer.encode(images)
        if device.type == "cuda":
            torch.cuda.synchronize()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return calls * batch / elapsed


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dalle", help="real DALL-E encoder weights (default: random weights, same speed)")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)), help="comma-separated batch sizes")
    parser.add_argument("--min-seconds", type=float, default=2.0)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()

    torch.manual_seed(0)
    dalle = load_tokenizer(args.dalle, with_decoder=False) if args.dalle else DalleTokenizer(dall_e.Encoder())
    tokenizers = {
        "dall-e": dalle,
        "dvae-base": DVAETokenizer(DiscreteVAE(dvae_config("base")).eval()),
        "dvae-tiny": DVAETokenizer(DiscreteVAE(dvae_config("tiny")).eval()),
    }
    for tok in tokenizers.values():
        tok.to(args.device)
    load_start = os.getloadavg()[0]
    rows = []
    for batch in map(int, args.batches.split(",")):
        row: dict[str, Any] = {"batch": batch}
        for name, tok in tokenizers.items():
            row[f"{name}_img_s"] = images_per_second(tok, batch, args.min_seconds)
        row["dvae_base_over_dalle"] = row["dvae-base_img_s"] / row["dall-e_img_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {
        "machine": {
            "device": args.device,
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "load_avg_1m_at_start": load_start,
            "load_avg_1m_at_end": os.getloadavg()[0],
        },
        "tokenizers": {name: tok.fingerprint() for name, tok in tokenizers.items()},
        "encode_images_per_second": rows,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
