"""Our dVAE: model, tokenizer wrapper, saving/loading, and the trainer on real photos.

The "must show" check trains a small dVAE on scikit-image photos cut into 64-px tiles and requires the
reconstruction error of encode -> decode (hard tokens, the tokenizer's real use) to fall well below its
start while a large share of the codebook is used. Resume is checked bit for bit against an
uninterrupted run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from skimage import data as skdata

from beit.errors import BeitError
from beit.model import create_model
from beit.model.checkpoint import save_checkpoint
from beit.tokenize import dvae_train
from beit.tokenize.base import Tokenizer
from beit.tokenize.dvae import DiscreteVAE, DVAEConfig, DVAETokenizer, dvae_config
from beit.tokenize.dvae_train import (
    DVAETrainConfig,
    codebook_usage,
    cosine,
    kl_to_uniform,
    schedules,
    train_dvae,
    usage_kl,
)
from beit.tokenize.loading import load_tokenizer, save_tokenizer

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")
MICRO = DVAEConfig(input_size=16, downsample=4, vocab_size=32, hidden=16, codebook_dim=8, num_resblocks=1)


@pytest.fixture(scope="module")
def tiles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six scikit-image photos cut into non-overlapping 64-px tiles (465 PNG files)."""
    root = tmp_path_factory.mktemp("tiles")
    for name in PHOTOS:
        photo = getattr(skdata, name)()
        for r in range(0, photo.shape[0] - 63, 64):
            for c in range(0, photo.shape[1] - 63, 64):
                Image.fromarray(photo[r : r + 64, c : c + 64]).save(root / f"{name}_{r:04d}_{c:04d}.png")
    return root


