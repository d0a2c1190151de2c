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
  is one *stream*. With at least as many shards as streams S, stream i reads shards i, i+S, i+2S, …
  (split across nodes and workers); with fewer, it reads every S-th sample of every shard. Either way no
  two streams share a sample (unless the set holds fewer samples than S). A stream never ends: it makes
  pass after pass over its share, each in a new shard order through a shuffle buffer that drains at the
  end of the pass, so each sample is read once a pass. Every rank yields as many batches as asked whatever
  the shard sizes, so uneven shards cannot hang DDP; an epoch is only a count (`epoch_batches`) for the
  trainer. The workers start once per run.
- Everything random (shard order, shuffle buffer, one mask seed per sample) is seeded from
  (seed, stream, pass) or (seed, stream, position), so batch k of a run is a function of (seed, k, rank,
  world size, workers). `start_batch` resumes the stream: pass p starts at position p·(samples per pass),
  and the workers drop the consumed samples of the current pass before decoding them. Batches count good
  samples only, so after bad samples a stream's position is not a multiple of the batch size: each batch
  carries the position where its stream goes on, `state_dict()` keeps them per worker role, and
  `load_state_dict()` resumes from them exactly (without them each bad sample makes the resumed stream
  start one sample early).
- Images stay uint8 (4x less to move than float32); `Normalize` converts them on the device.
- A bad sample (missing member, undecodable JPEG, wrong size, token ids out of range) is skipped, logged
  with its reason, and counted in the `skipped` field of the next batch. Shards of 0 samples, and shards
  missing or of another size than their stats file records (a truncated copy), are left out when the
  loader is built, with a warning; a shard damaged later is skipped in its pass and its samples counted.
  A stream that finds no usable sample in a whole pass raises a BeitError.
