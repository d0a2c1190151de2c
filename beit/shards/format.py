"""The shard sample format: names, member encodings and a byte-deterministic tar writer.

A shard set is the only thing the tokenization job and the trainer both know (DESIGN.md, "Shard sample").
Every byte written here is a function of its inputs alone: fixed member order, zero mtime/uid/gid, fixed
JPEG settings, JSON with sorted keys. That is what lets a cron job, another machine or a rerun write a
shard again and get the same SHA-256.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

FORMAT_VERSION = 1
JPEG_QUALITY = 95
HEADER_NAME = "tokenizer.json"
PLAN_NAME = "plan.parquet"
MANIFEST_NAME = "manifest.parquet"
STATS_SUFFIX = ".stats.json"
MEMBERS = ("jpg", "tokens.npy", "json")  # written in this order for every sample

_SHARD_RE = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-v(?P<view>\d{3})-(?P<chunk>\d{6})\.tar$")
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_]+$")


class ShardFormatError(ValueError):
    """A shard's bytes do not follow the format (raised by the readers; `verify` reports it)."""


def check_split(split: str) -> str:
    """Split names go into file names and must not contain '-' or '.' (they delimit the name)."""
    if not _SPLIT_RE.match(split):
        raise ValueError(f"split name {split!r} must be letters, digits or '_'")
    return split


def sample_key(item: int, view: int) -> str:
    """`{item:09d}_{view:03d}`: dot-free, because webdataset splits member names at the first dot."""
    return f"{item:09d}_{view:03d}"


def shard_name(split: str, view: int, chunk: int) -> str:
    """`{split}-v{view:03d}-{chunk:06d}.tar`: one series of chunks per split and view index."""
    return f"{check_split(split)}-v{view:03d}-{chunk:06d}.tar"


def parse_shard_name(name: str) -> tuple[str, int, int] | None:
    """(split, view, chunk) of a shard file name, or None for any other file."""
    m = _SHARD_RE.match(name)
    return (m["split"], int(m["view"]), int(m["chunk"])) if m else None


def stats_path(tar_path: Path) -> Path:
    """The completion marker beside a tar: `x.tar` -> `x.stats.json`."""
    return tar_path.with_name(tar_path.name[: -len(".tar")] + STATS_SUFFIX)


def encode_jpeg(image: Image.Image) -> bytes:
    """RGB JPEG with fixed settings (quality 95, 4:2:0, no optimizer pass, no metadata)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling="4:2:0", optimize=False)
    return buf.getvalue()


def encode_tokens(tokens: np.ndarray, vocab_size: int) -> bytes:
    """uint16 [g, g] .npy; refuses ids outside [0, vocab_size)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"tokens must be a 2-D grid of ids in [0, {vocab_size}), got shape {tokens.shape}")
    buf = io.BytesIO()
    np.save(buf, tokens.astype(np.uint16), allow_pickle=False)
    return buf.getvalue()


