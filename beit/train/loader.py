"""The pretraining loader: an endless, deterministic WebDataset stream of (uint8 images, tokens, masks).

Pipeline, in each DataLoader worker (REFERENCE.md §10.2, §10.4):

    shards of this stream, reshuffled every pass ─► samples (`beit.shards.iter_tar_samples`)
        ─► shuffle buffer (raw bytes, webdataset) ─► JPEG decode + token check + blockwise mask ─► batch

Each of the last stages runs over a whole batch before the next one starts (one decoder call per batch,
then the checks, then the masks), which keeps each stage's code and data in the CPU caches.

The tar members are read by the shard format's own reader rather than webdataset's generic tar expander
(it parses the fixed USTAR headers itself: about 10 µs per member against tarfile's 60); the shuffle
buffer is webdataset's.

- Every process (rank) builds its own loader; it is never `accelerator.prepare()`d. Each rank-worker pair
  is one *stream* per epoch. With at least as many shards as streams, stream i reads shards i, i+S,
  i+2S, … (split across nodes and workers); with fewer, every stream reads all shards. A stream never
  ends: it goes over its shards again and again in a new order each pass (resampled shards), so every
  rank yields exactly `epoch_batches` batches per epoch whatever the shard sizes: uneven shards cannot
  hang DDP. The workers move from epoch to epoch themselves: they start once per run, not per epoch.
- Everything random (shard order, shuffle buffer, one mask seed per sample) is seeded from
  (seed, epoch, stream), so batch k of a run is a function of (seed, k, rank, world size, workers).
  `start_batch` resumes the stream: the workers drop the consumed samples before decoding them. It is
  exact unless bad samples were skipped in the epoch before `start_batch`: batches count good samples
  only, so each one makes the resumed stream start one sample early (that sample is seen twice).
- Images stay uint8 (4x less to move than float32); `Normalize` converts them on the device.
- A bad sample (missing member, undecodable JPEG, wrong size, token ids out of range) is skipped, logged
  with its reason, and counted in the `skipped` field of the next batch.
"""

from __future__ import annotations

import functools
import io
import itertools
import logging
import math
import random
import warnings
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from beit.config import ModelConfig
from beit.errors import BeitError
from beit.shards import ShardInfo, ShardSet, iter_tar_samples
from beit.shards.format import ShardFormatError
from beit.train.masking import MaskGenerator, RandomMaskGenerator
from beit.workers import die_with_parent

log = logging.getLogger(__name__)

# torchvision's libjpeg-turbo decoder straight to a uint8 CHW tensor is faster than PIL + numpy
# (bench/pretrain.py) and gives the same pixels; it warns on every call that its image codecs are
# deprecated in favour of TorchCodec, which is not a dependency.
try:
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_jpeg as _tv_decode_jpeg
except ImportError:  # pragma: no cover - a torchvision without image codecs
    _tv_decode_jpeg = None

NORMALIZATIONS = {
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # the official default (REFERENCE.md §7.1)
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # the official IN-1k recipe
}


class Batch(NamedTuple):
    """One batch. `skipped` counts the bad samples the worker dropped while assembling it."""

    images: torch.Tensor  # uint8 [B, 3, S, S], channels-last memory
    tokens: torch.Tensor  # int64 [B, g, g]
    mask: torch.Tensor  # bool [B, g*g], row-major like the patch sequence
    skipped: int


class BadSample(ValueError):
    """A sample that cannot be used; the message is the reason that gets logged."""


def decode_jpegs(blobs: list[bytes]) -> list[torch.Tensor]:
    """JPEG bytes -> uint8 [3, H, W] RGB tensors in channels-last memory, with the fastest decoder installed.

    One call for many images: torchvision's Python wrapper (usage logging and a deprecation warning) costs
    about 40 µs a call, a tenth of decoding a 224-px JPEG. Raises if any one of them cannot be decoded."""
    if _tv_decode_jpeg is None:
        return [_pil_decode(data) for data in blobs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        # The decoder only reads its input, so the (read-only) bytes are passed without a copy.
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        tensors = [torch.frombuffer(data, dtype=torch.uint8) for data in blobs]
        return _tv_decode_jpeg(tensors, mode=ImageReadMode.RGB) if tensors else []


def decode_jpeg(data: bytes) -> torch.Tensor:
    """One JPEG -> uint8 [3, H, W] RGB; see `decode_jpegs`."""
    return decode_jpegs([data])[0]


def _pil_decode(data: bytes) -> torch.Tensor:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)


