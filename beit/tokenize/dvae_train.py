"""Train our dVAE on an image folder: a plain loop (DALL-E paper App. A, scaled down; REFERENCE.md §4.2).

Each step: random resized crops (Lanczos, as the tokenizer view) -> Normalize(0.5, 0.5) -> encoder logits
-> Gumbel-softmax sample at temperature τ (hard one-hot with the straight-through option) -> codebook ->
decoder -> loss = MSE(reconstruction, input) + β·KL(q(z|x) ‖ uniform) + γ·KL(q̄ ‖ uniform), the KLs in
nats per cell. τ anneals from `temperature_start` to `temperature_end` (cosine, default 1 -> 1/16), β warms
up linearly, the learning rate warms up linearly then follows a cosine; AdamW (0.9, 0.999, ε 1e-8).

The γ term is our addition to the DALL-E recipe. The ELBO's per-cell KL to the uniform prior averages to
I(x; z) + KL(q̄ ‖ uniform), q̄ the mean posterior: it penalizes the information the codes carry as much as
an uneven use of the codebook. The second part alone (on the batch's q̄, `usage_weight`) spreads the
codes without that penalty. In bench/dvae_train.py (tiny preset, 600 steps on photo tiles) γ = 0.1 uses
93% of the 512 codes (perplexity 266) where γ = 0 uses 18% (perplexity 26), for a 0.5 dB lower PSNR.
Set it to 0 for the recipe as published.

The reconstruction loss is MSE in the normalized pixel space (the official customized tokenizer's
choice), not DALL-E's logit-Laplace likelihood: it keeps the decoder a plain 3-channel regressor.

The output directory is a loadable tokenizer at every checkpoint (`model.safetensors` + `config.json`,
written atomically), plus `train_state.pt` (model, optimizer, step, RNG: tensors and dicts only, read
back with `weights_only=True`) for `resume`, and `train_log.jsonl`. Item i of the training stream is
always the same crop of the same image (seeded by position), so a resumed run continues exactly where
the interrupted one would have gone.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import InterpolationMode
from tqdm import tqdm

from beit.errors import BeitError
from beit.shards.format import write_atomic
from beit.tokenize.augment import crop_box, view_generator
from beit.tokenize.dvae import DiscreteVAE, DVAEConfig, normalize
from beit.tokenize.job import BadItem, load_rgb, scan_source
from beit.tokenize.loading import MAX_PIXELS, save_tokenizer
from beit.workers import die_with_parent

log = logging.getLogger(__name__)

STATE_NAME = "train_state.pt"
LOG_NAME = "train_log.jsonl"


@dataclass(frozen=True)
class DVAETrainConfig:
    """Optimization settings of a dVAE run (the model's shape is a `DVAEConfig`)."""

    steps: int = 20_000
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 200
    weight_decay: float = 1e-4
    temperature_start: float = 1.0
    temperature_end: float = 1 / 16
    temperature_steps: int | None = None  # anneal over this many steps (None: the whole run)
    kl_weight: float = 0.001
    kl_warmup_steps: int = 1000
    usage_weight: float = 0.1  # γ: KL of the batch's mean posterior to uniform (0: the published recipe)
    straight_through: bool = False
    crop_scale: tuple[float, float] = (0.35, 1.0)
    num_workers: int = 2
    log_every: int = 20
    checkpoint_every: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise BeitError(f"steps and batch_size must be positive, got {self.steps} and {self.batch_size}")
        if not 0 < self.temperature_end <= self.temperature_start:
            raise BeitError("the temperature must anneal down: 0 < temperature_end <= temperature_start")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise BeitError(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        if self.log_every < 1 or self.checkpoint_every < 1:
            raise BeitError("log_every and checkpoint_every must be at least 1")


def cosine(start: float, end: float, step: int, total: int) -> float:
    """Cosine from `start` (step 0) to `end` (step >= total)."""
    if step >= total:
        return end
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * step / total))