def encode_json(obj: Any) -> bytes:
    """Canonical JSON (sorted keys, compact, ASCII) so equal content gives equal bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


@dataclass
class Sample:
    """One decoded sample: the patch view, its token grid and its metadata."""

    key: str
    image: np.ndarray  # uint8 [S, S, 3]
    tokens: np.ndarray  # uint16 [g, g]
    meta: dict[str, Any]


def decode_sample(key: str, members: dict[str, bytes]) -> Sample:
    """Decode the three members of one sample; raises ShardFormatError on anything malformed."""
    if sorted(members) != sorted(MEMBERS):
        raise ShardFormatError(f"sample {key}: members {sorted(members)}, expected {sorted(MEMBERS)}")
    try:
        with Image.open(io.BytesIO(members["jpg"])) as img:
            if img.format != "JPEG" or img.mode != "RGB":
                raise ShardFormatError(f"sample {key}: jpg is {img.format} {img.mode}, expected RGB JPEG")
            image = np.asarray(img)
        tokens = np.load(io.BytesIO(members["tokens.npy"]), allow_pickle=False)
        meta = json.loads(members["json"])
    except ShardFormatError:
        raise
    except Exception as err:  # PIL, numpy and json each raise their own types for corrupt bytes
        raise ShardFormatError(f"sample {key}: cannot decode ({type(err).__name__}: {err})") from None
    if tokens.dtype != np.uint16 or tokens.ndim != 2:
        raise ShardFormatError(f"sample {key}: tokens are {tokens.dtype} {tokens.shape}, not uint16 [g, g]")
    return Sample(key, image, tokens, meta)


_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)


def _header_field(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "replace")


def _header_number(field: bytes) -> int:
    return int(field.replace(b"\0", b" ").strip() or b"0", 8)


def _tar_members(path: Path) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every member of a plain USTAR tar, straight from its 512-byte headers.

    The shard writer's format is fixed, so this reads it about ten times faster than `tarfile` (whose
    per-member bookkeeping cost the loader as much as decoding the JPEG). A bad checksum, a member that
    is not a regular file, or truncated data raises ShardFormatError ("unreadable tar")."""
    with open(path, "rb") as f:
        while True:
            header = f.read(_BLOCK)
            if not header or header == _ZERO_BLOCK:  # end of archive
                return
            try:
                if len(header) < _BLOCK:
                    raise ValueError("truncated header")
                if _header_number(header[148:156]) != sum(header) - sum(header[148:156]) + 8 * ord(" "):
                    raise ValueError("bad header checksum")
                size = _header_number(header[124:136])
            except ValueError as err:
                raise ShardFormatError(f"{path.name}: unreadable tar ({err})") from None
            name = _header_field(header[:100])
            if header[345] and header[257:262] == b"ustar":  # a long name split into prefix/name
                name = f"{_header_field(header[345:500])}/{name}"
            if header[156:157] not in (b"0", b"\0"):
                raise ShardFormatError(f"{path.name}: unexpected member {name!r}")
            data = f.read(size)
            if len(data) < size:
                raise ShardFormatError(f"{path.name}: unreadable tar (member {name!r} is truncated)")
            f.seek(-size % _BLOCK, os.SEEK_CUR)
            yield name, data


def iter_tar_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {extension: bytes}) in tar order, grouping members by the part before the first dot."""
    key, members = None, {}
    for name, data in _tar_members(Path(path)):
        k, _, ext = name.partition(".")
        if k != key:
            if key is not None:
                yield key, members
            key, members = k, {}
        if ext in members:
            raise ShardFormatError(f"{Path(path).name}: duplicate member {name!r}")
        members[ext] = data
    if key is not None:
        yield key, members


class _HashingFile(io.RawIOBase):
    """A write-only file that hashes and counts what passes through it (so stats need no second read)."""

    def __init__(self, path: Path):
        self._f = open(path, "wb")
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.bytes

    def write(self, data) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self._f.write(data)

    def close(self, sync: bool = False) -> None:
        if not self._f.closed:
            self._f.flush()
            if sync:
                os.fsync(self._f.fileno())
            self._f.close()
        super().close()


class ShardWriter:
    """Writes samples into one tar at `path` with every header field fixed (byte-deterministic)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = _HashingFile(self.path)
        self._tar = tarfile.open(fileobj=self._file, mode="w:", format=tarfile.USTAR_FORMAT)
        self.count = 0

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """Append one sample; `members` must hold exactly MEMBERS."""
        if sorted(members) != sorted(MEMBERS) or "." in key:
            raise ValueError(f"sample {key!r} must be dot-free and hold exactly {MEMBERS}")
        for ext in MEMBERS:
            data = members[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def flush(self) -> None:
        """Push buffered bytes to the OS so the temporary tar shows progress (nothing reads it)."""
        self._file._f.flush()

    def close(self) -> None:
        """Finish the tar and fsync it, so a rename afterwards publishes whole bytes."""
        self._tar.close()
        self._file.close(sync=True)

    @property
    def bytes(self) -> int:
        return self._file.bytes

    @property
    def sha256(self) -> str:
        return self._file.sha256.hexdigest()

    def abort(self) -> None:
        """Close without finishing and delete the partial file."""
        self._file.close()
        self.path.unlink(missing_ok=True)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write a unique temporary name beside `path`, fsync, rename: readers see old or new, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_json(path: Path) -> Any:
    with open(path, "rb") as f:
        return json.loads(f.read())