@pytest.fixture(scope="module")
def few(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight photo crops in nested folders, for the quick runs."""
    root = tmp_path_factory.mktemp("few")
    for i, name in enumerate(PHOTOS[:4]):
        photo = getattr(skdata, name)()
        for j in range(2):
            (root / name).mkdir(exist_ok=True)
            Image.fromarray(photo[j * 48 : j * 48 + 96, 40:136]).save(root / name / f"{i}_{j}.png")
    return root


def images_of(folder: Path, size: int, every: int = 1) -> torch.Tensor:
    paths = sorted(folder.rglob("*.png"))[::every]
    lanczos = Image.Resampling.LANCZOS
    arrays = [np.asarray(Image.open(p).convert("RGB").resize((size, size), lanczos)) for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def micro_cfg(**overrides) -> DVAETrainConfig:
    base = dict(
        steps=6,
        batch_size=4,
        num_workers=0,
        log_every=1,
        checkpoint_every=3,
        warmup_steps=2,
        kl_warmup_steps=2,
        crop_scale=(0.5, 1.0),
    )
    return DVAETrainConfig(**{**base, **overrides})


def test_config_presets_and_validation() -> None:
    tiny, base = dvae_config("tiny"), dvae_config("base")
    assert (tiny.input_size, tiny.grid, tiny.vocab_size) == (32, 8, 512)  # pairs with the tiny BEiT preset
    assert (base.input_size, base.grid, base.vocab_size) == (112, 14, 8192)  # the official customized one
    assert dvae_config("tiny", vocab_size=128, hidden=None).vocab_size == 128
    for bad in (dict(downsample=6), dict(input_size=30, downsample=4), dict(vocab_size=1)):
        with pytest.raises(BeitError):
            DVAEConfig(**bad)
    with pytest.raises(BeitError, match="unknown dVAE preset"):
        dvae_config("huge")
    assert DVAEConfig.from_dict(tiny.to_dict()) == tiny


def test_model_shapes_and_straight_through() -> None:
    torch.manual_seed(0)
    model = DiscreteVAE(dvae_config("tiny", hidden=16, codebook_dim=8))
    x = torch.randn(2, 3, 32, 32)
    recon, logits = model(x, temperature=1.0)
    assert recon.shape == (2, 3, 32, 32) and logits.shape == (2, 512, 8, 8)
    # straight-through: the decoder sees exactly one codebook row per cell, gradients still flow
    torch.manual_seed(1)
    hard, _ = model(x, temperature=0.5, straight_through=True)
    torch.manual_seed(1)
    sample = F.gumbel_softmax(logits, tau=0.5, hard=True, dim=1)
    assert torch.allclose(hard, model.decode_ids(sample.argmax(dim=1)), atol=1e-5)
    hard.mean().backward()
    assert model.encoder[0].weight.grad.abs().sum() > 0


def test_losses_and_schedules_against_direct_formulas() -> None:
    logits = torch.randn(2, 16, 3, 3)
    q = torch.distributions.Categorical(logits=logits.permute(0, 2, 3, 1))
    uniform = torch.distributions.Categorical(logits=torch.zeros(16))
    kl = torch.distributions.kl_divergence(q, uniform).mean()
    assert torch.allclose(kl_to_uniform(logits), kl, atol=1e-6)
    q_mean = torch.distributions.Categorical(probs=q.probs.reshape(-1, 16).mean(0))
    assert torch.allclose(usage_kl(logits), torch.distributions.kl_divergence(q_mean, uniform), atol=1e-6)
    assert codebook_usage(torch.tensor([5, 5, 5, 5, 0, 0, 0, 0])) == pytest.approx((4.0, 0.5))
    entropy = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    assert codebook_usage(torch.tensor([9, 1]))[0] == pytest.approx(math.exp(entropy))

    cfg = DVAETrainConfig(steps=100, warmup_steps=10, kl_weight=2.0, kl_warmup_steps=20, lr=1e-3, min_lr=1e-5)
    assert cosine(1.0, 1 / 16, 0, 50) == 1.0 and cosine(1.0, 1 / 16, 50, 50) == 1 / 16
    (lr0, tau0, beta0), (lr9, _, _), (_, _, beta19) = (schedules(cfg, s) for s in (0, 9, 19))
    assert lr0 == pytest.approx(1e-4) and lr9 == pytest.approx(1e-3) and tau0 == 1.0
    assert beta0 == pytest.approx(0.1) and beta19 == pytest.approx(2.0)
    assert schedules(cfg, 49)[1] == pytest.approx((1 + 1 / 16) / 2, rel=0.02)  # cosine midpoint
    assert schedules(cfg, 99)[:2] == pytest.approx((1e-5, 1 / 16))  # final values at the last step


def test_tokenizer_encode_matches_model_and_saves_losslessly(tmp_path: Path, few: Path) -> None:
    torch.manual_seed(0)
    model = DiscreteVAE(MICRO).eval()
    tok = DVAETokenizer(model)
    assert isinstance(tok, Tokenizer)
    images = images_of(few, 16)
    ids = tok.encode(images)
    normalized = (images.float() / 255 - 0.5) / 0.5  # the official customized tokenizer's Normalize(0.5, 0.5)
    with torch.no_grad():
        expected = model.encoder(normalized).argmax(dim=1)
    assert ids.dtype == torch.int64 and ids.shape == (8, 4, 4) and torch.equal(ids, expected)
    fp = tok.fingerprint()
    assert fp["name"] == "dvae" and "0.5" in fp["pixel_mapping"] and (fp["grid"], fp["input_size"]) == (4, 16)

    directory = save_tokenizer(model, tmp_path / "tok")
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]
    info = json.loads((directory / "config.json").read_text())
    assert info["fingerprint"] == fp and info["model"] == MICRO.to_dict()
    for path in (directory, directory / "model.safetensors"):  # a folder or its weights file alone
        again = load_tokenizer(path)
        assert again.fingerprint() == fp
        assert torch.equal(again.encode(images), ids)
        assert torch.allclose(again.decode(ids), tok.decode(ids))
    with pytest.raises(BeitError, match="trained for 16 px"):
        load_tokenizer(directory, input_size=32)
    beit_model = save_checkpoint(create_model("tiny", mim=True), tmp_path / "beit-run")
    with pytest.raises(BeitError, match="holds BEiT model weights"):  # a common mix-up of directories
        load_tokenizer(beit_model)

    torch.manual_seed(1)
    assert DVAETokenizer(DiscreteVAE(MICRO)).fingerprint()["weights_sha256"] != fp["weights_sha256"]


def test_must_show_training_on_real_photos(tmp_path: Path, tiles: Path, one_thread: None) -> None:
    """Reconstruction error falls well below its start; most of the codebook is used (numbers printed)."""
    model_cfg = DVAEConfig(input_size=32, downsample=4, vocab_size=128, hidden=32, codebook_dim=32)
    cfg = DVAETrainConfig(
        steps=150,
        batch_size=24,
        lr=3e-3,
        warmup_steps=15,
        kl_warmup_steps=15,
        num_workers=0,
        log_every=50,
        checkpoint_every=1000,
    )
    evaluation = images_of(tiles, 32, every=3)  # 155 tiles x 64 cells

    def measure(tok: DVAETokenizer) -> tuple[float, float]:
        ids = tok.encode(evaluation)
        mse = (tok.decode(ids) - evaluation.float() / 255).pow(2).mean().item()
        return mse, ids.unique().numel() / tok.vocab_size

    torch.manual_seed(cfg.seed)  # the trainer's initial weights
    mse_start, used_start = measure(DVAETokenizer(DiscreteVAE(model_cfg).eval()))
    summary = train_dvae(tiles, tmp_path / "run", model_cfg, cfg, device="cpu")
    mse_end, used_end = measure(load_tokenizer(tmp_path / "run"))
    print(
        f"\ndVAE on {len(list(tiles.iterdir()))} photo tiles, 150 steps: reconstruction MSE "
        f"{mse_start:.4f} -> {mse_end:.4f} (PSNR {-10 * math.log10(mse_start):.1f} -> "
        f"{-10 * math.log10(mse_end):.1f} dB); codes used {used_start:.0%} -> {used_end:.0%} of 128"
    )
    assert summary["step"] == 150 and summary["skipped_images"] == 0
    assert mse_end < 0.3 * mse_start
    assert used_end >= 0.6
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [50, 100, 150]
    assert log[-1]["recon_loss"] < 0.5 * log[0]["recon_loss"]
    assert log[0]["temperature"] > log[-1]["temperature"] == pytest.approx(1 / 16)
    keys = {"recon_loss", "kl", "usage_kl", "temperature", "kl_weight", "lr", "perplexity", "codes_used"}
    assert keys <= set(log[-1])


def test_resume_continues_bit_for_bit(tmp_path: Path, few: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    whole = train_dvae(few, tmp_path / "whole", MICRO, micro_cfg(), device="cpu")
    # the same run killed during step 5 (checkpoint at step 3, log written up to step 4), with a log
    # line cut short; then resumed, with a decoding worker this time
    real = dvae_train.schedules

    def crash_at_step_5(cfg: DVAETrainConfig, step: int) -> tuple[float, float, float]:
        if step == 4:
            raise KeyboardInterrupt
        return real(cfg, step)

    monkeypatch.setattr(dvae_train, "schedules", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train_dvae(few, tmp_path / "parts", MICRO, micro_cfg(), device="cpu")
    monkeypatch.setattr(dvae_train, "schedules", real)
    with open(tmp_path / "parts" / "train_log.jsonl", "a") as f:
        f.write('{"step": 5, "recon_lo')
    with pytest.raises(BeitError, match="--resume"):
        train_dvae(few, tmp_path / "parts", MICRO, micro_cfg(), device="cpu")
    resumed = train_dvae(few, tmp_path / "parts", None, micro_cfg(num_workers=1), resume=True, device="cpu")

    assert whole["step"] == resumed["step"] == 6
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("whole", "parts"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # workers or not, resumed or not
    logs = [
        [json.loads(x) for x in (tmp_path / d / "train_log.jsonl").read_text().splitlines()]
        for d in ("whole", "parts")
    ]
    assert [r["step"] for r in logs[1]] == [1, 2, 3, 4, 5, 6]
    assert [r["recon_loss"] for r in logs[1]] == [r["recon_loss"] for r in logs[0]]
    state = torch.load(tmp_path / "parts" / "train_state.pt", weights_only=True)  # tensors and dicts only
    assert state["step"] == 6
    assert not [p for p in (tmp_path / "parts").iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(BeitError, match="nothing to resume"):
        train_dvae(few, tmp_path / "fresh", None, micro_cfg(), resume=True, device="cpu")


def test_bad_images_are_skipped_and_counted(tmp_path: Path, few: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for path in sorted(few.rglob("*.png"))[:4]:
        (data / path.name).write_bytes(path.read_bytes())
    (data / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    Image.new("RGB", (4, 4)).save(data / "tiny.png")
    summary = train_dvae(data, tmp_path / "run", MICRO, micro_cfg(steps=3, batch_size=6), device="cpu")
    assert summary["skipped_images"] == 2
    assert set(summary["skipped"]) == {str(data / "truncated.jpg"), str(data / "tiny.png")}
    assert "too small" in summary["skipped"][str(data / "tiny.png")]
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["skipped_images"] == 2

    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "a.jpg").write_bytes(b"junk")
    with pytest.raises(BeitError, match="none of the 1 images"):
        train_dvae(only_bad, tmp_path / "run2", MICRO, micro_cfg(), device="cpu")
    with pytest.raises(BeitError, match="no images found"):
        train_dvae(tmp_path / "run", tmp_path / "run3", MICRO, micro_cfg(), device="cpu")


def test_cli_train_resume_and_reconstruct(tmp_path: Path, few: Path, run_cli) -> None:
    out = str(tmp_path / "tok")
    shape = [
        "--preset",
        "tiny",
        "--input-size",
        "16",
        "--vocab-size",
        "32",
        "--hidden",
        "16",
        "--codebook-dim",
        "8",
        "--workers",
        "0",
        "--batch-size",
        "4",
        "--log-every",
        "1",
    ]
    code, text, _ = run_cli("tokenizer", "train", "--data", str(few), "--out", out, *shape, "--steps", "2")
    assert code == 0 and "step 2: reconstruction loss" in text
    code, _, err = run_cli("tokenizer", "train", "--data", str(few), "--out", out, *shape)
    assert code == 2 and err.count("\n") == 1 and "--resume" in err
    code, text, _ = run_cli(
        "tokenizer",
        "train",
        "--data",
        str(few),
        "--out",
        out,
        "--resume",
        "--steps",
        "3",
        "--workers",
        "0",
        "--batch-size",
        "4",
    )
    assert code == 0 and "step 3" in text

    grid = tmp_path / "grid.png"
    code, text, _ = run_cli(
        "tokenizer",
        "reconstruct",
        "--tokenizer",
        out,
        "--images",
        str(few),
        "--out",
        str(grid),
        "--limit",
        "3",
    )
    assert code == 0 and "mean PSNR" in text and grid.is_file()
    assert Image.open(grid).size == (2 + 3 * (16 + 2), 2 + 2 * (16 + 2))
    code, text, _ = run_cli("tokenizer", "info", out)
    assert code == 0 and json.loads(text)["fingerprint"] == load_tokenizer(out).fingerprint()
