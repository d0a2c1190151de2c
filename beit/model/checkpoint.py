"""Checkpoint I/O: our `model.safetensors` + `config.json` directories, official unilm and timm files.

Weight names follow the official BEiT / timm layout (REFERENCE §6), so one loader reads all of them:

- our directory (`config.json` rebuilds the model) or a `.safetensors` file (ours or timm's);
- an official `.pth` (`*_pt22k.pth`: {'model', 'optimizer', 'epoch', 'scaler', 'args'}; `*_ft22kto1k.pth`;
  ADE20K files under 'state_dict' with a `backbone.` prefix), read with `torch.load(weights_only=True)`:
  only `argparse.Namespace` (the official 'args') is allowed beyond plain tensors and containers.

Loading into a given model converts between layouts the way the official fine-tuning script does (§6.5):
the shared pretraining table is copied into every block, tables and `pos_embed` are resampled to the
model's patch grid, a head of another shape is dropped, keys the target layout does not use (`lm_head`,
`mask_token`, `norm`, a segmentation head) are reported and ignored. Unlike the official non-strict load,
any other missing or unexpected key is an error, so a checkpoint without LayerScale or tables never
silently leaves them at their initial values.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pickle
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from beit.config import ModelConfig
from beit.errors import BeitError
from beit.model.resample import resample_abs_pos_embed, resample_rel_pos_table, table_side
from beit.model.vit import BEiT

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"
BLOCK_TABLE = "attn.relative_position_bias_table"  # blocks.{i}.attn.relative_position_bias_table
# Keys a layout change leaves behind: the pretraining head, the pooling/classifier of the other layout,
# and segmentation heads. They are reported and ignored; any other unexpected key is an error.
_LAYOUT_PREFIXES = (
    "lm_head.",
    "mask_token",
    "norm.",
    "fc_norm.",
    "head.",
    "decode_head.",
    "auxiliary_head.",
    "fpn",
)
# Freshly initialized when a pretrained backbone is fine-tuned: their absence is not an error.
_FRESH_PREFIXES = ("fc_norm.", "head.")


# ---- saving ------------------------------------------------------------------------------------------


def save_checkpoint(model: nn.Module, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write `model.safetensors` and `config.json` ({"format_version", "model": config, **extra}) into
    `directory` (created if needed; other files in it are left alone) and return its path.

    Both files are written under temporary names first; `config.json` is the completion marker: the old one
    is removed before the new weights are renamed into place, and the new one is renamed in last. A crash
    leaves either the previous complete checkpoint or a directory without `config.json`, which
    `load_checkpoint` refuses as incomplete. Non-persistent buffers (`relative_position_index`) are not saved.
    """
    model, directory, extra = _unwrap(model), Path(directory), dict(extra or {})
    clash = sorted({"format_version", "model"} & extra.keys())
    if clash:
        raise BeitError(f"extra checkpoint metadata may not set {', '.join(clash)}; these keys are reserved")
    try:
        config_text = json.dumps(
            {"format_version": FORMAT_VERSION, "model": model.config.to_dict(), **extra}, indent=2
        )
    except TypeError as err:
        raise BeitError(f"extra checkpoint metadata is not JSON-serializable: {err}") from None
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}

    directory.mkdir(parents=True, exist_ok=True)
    suffix = f".tmp-{os.getpid()}"
    weights_tmp = directory / (WEIGHTS_NAME + suffix)
    config_tmp = directory / (CONFIG_NAME + suffix)
    try:
        save_file(state, weights_tmp, metadata={"format": "pt"})
        _fsync(weights_tmp)
        config_tmp.write_text(config_text + "\n")
        _fsync(config_tmp)
        (directory / CONFIG_NAME).unlink(missing_ok=True)  # from here on the directory is incomplete ...
        os.replace(weights_tmp, directory / WEIGHTS_NAME)
        os.replace(config_tmp, directory / CONFIG_NAME)  # ... until this rename
    finally:
        weights_tmp.unlink(missing_ok=True)
        config_tmp.unlink(missing_ok=True)
    return directory


def _unwrap(model: nn.Module) -> BEiT:
    """The BEiT inside `torch.compile` (`_orig_mod`) and DistributedDataParallel (`module`) wrappers,
    whose state-dict keys carry a prefix that no other loader expects."""
    while not isinstance(model, BEiT):
        inner = getattr(model, "_orig_mod", None)
        inner = getattr(model, "module", None) if inner is None else inner
        if not isinstance(inner, nn.Module):
            raise BeitError(f"expected a BEiT model (beit.create_model), got {type(model).__name__}")
        model = inner
    return model


