"""Pretraining benchmarks, each comparing alternatives side by side in one run; prints JSON with ratios.

(a) `step_vs_timm`: one MIM training step (forward, cross-entropy on the masked rows, backward, AdamW)
    of our model against timm's `Beit` built with the identical configuration (shared relative position
    bias, LayerScale 0.1, stochastic depth 0.1, no absolute position) on the same batch and mask, with
    an `lm_head` on timm's features either on the masked rows only (timm's best case) or on all tokens
    before selecting the masked ones (the official `return_all_tokens` path). Target: <= 0.95.
(b) `offline_vs_on_the_fly`: our step on stored tokens against the official scheme that runs the
    tokenizer inside every step (the DALL-E-sized encoder, `dall_e.Encoder` defaults with random weights,
    on the 112-px view) at a ViT-B-shaped model and the same batch. Target: offline / on-the-fly <= 0.70
    (the FLOP bound is 105 / (105 + 52) = 0.67).
(c) `loader`: samples/s of the shard loader per worker against plain JPEG decoding of the same bytes in
    the same run (our decoder at its fastest: one call per 32 images, as the loader calls it), on 224-px
    views of real photos written by the tokenization job. Target: >= 0.8. Each loader run is paired with
    a tight decode timed just before it; the ratio is the median over pairs (`_range`: min and max).
    `decode_only_*`: the same for a dataset that only decodes in-memory JPEGs into batches, the ceiling of
    any loader on the machine at hand. `loader_over_decode_only`: the loader against that dataset in the
    same setting (in-process, one worker), each loader run paired with the decode-only run after it: what
    the loader's own work (tars, shuffling, tokens, masks) costs beyond decoding there.
    `us_per_sample`: wall time per sample, and the part spent in the stream's own code (tar reading,
    shuffling, decoding, checks, masks, batching) in-process and in one worker; the rest is what the
    DataLoader adds (moving each batch into shared memory, its queues).
    `decode_slowdown_when_another_cpu_is_busy`: whether this machine's CPUs slow each other down, which
    depresses every per-worker rate measured on it.
    `mask_us`: microseconds of one official 14x14 mask with its per-sample seeding, as the loader draws it.
    `loader_peak_rss_mb`: peak RSS of a fresh process streaming the same samples stored in 2, 30 and 240
    shards (target: flat).

Alternatives are interleaved and the median of `--repeats` is reported (the machine is noisy). The
default of one intra-op thread avoids measuring thread contention on a small shared machine.

    .venv/bin/python bench/pretrain.py [--parts abc] [--out bench/results/pretrain_cpu.json]
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import math
import multiprocessing
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from model_speed import race, seconds_of  # bench/ is on sys.path when this script runs
from PIL import Image
from tokenize_job import make_photos
from torch.utils.data import DataLoader, IterableDataset

from beit.model import create_model
from beit.shards import iter_tar_samples, open_shard_set
from beit.train.loader import Normalize, _stream_rng, decode_jpegs, shard_loader
from beit.train.masking import mask_generator, scaled_mask_size
from beit.train.optim import build_optimizer


def mim_batch(cfg, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 images, int64 tokens and a blockwise mask (75 of 196 scaled to the grid) per image."""
    gen = mask_generator(cfg.grid)
    images = torch.randint(0, 256, (batch, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8)
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.grid, cfg.grid))
    mask = torch.stack([torch.from_numpy(gen().reshape(-1)) for _ in range(batch)])
    return images, tokens, mask


