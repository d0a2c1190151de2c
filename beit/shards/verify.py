"""`beit shards verify`: check every complete shard of a set against its stats and the format.

Per shard: the tar's size and SHA-256 equal its stats; every sample decodes (RGB JPEG of the set's image
size, uint16 token grid of the tokenizer's grid with ids below its vocabulary, JSON whose id and view match
the key); keys are unique and ascending; the sample count and the skipped items add up to the plan's chunk.
Any mismatch is a problem (non-zero exit). Work in progress (tars without stats, claims, temporary files)
is only noted: the next `beit tokenize` run finishes or redoes it.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
from tqdm import tqdm

from beit.shards.format import (
    MANIFEST_NAME,
    PLAN_NAME,
    Sample,
    ShardFormatError,
    decode_sample,
    iter_tar_samples,
    parse_shard_name,
    sha256_file,
)
from beit.shards.shardset import ShardInfo, list_complete_shards, read_header

_KEY_RE = re.compile(r"^(\d{9})_(\d{3})$")


@dataclass
class VerifyReport:
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_shard_set(directory: str | Path, progress: bool = True) -> VerifyReport:
    """Check a whole shard set; BeitError only if it is not a shard set at all."""
    directory = Path(directory)
    header = read_header(directory)
    fingerprint = header["tokenizer"]
    size, grid, vocab = int(header["image_size"]), int(fingerprint["grid"]), int(fingerprint["vocab_size"])
    report = VerifyReport()
    chunk_sizes = _plan_chunk_sizes(directory, report)
    shards = list_complete_shards(directory)
    for shard in tqdm(shards, unit="shard", desc="verify", disable=not progress):
        report.shards += 1
        report.samples += _verify_shard(shard, size, grid, vocab, chunk_sizes, report.problems)
    _note_work_in_progress(directory, {s.path.name for s in shards}, report)
    _check_manifest(directory, shards, report)
    return report


def _verify_shard(
    shard: ShardInfo, size: int, grid: int, vocab: int, chunk_sizes: Counter | None, problems: list[str]
) -> int:
    name = shard.path.name
    if not shard.path.is_file():
        problems.append(f"{name}: stats exist but the tar is missing")
        return 0
    actual_bytes = shard.path.stat().st_size
    if actual_bytes != shard.bytes:
        problems.append(f"{name}: {actual_bytes} bytes, stats say {shard.bytes} (truncated or rewritten)")
    elif sha256_file(shard.path) != shard.sha256:
        problems.append(f"{name}: SHA-256 differs from its stats (corrupted bytes)")
    count, last_id = 0, -1
    try:
        for key, members in iter_tar_samples(shard.path):
            item = _check_sample(decode_sample(key, members), shard.view, last_id, size, grid, vocab)
            count, last_id = count + 1, item
    except ShardFormatError as err:
        problems.append(f"{name}: {err}")
        return count
    if count != shard.count:
        problems.append(f"{name}: {count} samples, stats say {shard.count}")
    if chunk_sizes is not None and count + shard.skipped != chunk_sizes[(shard.split, shard.chunk)]:
        problems.append(
            f"{name}: {count} samples + {shard.skipped} skipped != {chunk_sizes[(shard.split, shard.chunk)]} "
            "items planned for its chunk"
        )
    return count


def _check_sample(sample: Sample, view: int, last_id: int, size: int, grid: int, vocab: int) -> int:
    """The sample's item id; ShardFormatError if anything about it is off."""
    key, m = sample.key, _KEY_RE.match(sample.key)
    if m is None:
        raise ShardFormatError(f"key {key!r} is not {{item:09d}}_{{view:03d}}")
    item = int(m[1])
    if int(m[2]) != view or (sample.meta.get("id"), sample.meta.get("view")) != (item, view):
        raise ShardFormatError(f"sample {key}: key, shard view and json id/view disagree")
    if item <= last_id:
        raise ShardFormatError(f"sample {key}: keys are not unique and ascending")
    if sample.image.shape != (size, size, 3):
        raise ShardFormatError(f"sample {key}: image {sample.image.shape}, expected {(size, size, 3)}")
    if sample.tokens.shape != (grid, grid):
        raise ShardFormatError(f"sample {key}: tokens {sample.tokens.shape}, expected {(grid, grid)}")
    if sample.tokens.size and int(sample.tokens.max()) >= vocab:
        raise ShardFormatError(f"sample {key}: token id {int(sample.tokens.max())} >= vocabulary of {vocab}")
    return item


def _plan_chunk_sizes(directory: Path, report: VerifyReport) -> Counter | None:
    """Items per (split, chunk) in the plan, or None (with a problem) if the plan is unreadable."""
    try:
        table = pq.read_table(directory / PLAN_NAME, columns=["split", "chunk"])
    except (OSError, ValueError) as err:
        report.problems.append(f"{PLAN_NAME} is missing or unreadable ({err})")
        return None
    return Counter(zip(table.column("split").to_pylist(), table.column("chunk").to_pylist(), strict=True))


def _note_work_in_progress(directory: Path, complete: set[str], report: VerifyReport) -> None:
    for path in sorted(directory.iterdir()):
        if parse_shard_name(path.name) and path.name not in complete:
            report.notes.append(f"{path.name}: no stats yet (incomplete; the next run rewrites it)")
        elif path.suffix in (".tmp", ".claim"):
            report.notes.append(f"{path.name}: work in progress, or left by a killed run (taken over later)")


def _check_manifest(directory: Path, shards: list[ShardInfo], report: VerifyReport) -> None:
    path = directory / MANIFEST_NAME
    if not path.exists():
        report.notes.append(f"{MANIFEST_NAME} is missing (rebuilt at the end of every `beit tokenize` run)")
        return
    table = pq.read_table(path, columns=["shard", "sha256"])
    listed = dict(zip(table.column("shard").to_pylist(), table.column("sha256").to_pylist(), strict=True))
    stale = [s.path.name for s in shards if listed.get(s.path.name) != s.sha256]
    if stale or len(listed) != len(shards):
        report.notes.append(f"{MANIFEST_NAME} is out of date ({len(stale)} shard(s) differ); runs rebuild it")