def _fsync(path: Path) -> None:
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


# ---- reading -----------------------------------------------------------------------------------------


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The state dict of any supported checkpoint, normalized to the official key layout (wrappers
    'model' | 'module' | 'state_dict' unwrapped, 'module.' / 'backbone.' prefixes stripped,
    `*relative_position_index` dropped), and our `config.json` contents (None for foreign files)."""
    path = Path(path)
    if not path.exists():
        raise BeitError(f"checkpoint {path} does not exist; check the path")
    if path.is_dir():
        weights = path / WEIGHTS_NAME
        config = _read_config(path)
        if not weights.is_file() or (config is None and not (path / CONFIG_NAME).is_file()):
            missing = WEIGHTS_NAME if not weights.is_file() else CONFIG_NAME
            raise BeitError(
                f"{path} is not a complete checkpoint directory: {missing} is missing "
                "(an interrupted save, or the wrong directory); pass a checkpoint directory or a weights file"
            )
        raw: dict[str, Any] = _load_safetensors(weights)
    elif path.suffix == ".safetensors":
        raw = _load_safetensors(path)
        config = _read_config(path.parent) if path.name == WEIGHTS_NAME else None
    elif path.suffix in PICKLE_SUFFIXES:
        raw, config = _load_pickle(path), None
    else:
        raise BeitError(
            f"{path}: unknown checkpoint format {path.suffix!r}; expected a checkpoint directory, "
            f".safetensors or one of {', '.join(PICKLE_SUFFIXES)}"
        )
    return _normalize(raw, path), config


def _read_config(directory: Path) -> dict[str, Any] | None:
    """Our config.json in `directory`, or None when there is none or it is foreign (e.g. a timm hub file)."""
    file = directory / CONFIG_NAME
    if not file.is_file():
        return None
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BeitError(f"{file} is not valid JSON ({err}); the checkpoint is damaged") from None
    if not isinstance(config, dict) or "format_version" not in config or "model" not in config:
        return None
    if config["format_version"] > FORMAT_VERSION:
        raise BeitError(
            f"{file} has format_version {config['format_version']}, newer than this beit understands "
            f"({FORMAT_VERSION}); upgrade beit"
        )
    return config


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError) as err:
        raise BeitError(f"cannot read {path} as safetensors: {err}") from None


def _load_pickle(path: Path) -> Any:
    """torch.load with weights_only=True: tensors, containers and argparse.Namespace, nothing else."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch names the global either way, depending on whether its module is blocked outright.
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(err))
        if found:
            raise BeitError(
                f"refusing to load {path}: it needs the pickled object {found.group(1)}, and only weights "
                "are loaded (weights_only=True); re-save just its state dict (e.g. as .safetensors) where "
                "you trust the file"
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", str(err), re.DOTALL)
        reason = " ".join((detail.group(1) if detail else str(err)).split())
        raise BeitError(f"cannot read checkpoint {path}: damaged or not plain weights ({reason})") from None
    except (RuntimeError, OSError, EOFError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BeitError(f"cannot read checkpoint {path}: {first_line}") from None


def _normalize(raw: Any, path: Path) -> dict[str, torch.Tensor]:
    state = raw
    for key in ("model", "module", "state_dict"):
        if isinstance(raw, dict) and isinstance(raw.get(key), dict):
            state = raw[key]
            break
    if not isinstance(state, dict):
        raise BeitError(
            f"{path} holds a {type(state).__name__}, not a state dict; it is not a model checkpoint"
        )
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or key.endswith("relative_position_index"):
            continue  # the index is regenerated from the grid (§5.4)
        for prefix in ("module.", "backbone."):
            key = key.removeprefix(prefix)
        out[key] = value
    if not out:
        raise BeitError(
            f"{path} holds no tensors under 'model', 'module' or 'state_dict'; it is not a model checkpoint"
        )
    return out


# ---- the model config of a foreign state dict ---------------------------------------------------------


def infer_model_config(state: dict[str, torch.Tensor]) -> ModelConfig:
    """The `ModelConfig` that an official or timm state dict was made by, read from its shapes.

    Width, depth, patch size and channels from the patch embedding and blocks; the patch grid from a
    relative-position table or `pos_embed`; heads from a table's columns (else width / 64, the head size of
    every official model); LayerScale from `gamma_1`; shared vs per-block tables; `lm_head` → MIM layout
    and vocabulary; `head` → number of classes; `fc_norm` → mean pooling."""
    required = ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight")
    absent = [k for k in required if k not in state]
    if absent:
        sample = ", ".join(sorted(state)[:5])
        raise BeitError(
            f"not a BEiT checkpoint: no {', '.join(absent)} (its keys begin {sample}, ...); "
            "pass a BEiT checkpoint, or a model to load into"
        )
    embed_dim, in_chans, patch_size, _ = state["patch_embed.proj.weight"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    shared = SHARED_TABLE in state
    per_block = f"blocks.0.{BLOCK_TABLE}" in state
    table = state.get(SHARED_TABLE, state.get(f"blocks.0.{BLOCK_TABLE}"))
    if table is not None:
        grid = (table_side(table.shape[0]) + 1) // 2
        num_heads = table.shape[1]
    elif "pos_embed" in state:
        grid = math.isqrt(state["pos_embed"].shape[1] - 1)
        num_heads = max(1, embed_dim // 64)
    else:
        raise BeitError(
            "the checkpoint has neither position embeddings nor tables, so its image size is unknown; "
            "pass a model to load into"
        )
    mim = "lm_head.weight" in state
    return ModelConfig(
        image_size=grid * patch_size,
        patch_size=patch_size,
        in_chans=in_chans,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
        vocab_size=state["lm_head.weight"].shape[0] if mim else ModelConfig.vocab_size,
        num_classes=state["head.weight"].shape[0] if "head.weight" in state and not mim else 0,
        layer_scale_init=(1e-5 if embed_dim >= 1024 else 0.1) if "blocks.0.gamma_1" in state else 0.0,
        use_abs_pos_emb="pos_embed" in state,
        use_rel_pos_bias=shared or per_block,
        shared_rel_pos_bias=None if shared == mim or not (shared or per_block) else shared,
        use_mean_pooling="fc_norm.weight" in state or mim or "norm.weight" not in state,
        mim=mim,
    )


# ---- loading -----------------------------------------------------------------------------------------


def load_checkpoint(path: str | Path, model: nn.Module | None = None, *, strict: bool = True) -> nn.Module:
    """Load a checkpoint (our directory, a .safetensors file, or an official/timm .pth) and return the model.

    With `model=None` the model is built from our config.json, or from the shapes of a foreign state dict
    (`infer_model_config`). With a model, the weights are converted to its layout and patch grid first
    (see the module docstring). A shape mismatch always raises `BeitError` naming every mismatched key
    with both shapes; with `strict` (the default) so does a missing key (other than a fresh `fc_norm` /
    `head`) or an unexpected one that no layout change explains; `strict=False` logs them instead."""
    path = Path(path)
    state, config = read_checkpoint(path)
    if model is None:
        model = BEiT(checkpoint_model_config(state, config))
    _load_state(model, state, strict, path)
    return model


def checkpoint_model_config(state: dict[str, torch.Tensor], config: dict[str, Any] | None) -> ModelConfig:
    """The model config of a `read_checkpoint` result: ours from config.json, else inferred from shapes."""
    return ModelConfig.from_dict(config["model"]) if config else infer_model_config(state)


def convert_checkpoint(source: str | Path, directory: str | Path, **overrides: Any) -> Path:
    """Save any supported checkpoint as our directory, for the same model or one with config `overrides`
    (e.g. `image_size=384`, `mim=False, num_classes=1000`), converting the weights as `load_checkpoint`
    does. Metadata of our source checkpoint is kept; `converted_from` records the source."""
    source = Path(source)
    state, config = read_checkpoint(source)
    model = BEiT(checkpoint_model_config(state, config).replace(**overrides))
    _load_state(model, state, True, source)
    extra = {k: v for k, v in (config or {}).items() if k not in ("format_version", "model")}
    return save_checkpoint(model, directory, extra={**extra, "converted_from": str(source)})


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], strict: bool, path: Path) -> None:
    """Convert `state` to the model's layout, check it (see `load_checkpoint`) and copy it in."""
    model = _unwrap(model)
    target = model.state_dict()
    state = _convert(state, target, path)

    mismatched = [k for k in state if k in target and state[k].shape != target[k].shape]
    if mismatched:
        shapes = {
            k: f"checkpoint {list(state[k].shape)} vs model {list(target[k].shape)}" for k in mismatched
        }
        raise BeitError(
            f"{path} does not fit the model, shape mismatch in {_describe(mismatched, shapes, limit=None)}; "
            "build the model with the checkpoint's settings (or load without a model)"
        )
    missing = [k for k in target if k not in state and not k.startswith(_FRESH_PREFIXES)]
    unexpected = [k for k in state if k not in target and not k.startswith(_LAYOUT_PREFIXES)]
    cls_pooled_head = "head.weight" in state and "norm.weight" in state and "fc_norm.weight" not in state
    if strict and cls_pooled_head and "fc_norm.weight" in target and "head.weight" in target:
        raise BeitError(
            f"{path} holds a classifier trained on the CLS token's features (norm.*, no fc_norm.*) but the "
            "model pools the mean of the patch tokens; build it with use_mean_pooling=False"
        )
    if strict and (missing or unexpected):
        parts = [
            f"missing {_describe(missing)}" if missing else "",
            f"unexpected {_describe(unexpected)}" if unexpected else "",
        ]
        raise BeitError(
            f"{path} does not fit the model: {'; '.join(p for p in parts if p)}; build the model with the "
            "checkpoint's settings (LayerScale, position embeddings, depth) or load without a model"
        )
    if missing or unexpected:
        log.warning(
            "loaded %s non-strictly: missing %s; unexpected %s",
            path,
            _describe(missing),
            _describe(unexpected),
        )
    ignored = [k for k in state if k not in target and k.startswith(_LAYOUT_PREFIXES)]
    if ignored:
        log.info("%s: ignored keys the model's layout does not use: %s", path, _describe(ignored))
    fresh = [k for k in target if k not in state and k.startswith(_FRESH_PREFIXES)]
    if fresh:
        log.info("%s: freshly initialized (not in the checkpoint): %s", path, _describe(fresh))
    model.load_state_dict({k: v for k, v in state.items() if k in target}, strict=False)


def _convert(
    state: dict[str, torch.Tensor], target: dict[str, torch.Tensor], path: Path
) -> dict[str, torch.Tensor]:
    """Convert a state dict to the target's layout and grid (official fine-tuning loader, §6.5 steps 2-6)."""
    state = dict(state)
    block_tables = [k for k in target if k.endswith(BLOCK_TABLE)]
    if (
        SHARED_TABLE in state
        and SHARED_TABLE not in target
        and block_tables
        and not any(k in state for k in block_tables)
    ):
        shared = state.pop(SHARED_TABLE)
        state.update({k: shared.clone() for k in block_tables})
        log.info("%s: copied the shared relative-position table into %d blocks", path, len(block_tables))
    resampled = {}
    for key, value in state.items():
        want = target.get(key)
        if want is None or value.shape == want.shape:
            continue
        if key.endswith("relative_position_bias_table") and value.shape[1] == want.shape[1]:
            state[key] = resample_rel_pos_table(value, want.shape[0])
            resampled[key] = f"{value.shape[0]} -> {want.shape[0]} rows"
        elif key == "pos_embed" and value.shape[2] == want.shape[2]:
            state[key] = resample_abs_pos_embed(value, want.shape[1])
            resampled[key] = f"{value.shape[1]} -> {want.shape[1]} tokens"
    if resampled:
        log.info("%s: resampled to the model's patch grid: %s", path, _describe(resampled, resampled))
    ours, theirs = target.get("head.weight"), state.get("head.weight")
    if ours is not None and theirs is not None and ours.shape != theirs.shape:
        log.warning(
            "%s: dropped the checkpoint's head %s (model: %s); the model keeps its freshly initialized head",
            path,
            list(theirs.shape),
            list(ours.shape),
        )
        state.pop("head.weight")
        state.pop("head.bias", None)
    return state


def _describe(keys: Iterable[str], notes: dict[str, str] | None = None, limit: int | None = 20) -> str:
    """Keys on one line, those of several blocks merged: `blocks.{0..11}.gamma_1` (with a note per key);
    at most `limit` entries (None: all)."""
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    order: list[tuple[str, str]] = []
    for key in keys:
        note = (notes or {}).get(key, "")
        match = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        name, index = (f"blocks.{{}}.{match.group(2)}", int(match.group(1))) if match else (key, -1)
        if (name, note) not in groups:
            order.append((name, note))
        groups[(name, note)].append(index)
    if not order:
        return "(none)"
    items = []
    for name, note in order:
        name = name.replace("{}", _span(groups[(name, note)]))
        items.append(f"{name} ({note})" if note else name)
    if limit is not None and len(items) > limit:
        items = items[:limit] + [f"and {len(items) - limit} more"]
    return ", ".join(items)


def _span(indices: list[int]) -> str:
    """Block indices as `3`, `{0..11}` (a run) or `{0,2,5}`."""
    ordered = sorted(indices)
    if len(ordered) == 1:
        return str(ordered[0])
    if ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"{{{ordered[0]}..{ordered[-1]}}}"
    return "{" + ",".join(map(str, ordered)) + "}"
