"""Model configuration: the `ModelConfig` dataclass, the named presets, TOML loading and validation.

A config names every architectural choice of the BEiT Vision Transformer (REFERENCE.md §5), so a
checkpoint's `config.json` rebuilds exactly the model that wrote it. Every user mistake (an unknown preset
or key, an image size the patch size does not divide, a width the heads do not divide) raises `BeitError`
with one line naming the problem and the fix.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from beit.errors import BeitError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


@dataclass(frozen=True)
class ModelConfig:
    """The BEiT ViT architecture. Defaults are BEiT-B/16 at 224 px (`beit_base_patch16_224`).

    `mim=True` builds the pretraining layout (mask token, final norm, `lm_head`, pretraining init);
    otherwise the fine-tuning layout (mean pooling → `fc_norm` → `head`, fine-tuning init).
    `shared_rel_pos_bias=None` follows the layout: one shared relative-position table in pretraining,
    one per block in fine-tuning. `layer_scale_init=0` disables LayerScale (no `gamma_*` weights).
    """

    image_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    vocab_size: int = 8192
    num_classes: int = 0
    layer_scale_init: float = 0.1
    use_abs_pos_emb: bool = False
    use_rel_pos_bias: bool = True
    shared_rel_pos_bias: bool | None = None
    use_mean_pooling: bool = True
    mim: bool = False
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    head_init_scale: float = 0.001

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def grid(self) -> int:
        """Patches per side (14 for 224 px / patch 16)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Patches per image, N = grid² (196 for 224 px / patch 16)."""
        return self.grid**2

    @property
    def rel_pos_shared(self) -> bool:
        """True when one relative-position table is shared by all blocks (the pretraining layout)."""
        if not self.use_rel_pos_bias:
            return False
        return self.mim if self.shared_rel_pos_bias is None else self.shared_rel_pos_bias

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serializable dict (the `model` entry of a checkpoint's config.json)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Rebuild from `to_dict()` output; unknown keys raise `BeitError`."""
        _check_keys(values, "model config")
        return cls(**values)

    def replace(self, **overrides: Any) -> ModelConfig:
        """A copy with some fields changed (validated like a new config)."""
        _check_keys(overrides, "model override")
        return dataclasses.replace(self, **overrides)


PRESETS: dict[str, dict[str, Any]] = {
    # CPU demos and tests: 32 px, patch 4 → 8×8 grid; pairs with the tiny dVAE (vocab 512, 8×8 tokens).
    "tiny": dict(image_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, vocab_size=512),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16, layer_scale_init=1e-5),
}


