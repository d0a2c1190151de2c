"""`beit shards inspect`: what a shard set holds, and a picture of some samples with their token grids."""

from __future__ import annotations

import colorsys
import io
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from beit.shards.format import PLAN_NAME, decode_sample, iter_tar_samples, read_json, stats_path, write_atomic
from beit.shards.shardset import open_shard_set


def summarize(directory: str | Path) -> dict[str, Any]:
    """Counts per split and view, sizes, skipped items by reason, and the label histogram (per image)."""
    shard_set = open_shard_set(directory)
    plan = pq.read_table(shard_set.directory / PLAN_NAME).to_pydict()
    chunk_items: dict[tuple[str, int], list[tuple[int, str | None]]] = {}
    columns = (plan["id"], plan["split"], plan["chunk"], plan["label"])
    for item, split, chunk, label in zip(*columns, strict=True):
        chunk_items.setdefault((split, chunk), []).append((item, label))
    groups: dict[str, Counter] = {}
    reasons: Counter = Counter()
    written: dict[str, dict[int, str | None]] = {}  # split -> {item: label} with at least one written view
    for shard in shard_set.shards:
        group = groups.setdefault(f"{shard.split}/v{shard.view:03d}", Counter())
        group.update(shards=1, samples=shard.count, skipped=shard.skipped, bytes=shard.bytes)
        skipped = read_json(stats_path(shard.path))["skipped"]
        reasons.update(s["reason"].split(":")[0] for s in skipped)
        skipped_ids = {s["id"] for s in skipped}
        items = chunk_items.get((shard.split, shard.chunk), [])
        written.setdefault(shard.split, {}).update((i, lb) for i, lb in items if i not in skipped_ids)
    labels = {
        split: dict(sorted(Counter("(none)" if lb is None else lb for lb in items.values()).items()))
        for split, items in written.items()
    }
    return {
        "directory": str(shard_set.directory),
        "tokenizer": shard_set.tokenizer,
        "image_size": shard_set.image_size,
        "seed": shard_set.header["seed"],
        "shards": len(shard_set.shards),
        "samples": shard_set.num_samples,
        "bytes": sum(s.bytes for s in shard_set.shards),
        "by_split_view": {k: dict(v) for k, v in groups.items()},
        "skipped_by_reason": dict(reasons),
        "labels": labels,
    }


def token_colors(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """uint8 [g, g, 3]: one fixed, well-spread colour per token id (golden-ratio hues)."""
    hues = (np.arange(vocab_size) * 0.6180339887) % 1.0
    palette = np.array([colorsys.hsv_to_rgb(h, 0.65, 0.95) for h in hues]) * 255
    return palette[tokens.astype(np.int64)].round().astype(np.uint8)


def render(directory: str | Path, count: int, out: str | Path, cell: int = 128) -> Path:
    """Draw `count` samples, one per row: the patch view with the patch grid, and its token grid in colour
    (equal colours are equal ids). Written atomically as PNG."""
    shard_set = open_shard_set(directory)
    grid = shard_set.grid
    rows = []
    for shard in shard_set.shards:
        for key, members in iter_tar_samples(shard.path):
            rows.append(decode_sample(key, members))
            if len(rows) == count:
                break
        if len(rows) == count:
            break
    canvas = Image.new("RGB", (2 * cell + 3 * 8, len(rows) * (cell + 22) + 8), "white")
    draw = ImageDraw.Draw(canvas)
    for r, sample in enumerate(rows):
        y = 8 + r * (cell + 22)
        image = Image.fromarray(sample.image).resize((cell, cell), Image.NEAREST)
        tokens = Image.fromarray(token_colors(sample.tokens, shard_set.vocab_size)).resize(
            (cell, cell), Image.NEAREST
        )
        canvas.paste(image, (8, y))
        canvas.paste(tokens, (16 + cell, y))
        for k in range(1, grid):  # the patch grid over the image: token (i, j) names patch (i, j)
            p = k * cell // grid
            draw.line([(8 + p, y), (8 + p, y + cell - 1)], fill=(255, 255, 255))
            draw.line([(8, y + p), (8 + cell - 1, y + p)], fill=(255, 255, 255))
        label = sample.meta.get("label")
        draw.text((8, y + cell + 4), f"{sample.key}  {'' if label is None else label}", fill="black")
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    out = Path(out)
    write_atomic(out, buf.getvalue())
    return out
