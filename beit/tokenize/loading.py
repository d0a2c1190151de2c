"""Find, load and save tokenizers: `load_tokenizer(path)` detects what `path` holds.

Accepted:
- a DALL-E `encoder.pkl` (read by safe unpickling) or its `.safetensors` conversion; a `decoder.pkl` /
  `decoder.safetensors` beside an `encoder.*` file is loaded too, so that `decode` works;
- a directory holding those files (`beit tokenizer fetch-dalle` / `convert` output);
- one of our dVAE directories (`model.safetensors` + `config.json`, from `beit tokenizer train` or
  `save_tokenizer`), or that `model.safetensors` alone (its metadata carries the config).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
import torchvision.transforms.functional as TF
from dall_e import Decoder, Encoder
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torchvision.transforms import InterpolationMode
from torchvision.utils import make_grid

from beit.errors import BeitError
from beit.shards.format import write_atomic
from beit.tokenize.dalle import (
    DALLE_INPUT_SIZE,
    DalleTokenizer,
    load_dalle_weights,
    safetensors_kind,
    save_dalle_safetensors,
)
from beit.tokenize.dvae import DiscreteVAE, DVAEConfig, DVAETokenizer
from beit.tokenize.job import BadItem, load_rgb, scan_source

DVAE_KIND = "dvae"
DVAE_WEIGHTS = "model.safetensors"
DVAE_CONFIG = "config.json"
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # larger images are skipped, as by the tokenize job


def _first_existing(directory: Path, names: tuple[str, ...]) -> Path | None:
    return next((directory / n for n in names if (directory / n).is_file()), None)


def _dalle(encoder_path: Path, input_size: int | None, with_decoder: bool) -> DalleTokenizer:
    encoder = load_dalle_weights(encoder_path)
    if not isinstance(encoder, Encoder):
        raise BeitError(f"{encoder_path} is a DALL-E decoder; pass the encoder (encoder.pkl) instead")
    decoder = None
    siblings = ("decoder.safetensors", "decoder.pkl")
    decoder_path = _first_existing(encoder_path.parent, siblings) if encoder_path.stem == "encoder" else None
    if with_decoder and decoder_path is not None:
        decoder = load_dalle_weights(decoder_path)
        if not isinstance(decoder, Decoder):
            raise BeitError(f"{decoder_path} does not hold a DALL-E decoder")
    return DalleTokenizer(encoder, decoder, input_size=input_size or DALLE_INPUT_SIZE)


def _dvae(weights: Path, input_size: int | None) -> DVAETokenizer:
    with safe_open(str(weights), framework="pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    try:
        config = DVAEConfig.from_dict(json.loads(meta["beit.dvae_config"]))
    except (KeyError, ValueError, TypeError):
        hint = "re-save it with save_tokenizer"
        if any(key.startswith(("blocks.", "patch_embed.")) for key in state):
            hint = "it holds BEiT model weights: pass a DALL-E encoder or a dVAE from `beit tokenizer train`"
        raise BeitError(f"{weights} lacks a valid dVAE config in its metadata; {hint}") from None
    if input_size is not None and input_size != config.input_size:
        raise BeitError(f"the dVAE at {weights} was trained for {config.input_size} px, not {input_size} px")
    model = DiscreteVAE(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise BeitError(f"{weights} does not match its dVAE config ({str(err).splitlines()[0]})") from None
    return DVAETokenizer(model.eval().requires_grad_(False))


def load_tokenizer(
    path: str | Path, *, input_size: int | None = None, with_decoder: bool = True
) -> DalleTokenizer | DVAETokenizer:
    """Load a tokenizer (on the CPU; use `.to(device)`) from any of the forms in the module docstring.

    `input_size` sets the DALL-E encoder's input (default 112 -> 14×14; any multiple of 8); a dVAE has a
    fixed one. `with_decoder=False` skips the (large) DALL-E decoder when only `encode` is needed.
    """
    path = Path(path)
    if not path.exists():
        raise BeitError(f"tokenizer not found: {path}")
    if path.is_dir():
        if (path / DVAE_WEIGHTS).is_file():
            return _dvae(path / DVAE_WEIGHTS, input_size)
        encoder = _first_existing(path, ("encoder.safetensors", "encoder.pkl"))
        if encoder is None:
            raise BeitError(
                f"no tokenizer in {path}: expected {DVAE_WEIGHTS} + {DVAE_CONFIG} (our dVAE) or "
                "encoder.pkl / encoder.safetensors (DALL-E; get them with `beit tokenizer fetch-dalle`)"
            )
        return _dalle(encoder, input_size, with_decoder)
    if path.suffix == ".safetensors" and safetensors_kind(path) == DVAE_KIND:
        return _dvae(path, input_size)
    return _dalle(path, input_size, with_decoder)


def save_tokenizer(
    tokenizer: DiscreteVAE | DVAETokenizer | DalleTokenizer,
    directory: str | Path,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a tokenizer directory that `load_tokenizer` reads back; returns the directory.

    dVAE: `model.safetensors` (config in its metadata) + `config.json` (config, fingerprint, `extra`).
    DALL-E: `encoder.safetensors` (+ `decoder.safetensors`). Every file is replaced atomically.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(tokenizer, DalleTokenizer):
        save_dalle_safetensors(tokenizer.encoder, directory / "encoder.safetensors")
        if tokenizer.decoder is not None:
            save_dalle_safetensors(tokenizer.decoder, directory / "decoder.safetensors")
        return directory
    model = tokenizer.model if isinstance(tokenizer, DVAETokenizer) else tokenizer
    config = model.config.to_dict()
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"beit.kind": DVAE_KIND, "beit.dvae_config": json.dumps(config)}
    write_atomic(directory / DVAE_WEIGHTS, safetensors_bytes(state, metadata=metadata))
    info = {
        "kind": DVAE_KIND,
        "model": config,
        "fingerprint": DVAETokenizer(model).fingerprint(),
        "reconstruction_loss": "mse on normalize(0.5, 0.5) pixels",
        **(extra or {}),
    }
    write_atomic(directory / DVAE_CONFIG, (json.dumps(info, indent=2) + "\n").encode())
    return directory


def reconstruct_files(
    tokenizer: DalleTokenizer | DVAETokenizer, sources: list[str | Path], out: str | Path, limit: int = 16
) -> dict[str, Any]:
    """Encode and decode up to `limit` images (files, or folders searched recursively), each resized
    (shorter side, Lanczos) and centre-cropped to the tokenizer's input size; write a PNG grid with the
    originals in the top row and the reconstructions below; return the PSNR of every image and the mean.
    """
    if not tokenizer.has_decoder:
        raise BeitError(
            "this tokenizer has no decoder: put decoder.pkl (or decoder.safetensors) beside encoder.pkl "
            "(`beit tokenizer fetch-dalle` downloads both)"
        )
    paths: list[Path] = []
    for source in map(Path, sources):
        if source.is_dir():
            root, entries = scan_source(source)
            paths += [root / rel for rel, _ in entries]
        elif source.is_file():
            paths.append(source)
        else:
            raise BeitError(f"no such image or folder: {source}")
    size, images, used, skipped = tokenizer.input_size, [], [], {}
    for path in paths:
        if len(images) == limit:
            break
        try:
            image, _ = load_rgb(path, MAX_PIXELS)
        except BadItem as err:
            skipped[str(path)] = str(err)
            continue
        image = TF.center_crop(TF.resize(image, size, InterpolationMode.LANCZOS), [size, size])
        images.append(TF.pil_to_tensor(image))
        used.append(str(path))
    if not images:
        raise BeitError(f"none of the {len(paths)} images could be read: {skipped}")
    batch = torch.stack(images)  # uint8 [N,3,S,S]
    original = batch.float() / 255
    recon = tokenizer.decode(tokenizer.encode(batch)).cpu()  # float [N,3,S,S] in [0,1]
    mse = (recon - original).pow(2).flatten(1).mean(1)
    psnr = (10 * torch.log10(1 / mse.clamp(min=1e-10))).tolist()
    grid = make_grid(torch.cat([original, recon]), nrow=len(images), padding=2, pad_value=1.0)
    buf = io.BytesIO()
    Image.fromarray(grid.mul(255).round().byte().permute(1, 2, 0).numpy()).save(buf, format="PNG")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, buf.getvalue())
    mean = sum(psnr) / len(psnr)
    return {"out": str(out), "images": used, "psnr": psnr, "mean_psnr": mean, "skipped": skipped}