"""

from __future__ import annotations

import collections
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
    """One batch. `skipped` counts the bad samples the worker dropped while assembling it; `resume_at` is
    the stream position after the last sample it read, good or bad, where the stream goes on."""

    images: torch.Tensor  # uint8 [B, 3, S, S], channels-last memory
    tokens: torch.Tensor  # int64 [B, g, g]
    mask: torch.Tensor  # bool [B, g*g], row-major like the patch sequence
    skipped: int
    resume_at: int


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
    try:
        shape, fortran, dtype = _npy_header(data[:start])
    except Exception as err:  # numpy parses the header as a Python literal: a damaged one raises anything
        raise ValueError(f"unreadable header ({type(err).__name__}: {err})") from None
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


def _damage(shard: ShardInfo) -> str | None:
    """Why a shard cannot be read whole, judged by its size against its stats file (a copy cut short, or a
    file overwritten since), or None."""
    try:
        size = shard.path.stat().st_size
    except OSError as err:
        return f"cannot read it ({err.strerror})"
    return None if size == shard.bytes else f"it has {size} bytes, its stats say {shard.bytes}"


def _stream_rng(*parts: object) -> random.Random:
    # random.Random seeded with a str hashes it with SHA-512: the same in every process (unlike hash()).
    return random.Random("/".join(str(p) for p in parts))


class _Share(NamedTuple):
    """The samples one stream reads: of `shards` (each with the set-wide index of its first sample), those
    whose set-wide index i has i % every == which; `samples` of them per pass."""

    shards: list[tuple[ShardInfo, int]]
    every: int
    which: int
    samples: int


class ShardStream(IterableDataset):
    """The per-rank dataset behind `shard_loader`: the rank's endless batches, split across its workers.

    Each (rank, worker role) pair reads one stream: endless passes over its share of the samples, each in
    a new shard order through a shuffle buffer that drains at the end of the pass, so every sample of
    the share is read once a pass and pass p starts at stream position p·(samples per pass). Run batch b
    holds positions (b div W)·B … of role b mod W's stream, W being the workers. The DataLoader takes
    batch b from worker (b − start) mod W, so worker w plays role (start + w) mod W for the whole run.
    """

    def __init__(
        self,
        shards: list[ShardInfo],
        *,
        image_size: int,
        grid: int,
        vocab_size: int,
        batch_size: int,
        masks: MaskGenerator | RandomMaskGenerator,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 1000,
    ) -> None:
        super().__init__()
        if not shards:
            raise BeitError("the loader got no shards; check the shard set and --split")
        if (masks.height, masks.width) != (grid, grid):
            raise BeitError(
                f"the mask generator's grid {masks.height}x{masks.width} is not the token grid {grid}"
            )
        # A shard of 0 samples (every item of its chunk failed) is complete but has nothing to give; a
        # damaged one would be skipped in every pass, and could leave a stream with nothing to read.
        self.shards = []
        for shard in shards:
            damage = _damage(shard)
            if damage:
                log.warning("leaving out shard %s: %s", shard.path, damage)
            elif shard.count > 0:
                self.shards.append(shard)
        if not self.shards:
            raise BeitError(f"none of the {len(shards)} selected shard(s) holds a readable sample")
        self.image_size, self.grid, self.vocab_size = image_size, grid, vocab_size
        self.batch_size, self.masks = batch_size, masks
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer = shuffle_buffer
        self.start = 0
        self.start_positions: dict[int, int] = {}  # role -> stream position, where known exactly
        self._skipped = 0

    def share(self, stream: int, streams: int) -> _Share:
        """Stream `stream`'s samples: with at least as many shards as streams, whole shards (stream, stream
        + streams, …); with fewer, every `streams`-th sample of every shard, so no two streams overlap."""
        if len(self.shards) >= streams:
            mine = self.shards[stream::streams]
            return _Share([(s, 0) for s in mine], 1, 0, sum(s.count for s in mine))
        firsts = itertools.accumulate((s.count for s in self.shards), initial=0)
        total = sum(s.count for s in self.shards)
        every = min(streams, total)  # a set smaller than the streams: a stream may share its samples
        which = stream % every
        shards = list(zip(self.shards, firsts, strict=False))  # `firsts` also ends with the total
        return _Share(shards, every, which, len(range(which, total, every)))

    def _pass(self, share: _Share, stream: int, number: int) -> Iterator[dict]:
        """The raw samples of pass `number` over a stream's share, shard by shard in this pass's order."""
        order = list(share.shards)
        _stream_rng("shards", self.seed, stream, number).shuffle(order)
        for shard, first in order:
            mine = range((share.which - first) % share.every, shard.count, share.every)  # its positions
            read = 0
            try:
                damage = _damage(shard)  # since the loader was built
                if damage:
                    raise ShardFormatError(damage)
                for position, (key, members) in enumerate(iter_tar_samples(shard.path)):
                    if (first + position) % share.every == share.which:
                        read += 1
                        yield {"__key__": key, "__url__": str(shard.path), **members}
            except (ShardFormatError, OSError) as err:
                log.warning("skipping the rest of shard %s: %s", shard.path, err)
                self._skipped += max(0, len(mine) - read)  # this stream's samples of it that were lost

    def _numbered(self, share: _Share, stream: int, start: int) -> Iterator[tuple[int, dict]]:
        """(stream position, raw sample) from position `start` on, endlessly: pass p holds the positions
        from p·share.samples on, so a pass short of samples (a damaged shard) shifts none of the next."""
        number, skip = divmod(start, share.samples)
        while True:
            shuffled = wds.shuffle(
                self.shuffle_buffer,
                initial=min(100, self.shuffle_buffer),
                rng=_stream_rng("buffer", self.seed, stream, number),
            )(self._pass(share, stream, number))
            if skip:  # the samples the run had taken, dropped undecoded
                collections.deque(itertools.islice(shuffled, skip), maxlen=0)
                self._skipped = 0  # damaged shards met on the way: the run counted them when it met them
            found = 0
            for found, sample in enumerate(itertools.islice(shuffled, share.samples - skip), 1):
                yield number * share.samples + skip + found - 1, sample
            if not found and not skip:
                raise BeitError(
                    f"no readable samples in the {len(share.shards)} shard(s) of rank {self.rank}'s stream "
                    f"{stream}; see the warnings above"
                )
            number, skip = number + 1, 0

    def decode(self, samples: list[tuple[int, dict]]) -> list[tuple[int, torch.Tensor, np.ndarray]]:
        """(stream position, raw sample) pairs -> (stream position, uint8 [3,S,S], integer tokens [g,g]) of
        the good ones; each bad one is logged with its reason, counted and left out."""
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

    def _batches(self, stream: int, streams: int, start: int) -> Iterator[Batch]:
        """The batches of one stream from position `start` on, endlessly."""
        share = self.share(stream, streams)
        numbered = self._numbered(share, stream, start)
        size, count = self.image_size, self.batch_size
        good_pass = start // share.samples  # the pass of the last usable sample (or of the start)
        resume_at = start
        while True:
            # Each stage runs over the whole batch before the next one starts, so that its code and data
            # stay in the CPU caches: interleaved sample by sample, decoding evicted the rest, and the loader
            # took 1.4 times as long (853 against 604 µs a sample in a one-off side-by-side run).
            good: list[tuple[int, torch.Tensor, np.ndarray]] = []
            while len(good) < count:
                chunk = list(itertools.islice(numbered, count - len(good)))
                resume_at = chunk[-1][0] + 1 if chunk else resume_at
                decoded = self.decode(chunk)
                if decoded:
                    good_pass = decoded[-1][0] // share.samples
                elif resume_at // share.samples >= good_pass + 2:  # a whole pass without one: it would spin
                    raise BeitError(
                        f"no usable sample in a whole pass over the {share.samples} samples of rank "
                        f"{self.rank}'s stream {stream}: each one was skipped; see the warnings above"
                    )
                good += decoded
            # Channels-last memory, as the decoder writes it: filling the batch is then a plain copy (a
            # transposing copy into NCHW took 40% as long as decoding the JPEG).
            images = torch.empty(count, size, size, 3, dtype=torch.uint8).permute(0, 3, 1, 2)
            for i, (_, image, _) in enumerate(good):
                images[i] = image
            tokens = np.stack([ids for _, _, ids in good], dtype=np.int64)
            mask = np.stack(
                [self.masks(rng=_stream_rng("mask", self.seed, stream, index)) for index, _, _ in good]
            ).reshape(count, -1)
            yield Batch(images, torch.from_numpy(tokens), torch.from_numpy(mask), self._skipped, resume_at)
            self._skipped = 0

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        self._skipped = 0
        first = self.start + worker  # this worker yields the run's batches first, first + W, first + 2W, …
        role = first % workers
        # Without bad samples both are the same; after them, only the recorded position is exact.
        start = self.start_positions.get(role, first // workers * self.batch_size)
        yield from self._batches(self.rank * workers + role, self.world_size * workers, start)


class ShardLoader:
    """Endless batches for one rank: `iter(loader)` starts at batch `start_batch`.

    A DataLoader over `ShardStream`, never prepared by Accelerate; its workers live for the whole
    iteration. `epoch_batches` is the nominal epoch, the same on every rank: the trainer counts epochs
    with it, the streams do not depend on it.
    """

    def __init__(
        self, stream: ShardStream, *, epoch_batches: int, num_workers: int = 4, pin_memory: bool = False
    ) -> None:
        if epoch_batches < 1:
            raise BeitError(f"epoch_batches must be at least 1, got {epoch_batches}")
        self.stream, self.epoch_batches = stream, epoch_batches
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.start_batch = 0
        self.start_positions: dict[int, int] = {}
        self._positions: dict[int, int] = {}

    def _layout(self) -> list[int]:
        """What the stream positions of `state_dict` depend on: the streams and what they read."""
        stream = self.stream
        samples = sum(s.count for s in stream.shards)
        return [
            *(stream.rank, stream.world_size, max(1, self.num_workers), stream.batch_size, stream.seed),
            *(len(stream.shards), samples, stream.shuffle_buffer),
        ]

    def state_dict(self) -> dict:
        """Where each worker's stream goes on after the batches taken so far (one entry per worker role)."""
        return {
            "layout": self._layout(),
            "positions": {str(r): p for r, p in sorted(self._positions.items())},
        }

    def load_state_dict(self, state: dict) -> bool:
        """Resume every worker's stream where `state_dict` said, which is exact even after bad samples (the
        count of batches alone makes a stream start one sample early per bad one). Only for the same rank,
        processes, workers, batch size, seed, shuffle buffer and shards; returns whether it applied."""
        if state.get("layout") != self._layout():
            return False
        self.start_positions = {int(r): int(p) for r, p in state["positions"].items()}
        return True

    def __iter__(self) -> Iterator[Batch]:
        if self.start_batch < 0:
            raise BeitError(f"start_batch must be at least 0, got {self.start_batch}")
        self.stream.start = self.start_batch
        self.stream.start_positions = dict(self.start_positions)
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
        self._positions = dict(self.start_positions)
        return self._tracked(_one_line_errors(iter(batches)))

    def _tracked(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        """`batches`, noting where the stream of each one's worker role goes on (batch b is role b mod W)."""
        workers = max(1, self.num_workers)
        for number, batch in enumerate(batches, self.start_batch):
            self._positions[number % workers] = batch.resume_at
            yield batch


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
    pass over the data per epoch across all ranks.
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
        masks=masks,
        rank=rank,
        world_size=world_size,
        seed=seed,
        shuffle_buffer=shuffle_buffer,
    )
    loader = ShardLoader(stream, epoch_batches=epoch_batches, num_workers=num_workers, pin_memory=pin_memory)
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
