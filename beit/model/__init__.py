"""The BEiT model: backbone and heads (`vit`), checkpoint I/O, and `create_model`."""

from __future__ import annotations

from typing import Any

from beit.config import ModelConfig, model_config
from beit.model.vit import BEiT


def create_model(
    preset_or_config: str | ModelConfig = "base",
    *,
    mim: bool | None = None,
    num_classes: int | None = None,
    **overrides: Any,
) -> BEiT:
    """Build a BEiT model from a preset name ("tiny", "small", "base", "large") or a `ModelConfig`.

    `mim=True` gives the pretraining layout (shared relative bias, mask token, `lm_head`); otherwise the
    fine-tuning layout with a `num_classes`-way head (0: the model returns pooled features). `mim` and
    `num_classes` left as None keep the config's values; other keyword arguments override config fields.
    """
    if mim is not None:
        overrides["mim"] = mim
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    if isinstance(preset_or_config, ModelConfig):
        cfg = preset_or_config.replace(**overrides)
    else:
        cfg = model_config(preset_or_config, **overrides)
    return BEiT(cfg)


__all__ = ["BEiT", "ModelConfig", "create_model", "model_config"]