def schedules(cfg: DVAETrainConfig, step: int) -> tuple[float, float, float]:
    """(lr, temperature, kl weight) for the 0-based optimizer step `step`; the last step of an
    annealing period gets the final value."""
    if step < cfg.warmup_steps:
        lr = cfg.lr * (step + 1) / cfg.warmup_steps
    else:
        lr = cosine(cfg.lr, cfg.min_lr, step - cfg.warmup_steps, max(1, cfg.steps - cfg.warmup_steps - 1))
    tau_steps = max(1, (cfg.temperature_steps or cfg.steps) - 1)
    tau = cosine(cfg.temperature_start, cfg.temperature_end, step, tau_steps)
    beta = (
        cfg.kl_weight * min(1.0, (step + 1) / cfg.kl_warmup_steps) if cfg.kl_warmup_steps else cfg.kl_weight
    )
    return lr, tau, beta


def kl_to_uniform(logits: torch.Tensor) -> torch.Tensor:
    """KL(q ‖ uniform) in nats per cell, q = softmax over dim 1 of [B,V,g,g] logits; mean over cells."""
    log_q = F.log_softmax(logits, dim=1)
    return (log_q.exp() * log_q).sum(dim=1).mean() + math.log(logits.shape[1])


def usage_kl(logits: torch.Tensor) -> torch.Tensor:
    """KL(q̄ ‖ uniform) in nats, q̄ the posterior averaged over all cells of the [B,V,g,g] logits."""
    q_mean = F.softmax(logits, dim=1).mean(dim=(0, 2, 3))  # [V]
    return (q_mean * q_mean.clamp(min=1e-12).log()).sum() + math.log(logits.shape[1])


