"""A shard set directory: its header, its complete shards and the manifest (DESIGN.md, "Shard set directory").

A shard is complete if and only if its stats JSON exists; everything here reads the stats files, which are
the ground truth. `manifest.parquet` is a convenience copy rebuilt from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from beit.errors import BeitError
from beit.shards.format import (
    FORMAT_VERSION,
    HEADER_NAME,
    MANIFEST_NAME,
    STATS_SUFFIX,
    parse_shard_name,
    read_json,
    write_atomic,
)

# Header fields that define what the samples mean: two runs that differ in one must not share a directory.
IDENTITY_KEYS = ("format", "tokenizer", "image_size", "seed")


@dataclass(frozen=True)
class ShardInfo:
    """One complete shard, as its stats file describes it."""

    path: Path
    split: str
    view: int
    chunk: int
    count: int
    bytes: int
    sha256: str
    skipped: int


@dataclass
class ShardSet:
    """The complete shards of a directory plus the header that says how they were made."""

    directory: Path
    header: dict[str, Any]
    shards: list[ShardInfo] = field(default_factory=list)

    @property
    def tokenizer(self) -> dict[str, Any]:
        """The tokenizer fingerprint (name, vocab_size, input_size, grid, pixel_mapping, weights_sha256)."""
        return self.header["tokenizer"]

    @property
    def image_size(self) -> int:
        return int(self.header["image_size"])

    @property
    def grid(self) -> int:
        return int(self.tokenizer["grid"])

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer["vocab_size"])

    @property
    def num_samples(self) -> int:
        return sum(s.count for s in self.shards)

    def select(self, split: str | None = None, views: list[int] | None = None) -> list[ShardInfo]:
        """The shards of one split and/or some view indices (all by default), in name order."""
        return [s for s in self.shards if split in (None, s.split) and (views is None or s.view in views)]


def open_shard_set(directory: str | Path) -> ShardSet:
    """Open a shard set for reading. Raises BeitError for a missing, foreign or empty directory."""
    directory = Path(directory)
    header = read_header(directory)
    shards = list_complete_shards(directory)
    if not shards:
        raise BeitError(f"shard set {directory} has no complete shards yet; run or finish `beit tokenize`")
    return ShardSet(directory, header, shards)


def read_header(directory: Path) -> dict[str, Any]:
    """The parsed `tokenizer.json`; BeitError if the directory is missing or not a shard set, or the file
    is unreadable or from another format version."""
    path = directory / HEADER_NAME
    if not directory.exists():
        raise BeitError(f"shard set {directory} does not exist; run `beit tokenize` to create it")
    if not directory.is_dir():
        raise BeitError(f"{directory} is a file, not a shard set directory; point at `beit tokenize` output")
    if not path.is_file():
        raise BeitError(f"{directory} is not a shard set (no {HEADER_NAME}); point at `beit tokenize` output")
    try:
        header = read_json(path)
        fingerprint = header["tokenizer"]
        int(fingerprint["grid"]), int(fingerprint["vocab_size"]), int(header["image_size"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BeitError(f"{path} is not a valid shard set header ({err}); use another directory") from None
    if header.get("format") != FORMAT_VERSION:
        raise BeitError(f"{path} has format {header.get('format')}, this version reads {FORMAT_VERSION}")
    return header


def list_complete_shards(directory: Path) -> list[ShardInfo]:
    """Every shard whose stats file exists (the completion marker), sorted by name."""
    shards = []
    for stats_file in sorted(directory.glob(f"*{STATS_SUFFIX}")):
        tar_name = stats_file.name[: -len(STATS_SUFFIX)] + ".tar"
        parsed = parse_shard_name(tar_name)
        if parsed is None:
            continue
        try:
            stats = read_json(stats_file)
            info = ShardInfo(
                path=directory / tar_name,
                split=parsed[0],
                view=parsed[1],
                chunk=parsed[2],
                count=int(stats["count"]),
                bytes=int(stats["bytes"]),
                sha256=str(stats["sha256"]),
                skipped=len(stats["skipped"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise BeitError(f"{stats_file} is corrupt ({err}); delete it and rerun `beit tokenize`") from None
        shards.append(info)
    return shards


def write_manifest(directory: Path) -> int:
    """Rebuild `manifest.parquet` from the stats files (atomically); returns the number of shards listed."""
    shards = list_complete_shards(directory)
    table = pa.table(
        {
            "shard": pa.array([s.path.name for s in shards], pa.string()),
            "split": pa.array([s.split for s in shards], pa.string()),
            "view": pa.array([s.view for s in shards], pa.int32()),
            "chunk": pa.array([s.chunk for s in shards], pa.int64()),
            "count": pa.array([s.count for s in shards], pa.int64()),
            "bytes": pa.array([s.bytes for s in shards], pa.int64()),
            "sha256": pa.array([s.sha256 for s in shards], pa.string()),
            "skipped": pa.array([s.skipped for s in shards], pa.int64()),
        }
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_atomic(directory / MANIFEST_NAME, sink.getvalue().to_pybytes())
    return len(shards)