def train_step(logits_fn, optimizer, images, tokens, mask) -> None:
    """The trainer's step: normalize on the device, logits of the masked rows, CE, backward, AdamW."""
    logits = logits_fn(Normalize.named("half")(images), mask)
    F.cross_entropy(logits.float(), tokens.flatten(1)[mask]).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def step_vs_timm(preset: str, batch: int, repeats: int) -> dict[str, Any]:
    from timm.models.beit import Beit  # test oracle / baseline only, never imported by the library

    torch.manual_seed(0)
    ours = create_model(preset, mim=True).train()
    cfg = ours.config
    theirs = Beit(
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        num_classes=0,
        init_values=cfg.layer_scale_init,
        use_abs_pos_emb=False,
        use_shared_rel_pos_bias=True,
        drop_path_rate=cfg.drop_path_rate,
    ).train()
    head = torch.nn.Linear(cfg.embed_dim, cfg.vocab_size)

    def timm_masked_rows(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return head(theirs.forward_features(x)[:, 1:][mask])  # the same work as ours

    def timm_all_tokens(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return head(theirs.forward_features(x)[:, 1:])[mask]  # the official `return_all_tokens` path

    ours_opt = build_optimizer(ours, lr=1e-4, weight_decay=0.05)
    timm_opt = build_optimizer(torch.nn.ModuleList([theirs, head]), lr=1e-4, weight_decay=0.05)
    data = mim_batch(cfg, batch)
    seconds = race(
        {
            "ours": lambda: train_step(ours, ours_opt, *data),
            "timm_masked_rows": lambda: train_step(timm_masked_rows, timm_opt, *data),
            "timm_all_tokens": lambda: train_step(timm_all_tokens, timm_opt, *data),
        },
        repeats,
        torch.device("cpu"),
    )
    return {
        "preset": preset,
        "batch": batch,
        "step_s": seconds,
        "ours_over_timm": {
            "masked_rows": seconds["ours"] / seconds["timm_masked_rows"],
            "all_tokens": seconds["ours"] / seconds["timm_all_tokens"],
        },
    }


def offline_vs_on_the_fly(preset: str, batch: int, repeats: int) -> dict[str, Any]:
    from dall_e import Encoder
    from torch.utils.flop_counter import FlopCounterMode

    from beit.model.vit import count_flops
    from beit.tokenize.dalle import DalleTokenizer

    torch.manual_seed(0)
    model = create_model(preset, mim=True).train()
    tokenizer = DalleTokenizer(Encoder().eval().requires_grad_(False))
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.05)
    images, tokens, mask = mim_batch(model.config, batch)
    view = torch.randint(0, 256, (batch, 3, tokenizer.input_size, tokenizer.input_size), dtype=torch.uint8)

    def on_the_fly() -> None:
        train_step(model, optimizer, images, tokenizer.encode(view), mask)  # the official order of work

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        tokenizer.encoder(torch.zeros(1, 3, tokenizer.input_size, tokenizer.input_size))
    seconds = race(
        {"offline": lambda: train_step(model, optimizer, images, tokens, mask), "on_the_fly": on_the_fly},
        repeats,
        torch.device("cpu"),
    )
    masked = scaled_mask_size(model.config.num_patches)[0]  # counted as forward_mim runs: 75 rows
    step_gflops = 3 * count_flops(model.config, masked) / 1e9  # forward + backward ~ 3x forward
    encoder_gflops = counter.get_total_flops() / 1e9
    return {
        "preset": preset,
        "batch": batch,
        "step_s": seconds,
        "gflops_per_image": {"train_step": step_gflops, "tokenizer": encoder_gflops},
        "flop_bound": step_gflops / (step_gflops + encoder_gflops),
        "offline_over_on_the_fly": seconds["offline"] / seconds["on_the_fly"],
    }


def make_shard_sets(work: Path, samples: int) -> dict[int, Path]:
    """The same `samples` 224-px views of real photos, tokenized by the job into 2, 30 and 240 shards."""
    from beit.tokenize.dvae import DiscreteVAE, DVAETokenizer, dvae_config
    from beit.tokenize.job import tokenize_dataset

    photos = make_photos(work / "photos", samples, size=(256, 256))
    torch.manual_seed(0)  # a cheap 14x14 tokenizer: only the stored bytes matter here
    small = dvae_config("tiny", input_size=112, downsample=8, vocab_size=8192, hidden=16, codebook_dim=16)
    tokenizer = DVAETokenizer(DiscreteVAE(small).eval())
    sets = {}
    for shards in (2, 30, 240):
        out = work / f"shards-{shards}"
        tokenize_dataset(
            photos,
            out,
            tokenizer,
            image_size=224,
            shard_size=-(-samples // shards),
            batch_size=64,
            device="cpu",
            progress=False,
        )
        sets[len(open_shard_set(out).shards)] = out
    return sets


def loader_rate(
    shards: Path, workers: int, batches: int, batch: int = 32, buffer: int = 1000
) -> tuple[float, float]:
    """Samples/s of the loader in its steady state, as on a real data set: one long epoch, timed once the
    shuffle buffer (the trainer's default size) is full (before that, each output pulls two samples in);
    and the microseconds per sample spent in the stream's own code, wherever it runs. With workers, the
    wall time per sample minus that is what the DataLoader adds: moving each batch into shared memory and
    through its queues."""
    loader = shard_loader(
        open_shard_set(shards),
        batch_size=batch,
        masks=mask_generator(14),
        num_workers=workers,
        epoch_batches=10**6,
        shuffle_buffer=buffer,
    )
    spent = torch.zeros(2, dtype=torch.float64).share_memory_()  # seconds, samples; seen by forked workers
    own_batches = loader.stream._batches

    def timed_batches(*args, **kwargs):
        batches = own_batches(*args, **kwargs)
        while True:
            start = time.perf_counter()
            item = next(batches)
            spent.add_(torch.tensor([time.perf_counter() - start, len(item.images)], dtype=torch.float64))
            yield item

    loader.stream._batches = timed_batches
    stream = iter(loader)
    for _ in range(buffer // batch + 1):
        next(stream)
    spent.zero_()
    start = time.perf_counter()
    for _ in itertools.islice(stream, batches):
        pass
    rate = batches * batch / (time.perf_counter() - start)
    return rate, 1e6 * float(spent[0] / spent[1])


class DecodeOnly(IterableDataset):
    """What any loader must at least do, and nothing else: decode in-memory JPEGs into uint8 batches (no
    tars, shuffling, tokens or masks). Its rate per worker is the ceiling of (c) on the machine at hand."""

    def __init__(self, jpegs: list[bytes], batch: int) -> None:
        self.jpegs, self.batch = jpegs, batch

    def __iter__(self):
        size = decode_jpegs(self.jpegs[:1])[0].shape[-1]
        for start in itertools.cycle(range(0, len(self.jpegs) - self.batch + 1, self.batch)):
            images = torch.empty(self.batch, size, size, 3, dtype=torch.uint8).permute(0, 3, 1, 2)
            for i, image in enumerate(decode_jpegs(self.jpegs[start : start + self.batch])):
                images[i] = image
            yield images


def decode_only_rate(jpegs: list[bytes], workers: int, batches: int, batch: int = 32) -> float:
    """Samples/s of `DecodeOnly` through a DataLoader, in its steady state."""
    stream = iter(
        DataLoader(
            DecodeOnly(jpegs, batch),
            batch_size=None,
            num_workers=workers,
            prefetch_factor=4 if workers else None,
        )
    )
    for _ in range(8):
        next(stream)
    start = time.perf_counter()
    for _ in itertools.islice(stream, batches):
        pass
    return batches * batch / (time.perf_counter() - start)


def pil_decode(data: bytes) -> torch.Tensor:
    """The plain way: PIL -> RGB -> numpy -> tensor [3, H, W]."""
    with Image.open(io.BytesIO(data)) as img:
        return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)


def decode_in_batches(jpegs: list[bytes], batch: int = 32) -> None:
    """Our decoder as the loader calls it: one call per batch of JPEGs."""
    for start in range(0, len(jpegs), batch):
        decode_jpegs(jpegs[start : start + batch])


def decode_rates(jpegs: list[bytes], repeats: int) -> dict[str, float]:
    """Samples/s of decoding the loader's JPEG bytes (`jpegs`) from memory in one thread, with our decoder
    (one call per 32 images, its fastest use) and PIL, and with our decoder as the loader meets the bytes:
    copies of them in a shuffled pool the size of the shuffle buffer (out of the CPU caches by the time one
    is read), each image copied into a batch."""
    pool = [bytes(bytearray(data)) for data in jpegs * -(-1000 // len(jpegs))]
    random.Random(0).shuffle(pool)
    batch = torch.empty(32, 224, 224, 3, dtype=torch.uint8).permute(0, 3, 1, 2)
    turn = itertools.count()

    def as_in_loader() -> None:
        start = next(turn) % (len(pool) // len(jpegs)) * len(jpegs)  # a different part of the pool each call
        part = pool[start : start + len(jpegs)]
        for first in range(0, len(part), len(batch)):
            for i, image in enumerate(decode_jpegs(part[first : first + len(batch)])):
                batch[i] = image

    seconds = race(
        {
            "ours": lambda: decode_in_batches(jpegs),
            "pil": lambda: [pil_decode(data) for data in jpegs],
            "ours_as_in_loader": as_in_loader,
        },
        repeats,
        torch.device("cpu"),
    )
    return {name: len(jpegs) / s for name, s in seconds.items()}


def _spin(stop) -> None:
    while not stop.is_set():
        pass


def decode_slowdown_when_another_cpu_is_busy(jpegs: list[bytes], repeats: int) -> float:
    """Tight decoding with a Python busy loop on another CPU over decoding alone. Far above 1 means the
    CPUs share a core (or the host throttles): then a worker slows down whenever the main process or its
    own queue thread runs, and per-worker rates here understate what a worker does on its own core."""
    fork = multiprocessing.get_context("fork")

    def decode_all() -> float:
        return seconds_of(lambda: decode_in_batches(jpegs), torch.device("cpu"))

    alone, contended = [], []
    for _ in range(repeats):
        alone.append(decode_all())
        stop = fork.Event()
        spinner = fork.Process(target=_spin, args=(stop,))
        spinner.start()
        time.sleep(0.2)  # let it get going
        contended.append(decode_all())
        stop.set()
        spinner.join()
    return median(contended) / median(alone)


def mask_us(repeats: int, count: int = 1000) -> dict[str, float]:
    """Microseconds per sample of seeding a mask RNG the loader's way and of drawing the official mask."""
    masks = mask_generator(14)
    seeds = [("mask", 0, 0, 0, index) for index in range(count)]
    rngs: list = []

    def seed_rngs() -> None:
        rngs[:] = [_stream_rng(*seed) for seed in seeds]

    def generate() -> None:
        for rng in rngs:
            masks(rng=rng)

    seconds = race({"seed_rng": seed_rngs, "generate": generate}, repeats, torch.device("cpu"))
    return {name: 1e6 * s / count for name, s in seconds.items()}


PEAK_RSS = """
import itertools, sys
from beit.shards import open_shard_set
from beit.train.loader import shard_loader
from beit.train.masking import mask_generator
def peak_mb():  # VmHWM: this address space's peak RSS
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
loader = shard_loader(open_shard_set(sys.argv[1]), batch_size=32, masks=mask_generator(14), num_workers=0)
stream = iter(loader)
next(stream)
before = peak_mb()
for _ in itertools.islice(stream, int(sys.argv[2])):
    pass
print(before, peak_mb())
"""


def loader(work: Path, samples: int, repeats: int) -> dict[str, Any]:
    sets = make_shard_sets(work, samples)
    few = sets[min(sets)]
    batches = 3 * samples // 32  # three passes
    jpegs = [m["jpg"] for s in open_shard_set(few).shards for _, m in iter_tar_samples(s.path)]
    decode = decode_rates(jpegs, repeats)
    # Each loader run is paired with a tight decode timed just before it, and the ratio is taken per pair:
    # this machine's speed drifts by up to 1.6x over minutes, much less over a second.
    setups = {  # each loader setting next to its decode-only one, for `loader_over_decode_only`
        "in_process": lambda: loader_rate(few, 0, batches),
        "decode_only_in_process": lambda: (decode_only_rate(jpegs, 0, batches), math.nan),
        "1_worker": lambda: loader_rate(few, 1, batches),
        "decode_only_1_worker": lambda: (decode_only_rate(jpegs, 1, batches), math.nan),
        "2_workers": lambda: loader_rate(few, 2, batches),
    }
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in setups}
    ratios: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(repeats):
        for name, run in setups.items():
            tight = len(jpegs) / seconds_of(lambda: decode_in_batches(jpegs), torch.device("cpu"))
            rate, stream_us = run()
            runs[name].append((rate, stream_us))
            ratios[name].append(rate / (2 if name == "2_workers" else 1) / tight)

    rates = {name: median([rate for rate, _ in results]) for name, results in runs.items()}
    same_setting = {
        name: [
            loaded / decoded
            for (loaded, _), (decoded, _) in zip(runs[name], runs[f"decode_only_{name}"], strict=True)
        ]
        for name in ("in_process", "1_worker")
    }
    per_worker = {**rates, "2_workers": rates["2_workers"] / 2}
    memory = {}
    for n, path in sorted(sets.items()):
        out = subprocess.run(
            [sys.executable, "-c", PEAK_RSS, str(path), str(batches)],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        after_first_batch, peak = map(float, out.stdout.split()[-2:])
        memory[n] = {"after_first_batch": after_first_batch, "peak": peak}
    return {
        "samples": samples,
        "image_size": 224,
        "grid": 14,
        "decode_samples_s": decode,
        "loader_samples_s": rates,
        "us_per_sample": {
            name: {"wall": 1e6 / rates[name], "stream_code": median([us for _, us in runs[name]])}
            for name in ("in_process", "1_worker")
        },
        "mask_us": mask_us(repeats),
        "decode_slowdown_when_another_cpu_is_busy": decode_slowdown_when_another_cpu_is_busy(jpegs, repeats),
        "loader_per_worker_over_decode": {name: median(values) for name, values in ratios.items()},
        "loader_per_worker_over_decode_range": {
            name: [min(values), max(values)] for name, values in ratios.items()
        },
        "loader_over_decode_only": {name: median(values) for name, values in same_setting.items()},
        "loader_over_decode_only_range": {
            name: [min(values), max(values)] for name, values in same_setting.items()
        },
        "loader_per_worker_over_pil_decode": {
            name: rate / decode["pil"] for name, rate in per_worker.items()
        },
        "loader_rss_mb_by_shards": memory,
        "peak_rss_max_over_min": max(m["peak"] for m in memory.values())
        / min(m["peak"] for m in memory.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", default="abc", help="which of a, b, c to run")
    parser.add_argument("--timm-preset", default="small", help="(a) model size")
    parser.add_argument("--timm-batch", type=int, default=8)
    parser.add_argument("--offline-preset", default="base", help="(b) model size (ViT-B by default)")
    parser.add_argument("--offline-batch", type=int, default=4)
    parser.add_argument("--samples", type=int, default=240, help="(c) samples in the shard sets")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {
        "command": "python bench/pretrain.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
        "device": "cpu",
        "dtype": "float32",
        "threads": args.threads,
        "torch": torch.__version__,
        "repeats": args.repeats,
    }
    if "a" in args.parts:
        result["a_step_vs_timm"] = step_vs_timm(args.timm_preset, args.timm_batch, args.repeats)
    if "b" in args.parts:
        result["b_offline_vs_on_the_fly"] = offline_vs_on_the_fly(
            args.offline_preset, args.offline_batch, args.repeats
        )
    if "c" in args.parts:
        with tempfile.TemporaryDirectory() as work:
            result["c_loader"] = loader(Path(work), args.samples, args.repeats)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