def codebook_usage(counts: torch.Tensor) -> tuple[float, float]:
    """(perplexity, share of codes used) of a histogram of token ids."""
    p = counts.double() / counts.sum().clamp(min=1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return float(entropy.exp()), float((counts > 0).double().mean())


class CropStream(Sampler):
    """An endless stream of (image index, stream position), epoch by epoch in seeded random order.

    Position p is item p % n of the permutation of epoch p // n, so a run resumed at step s restarts at
    position s·batch_size and sees the same items as an uninterrupted run.
    """

    def __init__(self, num_images: int, seed: int, start: int = 0) -> None:
        self.n, self.seed, self.start = num_images, seed, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        pos = self.start
        while True:
            epoch, offset = divmod(pos, self.n)
            perm = torch.randperm(
                self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            )
            for index in perm[offset:].tolist():
                yield index, pos
                pos += 1


class CropDataset(Dataset):
    """Stream position -> uint8 [3,S,S] random resized crop (+ flip), or (path, reason) for a bad image."""

    def __init__(self, paths: list[Path], size: int, scale: tuple[float, float], seed: int) -> None:
        self.paths, self.size, self.scale, self.seed = paths, size, scale, seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor | tuple[str, str]:
        index, pos = key
        path = self.paths[index]
        try:
            image, _ = load_rgb(path, MAX_PIXELS)
        except BadItem as err:  # the run goes on without it
            return str(path), str(err)
        gen = view_generator(self.seed, pos, 0)
        top, left, h, w = crop_box(image.width, image.height, gen, self.scale)
        crop = TF.resized_crop(image, top, left, h, w, [self.size, self.size], InterpolationMode.LANCZOS)
        if torch.rand(1, generator=gen).item() < 0.5:
            crop = TF.hflip(crop)
        return TF.pil_to_tensor(crop)


def collate(items: list[Any]) -> tuple[torch.Tensor | None, list[tuple[str, str]]]:
    """Stack the good crops; pass the bad items' (path, reason) along."""
    good = [x for x in items if isinstance(x, torch.Tensor)]
    bad = [x for x in items if not isinstance(x, torch.Tensor)]
    return (torch.stack(good) if good else None), bad


def _save_state(
    out: Path, model: DiscreteVAE, opt: torch.optim.Optimizer, step: int, cfg: DVAETrainConfig
) -> None:
    """Tokenizer files first, then the resume state; each file is replaced atomically."""
    save_tokenizer(model, out, extra={"step": step, "train": asdict(cfg)})
    state = {
        "step": step,
        "model_config": model.config.to_dict(),
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    write_atomic(out / STATE_NAME, buf.getvalue())


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past `step` (written after the checkpoint a resumed run restarts from)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):  # a line cut short by the interruption
            continue
    write_atomic(path, "".join(kept).encode())


def train_dvae(
    data: str | Path,
    out: str | Path,
    model_config: DVAEConfig | None = None,
    cfg: DVAETrainConfig | None = None,
    *,
    resume: bool = False,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Train a dVAE on the images of `data` (a folder, searched recursively, or a .txt/.parquet list as
    `beit tokenize` takes), writing checkpoints and logs into `out`.

    With `resume`, the model config, weights, optimizer, step and RNG come from `out/train_state.pt`
    and `cfg` may raise `steps`. Returns a summary (final step, last logged metrics, skipped images).
    """
    cfg = cfg or DVAETrainConfig()
    out = Path(out)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    state_path, log_path = out / STATE_NAME, out / LOG_NAME
    state = None
    if resume:
        if not state_path.exists():
            raise BeitError(
                f"nothing to resume: {state_path} does not exist (drop --resume to start a new run)"
            )
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        model_config = DVAEConfig.from_dict(state["model_config"])
    elif state_path.exists():
        raise BeitError(
            f"{out} already holds a dVAE run; pass --resume to continue it or choose another --out"
        )
    model_config = model_config or DVAEConfig()
    root, entries = scan_source(data)
    paths = [root / rel for rel, _ in entries]

    torch.manual_seed(cfg.seed)
    model = DiscreteVAE(model_config).to(device)
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay
    )
    step = 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step = int(state["step"])
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        _truncate_log(log_path, step)
    out.mkdir(parents=True, exist_ok=True)

    loader = DataLoader(
        CropDataset(paths, model_config.input_size, cfg.crop_scale, cfg.seed),
        batch_size=cfg.batch_size,
        sampler=CropStream(len(paths), cfg.seed, start=step * cfg.batch_size),
        collate_fn=collate,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed),  # keeps the global RNG out of the loader
        worker_init_fn=die_with_parent(),
    )
    bad: dict[str, str] = {}
    counts = torch.zeros(model_config.vocab_size, dtype=torch.long, device=device)
    sums = {"recon_loss": 0.0, "kl": 0.0, "usage_kl": 0.0}
    n_sum, t_last, last = 0, time.perf_counter(), {}
    model.train()
    batches = iter(loader)
    bar = tqdm(total=cfg.steps, initial=step, desc="dvae", unit="step")
    with open(log_path, "a") as log_file, bar:
        while step < cfg.steps:
            images, bad_items = next(batches)
            for path, reason in bad_items:
                if path not in bad:
                    bad[path] = reason
                    log.warning("skipped %s: %s", path, reason)
            if len(bad) == len(paths):
                raise BeitError(f"none of the {len(paths)} images of {data} can be read ({path}: {reason})")
            lr, tau, beta = schedules(cfg, step)
            step += 1
            bar.update()
            if images is not None:
                for group in opt.param_groups:
                    group["lr"] = lr
                x = normalize(images.to(device, non_blocking=True).float() / 255)
                recon, logits = model(x, tau, cfg.straight_through)
                recon_loss = F.mse_loss(recon, x)
                kl, spread = kl_to_uniform(logits), usage_kl(logits)
                loss = recon_loss + beta * kl + cfg.usage_weight * spread
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                counts += torch.bincount(logits.detach().argmax(dim=1).flatten(), minlength=counts.numel())
                sums["recon_loss"] += recon_loss.item()
                sums["kl"] += kl.item()
                sums["usage_kl"] += spread.item()
                n_sum += 1
            if (step % cfg.log_every == 0 or step == cfg.steps) and n_sum:
                perplexity, used = codebook_usage(counts)
                now = time.perf_counter()
                last = {
                    "step": step,
                    **{k: v / n_sum for k, v in sums.items()},
                    "temperature": tau,
                    "kl_weight": beta,
                    "lr": lr,
                    "perplexity": perplexity,
                    "codes_used": used,
                    "skipped_images": len(bad),
                    "steps_per_s": n_sum / (now - t_last),
                }
                log_file.write(json.dumps(last) + "\n")
                log_file.flush()
                bar.set_postfix(recon=f"{last['recon_loss']:.4f}", used=f"{used:.2f}", tau=f"{tau:.3f}")
                counts.zero_()
                sums = dict.fromkeys(sums, 0.0)
                n_sum, t_last = 0, now
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                _save_state(out, model, opt, step, cfg)
    return {"step": step, "last": last, "skipped_images": len(bad), "skipped": bad, "out": str(out)}