@functools.lru_cache(maxsize=16)
def _npy_header(prefix: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of an .npy header; cached, since every sample of a set shares one."""
    stream = io.BytesIO(prefix)
    major, _ = np.lib.format.read_magic(stream)
    if major == 1:
        return np.lib.format.read_array_header_1_0(stream)
    return np.lib.format.read_array_header_2_0(stream)


def read_npy(data: bytes) -> np.ndarray:
    """An .npy file's array without pickles: `np.load(allow_pickle=False)` minus its per-call header
    parsing (a Python literal_eval), which costs as much as the rest of a sample's token handling."""
    if data[:6] != b"\x93NUMPY" or len(data) < 10:
        raise ValueError("not an .npy file")
    length_bytes = 2 if data[6] == 1 else 4
    start = 8 + length_bytes + int.from_bytes(data[8 : 8 + length_bytes], "little")
    shape, fortran, dtype = _npy_header(data[:start])
    if dtype.hasobject:
        raise ValueError("object arrays are not allowed")
    count = math.prod(shape)
    if len(data) - start != count * dtype.itemsize:
        raise ValueError(f"{len(data) - start} data bytes for shape {shape} of {dtype}")
    return np.frombuffer(data, dtype, count, start).reshape(shape, order="F" if fortran else "C")


def _decoded_or_reason(data: bytes) -> torch.Tensor | str:
    """One JPEG decoded, or the decoder's error message."""
    try:
        return decode_jpeg(data)
    except (RuntimeError, ValueError, OSError) as err:
        return str(err)


def check_compatible(shard_set: ShardSet, config: ModelConfig) -> None:
    """Refuse shards whose tokenizer vocabulary, token grid or image size does not fit the model."""
    name = shard_set.tokenizer.get("name", "tokenizer")
    fix = "choose a matching --preset / model options, or re-tokenize with a matching tokenizer"
    if shard_set.vocab_size != config.vocab_size:
        raise BeitError(
            f"shard set {shard_set.directory} holds tokens of a {shard_set.vocab_size}-token vocabulary "
            f"({name}) but the model predicts {config.vocab_size} tokens; {fix}"
        )
    if shard_set.grid != config.grid:
        raise BeitError(
            f"shard set {shard_set.directory} holds {shard_set.grid}x{shard_set.grid} token grids but the "
            f"model has a {config.grid}x{config.grid} patch grid; {fix}"
        )
    if shard_set.image_size != config.image_size:
        raise BeitError(
            f"shard set {shard_set.directory} holds {shard_set.image_size}-px images but the model takes "
            f"{config.image_size} px; {fix}"
        )


def _stream_rng(*parts: object) -> random.Random:
    # random.Random seeded with a str hashes it with SHA-512: the same in every process (unlike hash()).
    return random.Random("/".join(str(p) for p in parts))


class ShardStream(IterableDataset):
    """The per-rank dataset behind `shard_loader`: the rank's endless batches, split across its workers.

    Batch b of the run is batch i = b mod `epoch_batches` of epoch e = b div `epoch_batches`; it holds the
    samples of stream (rank, role = i mod W), W being the workers, from position (i div W)·B on. The
    DataLoader takes batch b from worker b mod W, so each worker yields every W-th batch from `start`
    (read when the workers start) and moves through the epochs itself: workers live for the whole run.
    """

    def __init__(
        self,
        shards: list[ShardInfo],
        *,
        image_size: int,
        grid: int,
        vocab_size: int,
        batch_size: int,
        epoch_batches: int,
        masks: MaskGenerator | RandomMaskGenerator,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 1000,
    ) -> None:
        super().__init__()
        if not shards:
            raise BeitError("the loader got no shards; check the shard set and --split")
        if epoch_batches < 1:
            raise BeitError(f"epoch_batches must be at least 1, got {epoch_batches}")
        if (masks.height, masks.width) != (grid, grid):
            raise BeitError(
                f"the mask generator's grid {masks.height}x{masks.width} is not the token grid {grid}"
            )
        self.paths = [s.path for s in shards]
        self.image_size, self.grid, self.vocab_size = image_size, grid, vocab_size
        self.batch_size, self.epoch_batches, self.masks = batch_size, epoch_batches, masks
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer = shuffle_buffer
        self.start = 0
        self._skipped = 0

    def _samples(self, epoch: int, stream: int, streams: int) -> Iterator[dict]:
        """Raw samples of this stream's shards, endlessly, in a new shard order every pass."""
        paths = self.paths[stream::streams] if len(self.paths) >= streams else list(self.paths)
        rng = _stream_rng("shards", self.seed, epoch, stream)
        while True:
            rng.shuffle(paths)
            found = 0
            for path in paths:
                try:
                    for key, members in iter_tar_samples(path):
                        found += 1
                        yield {"__key__": key, "__url__": str(path), **members}
                except (ShardFormatError, OSError) as err:
                    log.warning("skipping the rest of shard %s: %s", path, err)
                    self._skipped += 1
            if not found:
                raise BeitError(f"no readable samples in the {len(paths)} shard(s) of rank {self.rank}")

    def decode(self, samples: list[tuple[int, dict]]) -> list[tuple[int, torch.Tensor, np.ndarray]]:
        """(stream index, raw sample) pairs -> (stream index, uint8 [3,S,S], integer tokens [g,g]) of the good
        ones; each bad one is logged with its reason, counted and left out."""
        complete = []
        for index, sample in samples:
            if "jpg" in sample and "tokens.npy" in sample:
                complete.append((index, sample))
            else:
                members = sorted(k for k in sample if not k.startswith("__"))
                self._skip(sample, f"missing member(s): has {members}")
        try:
            images: list[torch.Tensor | str] = decode_jpegs([sample["jpg"] for _, sample in complete])
        except (RuntimeError, ValueError, OSError):  # one bad JPEG fails the call: decode one by one
            images = [_decoded_or_reason(sample["jpg"]) for _, sample in complete]
        good = []
        for (index, sample), image in zip(complete, images, strict=True):
            try:
                good.append((index, self._checked_image(image), self._checked_tokens(sample["tokens.npy"])))
            except BadSample as err:
                self._skip(sample, str(err))
        return good

    def _checked_image(self, image: torch.Tensor | str) -> torch.Tensor:
        if isinstance(image, str):
            raise BadSample(f"undecodable jpg ({image})")
        if tuple(image.shape) != (3, self.image_size, self.image_size):
            raise BadSample(
                f"image is {tuple(image.shape)}, expected (3, {self.image_size}, {self.image_size})"
            )
        return image

    def _checked_tokens(self, data: bytes) -> np.ndarray:
        try:
            tokens = read_npy(data)
        except ValueError as err:
            raise BadSample(f"unreadable tokens.npy ({err})") from None
        if tokens.shape != (self.grid, self.grid) or tokens.dtype.kind not in "ui":
            raise BadSample(
                f"tokens are {tokens.dtype} {tokens.shape}, expected integers ({self.grid}, {self.grid})"
            )
        negative = tokens.dtype.kind == "i" and tokens.min() < 0  # unsigned ids (the norm) skip a pass
        if negative or tokens.max() >= self.vocab_size:
            raise BadSample(f"token ids outside [0, {self.vocab_size})")
        return tokens

    def _skip(self, sample: dict, reason: str) -> None:
        log.warning("skipping sample %s of %s: %s", sample.get("__key__"), sample.get("__url__"), reason)
        self._skipped += 1

    def _batches(self, epoch: int, role: int, workers: int, first: int) -> Iterator[Batch]:
        """Batches first, first+1, … of one role (stream) in one epoch, endlessly."""
        stream, streams = self.rank * workers + role, self.world_size * workers
        samples = self._samples(epoch, stream, streams)
        shuffle_rng = _stream_rng("buffer", self.seed, epoch, stream)
        samples = wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=shuffle_rng)(
            samples
        )
        # Drop the stream's samples of the batches before `first`, before decoding anything; number the
        # rest by their position in the stream, which seeds their masks.
        start = first * self.batch_size
        numbered = enumerate(itertools.islice(samples, start, None), start)
        size, count = self.image_size, self.batch_size
        while True:
            # Each stage runs over the whole batch before the next one starts, so that its code and data
            # stay in the CPU caches: interleaved sample by sample, decoding evicted the rest, and the loader
            # took 1.4 times as long (853 against 604 µs a sample in a one-off side-by-side run).
            good: list[tuple[int, torch.Tensor, np.ndarray]] = []
            while len(good) < count:
                good += self.decode(list(itertools.islice(numbered, count - len(good))))
            # Channels-last memory, as the decoder writes it: filling the batch is then a plain copy (a
            # transposing copy into NCHW took 40% as long as decoding the JPEG).
            images = torch.empty(count, size, size, 3, dtype=torch.uint8).permute(0, 3, 1, 2)
            for i, (_, image, _) in enumerate(good):
                images[i] = image
            tokens = np.stack([ids for _, _, ids in good], dtype=np.int64)
            mask = np.stack(
                [self.masks(rng=_stream_rng("mask", self.seed, epoch, stream, index)) for index, _, _ in good]
            ).reshape(count, -1)
            yield Batch(images, torch.from_numpy(tokens), torch.from_numpy(mask), self._skipped)
            self._skipped = 0

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        self._skipped = 0
        batch = self.start + worker  # this worker yields batches batch, batch + W, batch + 2W, …
        while True:
            epoch, index = divmod(batch, self.epoch_batches)
            for item in self._batches(epoch, index % workers, workers, first=index // workers):
                yield item
                batch += workers
                if batch // self.epoch_batches != epoch:
                    break


class ShardLoader:
    """Endless batches for one rank: `iter(loader)` starts at batch `start_batch` and crosses epochs.

    A DataLoader over `ShardStream`, never prepared by Accelerate; its workers live for the whole
    iteration. Every rank yields the same `epoch_batches` batches per epoch.
    """

    def __init__(self, stream: ShardStream, *, num_workers: int = 4, pin_memory: bool = False) -> None:
        self.stream, self.num_workers, self.pin_memory = stream, num_workers, pin_memory
        self.start_batch = 0

    @property
    def epoch_batches(self) -> int:
        """Batches per epoch, the same on every rank."""
        return self.stream.epoch_batches

    def __iter__(self) -> Iterator[Batch]:
        self.stream.start = self.start_batch
        # A private generator: starting workers must not consume the global torch RNG (exact resume).
        batches = DataLoader(
            self.stream,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            generator=torch.Generator().manual_seed(0),
            prefetch_factor=4 if self.num_workers else None,
            worker_init_fn=die_with_parent(),
        )
        return _one_line_errors(iter(batches))


def _one_line_errors(batches: Iterator[Batch]) -> Iterator[Batch]:
    """`batches`, except that a BeitError raised in a worker keeps its one-line message: the DataLoader
    re-raises it in the main process with the worker's traceback prepended."""
    try:
        yield from batches
    except BeitError as err:
        last = str(err).rstrip().rpartition("\n")[2]
        prefix = f"{BeitError.__module__}.{BeitError.__qualname__}: "
        if not last.startswith(prefix):
            raise
        raise BeitError(last.removeprefix(prefix)) from None


def shard_loader(
    shard_set: ShardSet,
    *,
    batch_size: int,
    masks: MaskGenerator | RandomMaskGenerator,
    epoch_batches: int | None = None,
    start_batch: int = 0,
    split: str | None = None,
    num_workers: int = 4,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    shuffle_buffer: int = 1000,
    pin_memory: bool = False,
) -> ShardLoader:
    """The loader of one rank over a shard set (all splits, or one `split`).

    `epoch_batches` defaults to the samples of the selected shards // (batch_size · world_size), i.e. one
    nominal pass over the data per epoch across all ranks.
    """
    shards = shard_set.select(split)
    if not shards:
        splits = sorted({s.split for s in shard_set.shards})
        raise BeitError(f"shard set {shard_set.directory} has no shards of split {split!r}; it has {splits}")
    if batch_size < 1:
        raise BeitError(f"batch size must be at least 1, got {batch_size}")
    if epoch_batches is None:
        epoch_batches = max(1, sum(s.count for s in shards) // (batch_size * world_size))
    stream = ShardStream(
        shards,
        image_size=shard_set.image_size,
        grid=shard_set.grid,
        vocab_size=shard_set.vocab_size,
        batch_size=batch_size,
        epoch_batches=epoch_batches,
        masks=masks,
        rank=rank,
        world_size=world_size,
        seed=seed,
        shuffle_buffer=shuffle_buffer,
    )
    loader = ShardLoader(stream, num_workers=num_workers, pin_memory=pin_memory)
    loader.start_batch = start_batch
    return loader


class Normalize:
    """uint8 [B,3,S,S] on the device -> normalized float, `(x/255 - mean) / std` as one fused multiply-add."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device | str = "cpu"):
        mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -mean_t / std_t

    @classmethod
    def named(cls, name: str, device: torch.device | str = "cpu") -> Normalize:
        """One of NORMALIZATIONS ("half": the official default; "imagenet": the IN-1k recipe)."""
        if name not in NORMALIZATIONS:
            raise BeitError(f"unknown normalization {name!r}; choose one of: {', '.join(NORMALIZATIONS)}")
        return cls(*NORMALIZATIONS[name], device=device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, images.float(), self.scale)