def model_config(preset: str = "base", **overrides: Any) -> ModelConfig:
    """The named preset with `overrides` applied, e.g. `model_config("base", image_size=384)`."""
    if preset not in PRESETS:
        raise BeitError(f"unknown model preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    _check_keys(overrides, "model override")
    return ModelConfig(**{**PRESETS[preset], **overrides})


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file into a dict; a missing or malformed file raises `BeitError`."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise BeitError(f"config file {path} does not exist; check the path") from None
    except OSError as err:  # a directory, no permission
        raise BeitError(f"cannot read config file {path}: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise BeitError(f"config file {path} is not valid TOML: {err}") from None


def _check_keys(values: dict[str, Any], what: str) -> None:
    known = [f.name for f in fields(ModelConfig)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise BeitError(f"unknown {what} key(s) {', '.join(unknown)}; valid keys: {', '.join(known)}")


_INT_FIELDS = ("image_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "vocab_size")
_RATE_FIELDS = ("drop_rate", "attn_drop_rate", "drop_path_rate")
_BOOL_FIELDS = ("use_abs_pos_emb", "use_rel_pos_bias", "use_mean_pooling", "mim")


def _validate(cfg: ModelConfig) -> None:
    def bad(message: str) -> BeitError:
        return BeitError(f"invalid model config: {message}")

    for name in _INT_FIELDS:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise bad(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(cfg.num_classes, int) or isinstance(cfg.num_classes, bool) or cfg.num_classes < 0:
        raise bad(f"num_classes must be an integer ≥ 0 (0 = no head), got {cfg.num_classes!r}")
    for name in _BOOL_FIELDS:
        if not isinstance(getattr(cfg, name), bool):
            raise bad(f"{name} must be true or false, got {getattr(cfg, name)!r}")
    if cfg.shared_rel_pos_bias is not None and not isinstance(cfg.shared_rel_pos_bias, bool):
        raise bad(f"shared_rel_pos_bias must be true, false or unset, got {cfg.shared_rel_pos_bias!r}")
    for name in (*_RATE_FIELDS, "mlp_ratio", "layer_scale_init", "head_init_scale"):
        value = getattr(cfg, name)
        if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
            raise bad(f"{name} must be a number ≥ 0, got {value!r}")
    for name in _RATE_FIELDS:
        if getattr(cfg, name) >= 1:
            raise bad(f"{name} must be below 1, got {getattr(cfg, name)!r}")
    if cfg.image_size % cfg.patch_size:
        raise bad(
            f"image_size {cfg.image_size} is not divisible by patch_size {cfg.patch_size}; "
            f"use a multiple such as {cfg.image_size // cfg.patch_size * cfg.patch_size or cfg.patch_size}"
        )
    if cfg.embed_dim % cfg.num_heads:
        raise bad(f"embed_dim {cfg.embed_dim} is not divisible by num_heads {cfg.num_heads}")
    if int(cfg.embed_dim * cfg.mlp_ratio) < 1:
        raise bad(f"mlp_ratio {cfg.mlp_ratio} gives an empty MLP for embed_dim {cfg.embed_dim}")
    if cfg.mim and cfg.num_classes:
        raise bad("a MIM (pretraining) model has no classification head; set num_classes=0 or mim=false")


# ---- pretraining (engineer P) ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PretrainConfig:
    """Everything `beit pretrain` needs. Defaults are the official base recipe (REFERENCE.md §7.1); the
    `PRETRAIN_PRESETS` entry of the model preset and then a TOML file and the CLI override them.

    `batch_size` is per process: the total batch is batch_size × grad_accum × processes, and `lr` is
    the peak for that total (the official 1.5e-3 is for 2048; scale it linearly for other totals).
    Unset mask sizes scale the official 75-of-196 / blocks-of-16 to the grid (see `scaled_mask_size`).
    `model` holds extra `ModelConfig` overrides (e.g. {"depth": 2}); `drop_path` and `layer_scale`
    (None: the preset's 0.1, or 1e-5 for large) are the two the recipe names.
    """

    shards: str = ""
    output: str = "runs/pretrain"
    preset: str = "base"
    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    split: str | None = "train"
    steps: int = 500_000  # 800 epochs of IN-1k at a total batch of 2048 (625 steps an epoch)
    warmup_steps: int = 6_250  # 10 epochs, as the official IN-1k recipe (its IN-22k one: 10,000 steps)
    batch_size: int = 128
    grad_accum: int = 1
    lr: float = 1.5e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    weight_decay_end: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float = 3.0
    drop_path: float = 0.1
    layer_scale: float | None = None
    num_masked: int | None = None
    min_block: int | None = None
    max_block: int | None = None
    min_aspect: float = 0.3
    random_masking: bool = False
    normalization: str = "half"
    mixed_precision: str = "no"
    compile: bool = False
    num_workers: int = 8
    shuffle_buffer: int = 1000
    epoch_batches: int | None = None
    seed: int = 0
    save_every: int = 5000
    keep_last: int = 3
    log_every: int = 10
    tensorboard: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))
        _validate_pretrain(self)

    def model_config(self) -> ModelConfig:
        """The pretraining (MIM) model these settings describe."""
        overrides = {"mim": True, "drop_path_rate": self.drop_path, **self.model}
        if self.layer_scale is not None:
            overrides["layer_scale_init"] = self.layer_scale
        return model_config(self.preset, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serializable dict (written to the run directory and into checkpoints)."""
        return {**dataclasses.asdict(self), "betas": list(self.betas)}


PRETRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # A CPU-sized run on the tiny model (a few minutes): short warmup, a higher lr for the small batch.
    "tiny": dict(
        steps=300,
        warmup_steps=30,
        batch_size=64,
        lr=2e-3,
        num_workers=2,
        shuffle_buffer=500,
        save_every=100,
        log_every=10,
    ),
    "small": {},
    "base": {},
    "large": dict(clip_grad=1.0),  # paper Table 12: 3.0 for base, 1.0 for large
}


def pretrain_config(toml: str | Path | None = None, **overrides: Any) -> PretrainConfig:
    """Preset defaults < TOML file (flat keys, plus a `[model]` table) < `overrides` (None values ignored);
    the model overrides of the file and of `overrides` merge key by key. The preset is
    `overrides["preset"]`, else the file's `preset`, else "base"."""
    from_file = load_toml(toml) if toml is not None else {}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    preset = overrides.get("preset", from_file.get("preset", "base"))
    if not isinstance(preset, str) or preset not in PRETRAIN_PRESETS:
        raise BeitError(f"unknown model preset {preset!r}; choose one of: {', '.join(PRETRAIN_PRESETS)}")
    values = {**PRETRAIN_PRESETS[preset], **from_file, **overrides, "preset": preset}
    if isinstance(from_file.get("model"), dict) and isinstance(overrides.get("model"), dict):
        values["model"] = {**from_file["model"], **overrides["model"]}
    known = [f.name for f in fields(PretrainConfig)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise BeitError(f"unknown pretraining option(s) {', '.join(unknown)}; valid: {', '.join(known)}")
    return PretrainConfig(**values)


def _validate_pretrain(cfg: PretrainConfig) -> None:
    def bad(message: str) -> BeitError:
        return BeitError(f"invalid pretraining config: {message}")

    def number(value: Any) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool)

    if cfg.preset not in PRESETS:
        raise bad(f"unknown preset {cfg.preset!r}; choose one of: {', '.join(PRESETS)}")
    if not isinstance(cfg.model, dict):
        raise bad(f"model must be a table of model overrides, got {cfg.model!r}")
    _check_keys(cfg.model, "model override")
    if cfg.model.get("mim", True) is not True:
        raise bad("pretraining trains the masked-image-modeling layout; drop the mim=false model override")
    for name in ("shards", "output", "normalization", "mixed_precision"):
        if not isinstance(getattr(cfg, name), str):
            raise bad(f"{name} must be a string, got {getattr(cfg, name)!r}")
    if cfg.split is not None and not isinstance(cfg.split, str):
        raise bad(f"split must be a string, got {cfg.split!r}")
    positive = ("steps", "batch_size", "grad_accum", "save_every", "keep_last", "log_every", "shuffle_buffer")
    for name in positive:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise bad(f"{name} must be a positive integer, got {value!r}")
    for name in ("warmup_steps", "num_workers", "seed"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise bad(f"{name} must be an integer ≥ 0, got {value!r}")
    if cfg.warmup_steps >= cfg.steps:
        raise bad(
            f"warmup_steps ({cfg.warmup_steps}) must be below steps ({cfg.steps}); "
            "pass a shorter --warmup-steps (the official recipe warms up over 1.25% of the steps)"
        )
    for name in ("num_masked", "min_block", "max_block", "epoch_batches"):
        value = getattr(cfg, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise bad(f"{name} must be a positive integer or unset, got {value!r}")
    for name in ("lr", "min_lr", "weight_decay", "eps", "clip_grad", "drop_path"):
        if not number(getattr(cfg, name)) or getattr(cfg, name) < 0:
            raise bad(f"{name} must be a number ≥ 0, got {getattr(cfg, name)!r}")
    for name in ("weight_decay_end", "layer_scale"):
        value = getattr(cfg, name)
        if value is not None and (not number(value) or value < 0):
            raise bad(f"{name} must be a number ≥ 0 or unset, got {value!r}")
    if len(cfg.betas) != 2 or not all(number(b) and 0 <= b < 1 for b in cfg.betas):
        raise bad(f"betas must be two numbers in [0, 1), got {cfg.betas!r}")
    if not number(cfg.min_aspect) or not 0 < cfg.min_aspect <= 1:
        raise bad(f"min_aspect must be in (0, 1], got {cfg.min_aspect!r}")
    if cfg.mixed_precision not in ("no", "bf16", "fp16"):
        raise bad(f"mixed_precision must be no, bf16 or fp16, got {cfg.mixed_precision!r}")
    for name in ("random_masking", "compile", "tensorboard"):
        if not isinstance(getattr(cfg, name), bool):
            raise bad(f"{name} must be true or false, got {getattr(cfg, name)!r}")
