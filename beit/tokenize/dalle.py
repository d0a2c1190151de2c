"""The frozen DALL-E dVAE tokenizer (OpenAI `dall-e` package; REFERENCE.md §4.1), loaded safely.

The official `encoder.pkl` / `decoder.pkl` are whole pickled `nn.Module`s, and unpickling an arbitrary
file runs arbitrary code. We read them with `torch.load(weights_only=True)`, allow-listing exactly the
classes those two files are made of (the dall_e modules and the four torch containers/layers they
use); anything else in a file is refused before it is built. The unpickled module then only donates its
`state_dict()`: the module we run is rebuilt from the installed package's source, with hyperparameters
read off the tensor shapes, so that every loading path (.pkl or .safetensors) yields the same module and
the same fingerprint.

Tokenization as in BEiT: [0,1] RGB -> `map_pixels` (0.8x + 0.1) -> encoder logits (8192 per cell, 112 px
-> 14×14) -> hard argmax. On CUDA the package's convs run in fp16 by themselves (the last one stays fp32).
"""

from __future__ import annotations

import io
import pickle
import re
import urllib.error
import urllib.request
import warnings
import zipfile
from pathlib import Path

import torch
from dall_e import Decoder, Encoder, map_pixels, unmap_pixels
from dall_e.decoder import DecoderBlock
from dall_e.encoder import EncoderBlock
from dall_e.utils import Conv2d
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn
from tqdm import tqdm

from beit.errors import BeitError
from beit.shards.format import write_atomic
from beit.tokenize.base import ModuleTokenizer

DALLE_BASE_URL = "https://cdn.openai.com/dall-e/"
DALLE_MIRROR_URL = "https://conversationhub.blob.core.windows.net/beit-share-public/dall-e_vae/"
DALLE_FILES = ("encoder.pkl", "decoder.pkl")
DALLE_DOWNSAMPLE = 8
DALLE_INPUT_SIZE = 112

# Exactly the classes a torch.save()d dall_e Encoder or Decoder is made of. Beyond these, the zip format
# needs only what torch's weights-only unpickler allows by default (OrderedDict, set, torch.device, the
# tensor/parameter rebuilders); the legacy format needs the same, allowed explicitly by `_LegacyUnpickler`.
DALLE_PICKLE_CLASSES: tuple[type, ...] = (
    Encoder,
    EncoderBlock,
    Decoder,
    DecoderBlock,
    Conv2d,
    nn.Sequential,
    nn.ReLU,
    nn.MaxPool2d,
    nn.Upsample,
    nn.Identity,
)
_LEGACY_GLOBALS = {(c.__module__, c.__qualname__) for c in DALLE_PICKLE_CLASSES} | {
    ("collections", "OrderedDict"),
    ("__builtin__", "set"),  # pickle protocol 2 spells builtins the Python 2 way
    ("torch", "device"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
}  # storage types (torch.FloatStorage, ...) are resolved by torch.load itself, never imported


class _LegacyUnpickler(pickle.Unpickler):
    """Unpickler for the pre-1.6 (non-zip) torch format: any global outside the allow-list is refused.

    torch's weights-only unpickler rejects this format outright (it stores module classes as persistent
    ids), so it gets this restricted one: every global, persistent-id class included, passes `find_class`.
    """

    def find_class(self, module: str, name: str) -> type:
        if (module, name) not in _LEGACY_GLOBALS:
            raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")
        return super().find_class(module, name)


class _LegacyPickleModule:
    """Stands in for the `pickle` module in `torch.load`."""

    Unpickler = _LegacyUnpickler

    @staticmethod
    def load(file: io.BytesIO, **kwargs: object) -> object:
        return _LegacyUnpickler(file, **kwargs).load()


_KIND_METADATA_KEY = "beit.kind"


def _blocks_per_group(state: dict[str, torch.Tensor]) -> int:
    return len({m.group(1) for name in state if (m := re.match(r"blocks\.group_1\.(block_\d+)\.", name))})


def _tensors(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """Parameters and buffers by dotted name, read from the module's own dicts: no method of an
    unpickled object (nor any hook it might carry) runs."""
    own = {**module._parameters, **module._buffers}
    tensors = {prefix + name: t.detach() for name, t in own.items() if isinstance(t, torch.Tensor)}
    for name, child in module._modules.items():
        tensors.update(_tensors(child, f"{prefix}{name}."))
    return tensors


def build_dalle_module(state: dict[str, torch.Tensor]) -> Encoder | Decoder:
    """Rebuild a dall_e Encoder or Decoder from the package source and load `state` (strict)."""
    try:
        first = state["blocks.input.w"]  # encoder: [n_hid, 3, 7, 7]; decoder: [n_init, vocab, 1, 1]
        last = state["blocks.output.conv.w"]  # encoder: [vocab, 8·n_hid, 1, 1]; decoder: [2·C, n_hid, 1, 1]
        if first.shape[-1] == 7:
            module: Encoder | Decoder = Encoder(
                n_hid=first.shape[0],
                n_blk_per_group=_blocks_per_group(state),
                input_channels=first.shape[1],
                vocab_size=last.shape[0],
            )
        else:
            module = Decoder(
                n_init=first.shape[0],
                n_hid=last.shape[1],
                n_blk_per_group=_blocks_per_group(state),
                output_channels=last.shape[0] // 2,
                vocab_size=first.shape[1],
            )
        module.load_state_dict(state, strict=True)
    except (KeyError, RuntimeError, ValueError, TypeError) as err:
        raise BeitError(
            f"these weights are not a dall_e Encoder or Decoder ({str(err).splitlines()[0]})"
        ) from None
    return module.eval().requires_grad_(False)


def _reason(err: BaseException) -> str:
    """The informative line of a torch.load error (it wraps the cause in boilerplate)."""
    boilerplate = ("Weights only load failed", "Check the documentation", "Please file an issue")
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip() and not ln.startswith(boilerplate)]
    return (lines[-1] if lines else type(err).__name__)[:200]


def load_dalle_pickle(path: str | Path) -> Encoder | Decoder:
    """Safely read an official `encoder.pkl` / `decoder.pkl` (a pickled dall_e module)."""
    path = Path(path)
    if not path.is_file():
        raise BeitError(f"no such file: {path}")
    try:
        if zipfile.is_zipfile(path):  # the format of torch >= 1.6: torch's own weights-only unpickler
            with torch.serialization.safe_globals(list(DALLE_PICKLE_CLASSES)):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        else:  # legacy format; from memory, so that torch never tries its tar-archive reader on it
            data = path.read_bytes()
            if not data.startswith(b"\x80"):
                raise RuntimeError(f"starts with {data[:16]!r}, not a pickle")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # SourceChangeWarning: the saved class source differs
                buf, restricted = io.BytesIO(data), _LegacyPickleModule
                obj = torch.load(buf, map_location="cpu", weights_only=False, pickle_module=restricted)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        if found:
            raise BeitError(
                f"refused to load {path}: it needs `{found.group(1)}`, which is not one of the classes of "
                "the official DALL-E encoder.pkl/decoder.pkl; nothing in it was run (use the official files)"
            ) from None
        raise BeitError(
            f"refused to load {path}: not a torch-saved DALL-E module ({_reason(err)}); if you downloaded "
            "it, fetch it again with `beit tokenizer fetch-dalle` or `curl -L -o`"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise BeitError(
            f"cannot read {path} as a torch file ({_reason(err)}): it may be truncated or an HTML/log page; "
            "fetch it again with `beit tokenizer fetch-dalle` or `curl -L -o`"
        ) from None
    if not isinstance(obj, Encoder | Decoder):
        raise BeitError(f"{path} holds a {type(obj).__name__}, not a dall_e Encoder or Decoder")
    if getattr(obj, "group_count", None) != 4:
        raise BeitError(f"{path}: only dall_e modules with group_count=4 (the official ones) are supported")
    try:
        state = _tensors(obj)
    except (AttributeError, TypeError, RecursionError):  # e.g. a module listed inside itself
        raise BeitError(f"{path} holds a malformed dall_e module") from None
    return build_dalle_module(state)


def save_dalle_safetensors(module: Encoder | Decoder, path: str | Path) -> Path:
    """Write a dall_e module's weights as safetensors (atomically), tagged with its kind."""
    kind = "dall-e-encoder" if isinstance(module, Encoder) else "dall-e-decoder"
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    path = Path(path)
    write_atomic(path, safetensors_bytes(state, metadata={_KIND_METADATA_KEY: kind}))
    return path


def safetensors_kind(path: str | Path) -> str | None:
    """The `beit.kind` metadata of a safetensors file (None when absent)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get(_KIND_METADATA_KEY)
    except Exception as err:  # safetensors raises its own error types for every malformed header
        raise BeitError(f"cannot read {path} as safetensors: {str(err).splitlines()[0][:200]}") from None


def load_dalle_safetensors(path: str | Path) -> Encoder | Decoder:
    """Read dall_e weights written by `save_dalle_safetensors` (or any file with the same tensor names)."""
    path = Path(path)
    if not path.is_file():
        raise BeitError(f"no such file: {path}")
    safetensors_kind(path)  # validates the header with a clear error
    with safe_open(str(path), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    return build_dalle_module(state)


def load_dalle_weights(path: str | Path) -> Encoder | Decoder:
    """A dall_e module from a `.pkl` (safe unpickling) or a `.safetensors` file."""
    return load_dalle_safetensors(path) if str(path).endswith(".safetensors") else load_dalle_pickle(path)


def convert_dalle(src: str | Path, dst: str | Path | None = None) -> Path:
    """`encoder.pkl` -> `encoder.safetensors` (same weights, same fingerprint); refuses to overwrite."""
    src = Path(src)
    dst = Path(dst) if dst is not None else src.with_suffix(".safetensors")
    if dst.exists():
        raise BeitError(f"{dst} already exists; remove it or pass another output path")
    return save_dalle_safetensors(load_dalle_pickle(src), dst)


class DalleTokenizer(ModuleTokenizer):
    """BEiT's tokenizer: the DALL-E encoder (8192 codes, ×8 downsampling; 112 px -> 14×14)."""

    name = "dall-e"
    pixel_mapping = "map_pixels: 0.8*x + 0.1 on RGB in [0,1]"

    def __init__(
        self, encoder: Encoder, decoder: Decoder | None = None, *, input_size: int = DALLE_INPUT_SIZE
    ):
        if not isinstance(encoder, Encoder) or not isinstance(decoder, Decoder | None):
            raise BeitError("DalleTokenizer needs a dall_e Encoder (and optionally a dall_e Decoder)")
        if decoder is not None and decoder.vocab_size != encoder.vocab_size:
            raise BeitError(
                f"DALL-E decoder vocabulary ({decoder.vocab_size}) differs from the encoder's "
                f"({encoder.vocab_size})"
            )
        super().__init__(
            encoder,
            vocab_size=encoder.vocab_size,
            input_size=input_size,
            downsample=DALLE_DOWNSAMPLE,
            decoder=decoder,
        )

    def map_pixels(self, x: torch.Tensor) -> torch.Tensor:
        return map_pixels(x)

    def _decode(self, tokens: torch.Tensor) -> torch.Tensor:
        one_hot = nn.functional.one_hot(tokens, self.vocab_size).permute(0, 3, 1, 2).float()  # [B,V,g,g]
        out = self.decoder(one_hot).float()  # [B, 6, S, S]: logit-Laplace mean and log-scale
        return unmap_pixels(torch.sigmoid(out[:, :3]))


def fetch_dalle(out_dir: str | Path, base_url: str = DALLE_BASE_URL, timeout: float = 30.0) -> list[Path]:
    """Download the official encoder.pkl and decoder.pkl into `out_dir` (the only network access here).

    Each file goes to a `.part` name, is checked to unpickle safely as a dall_e module, then renamed.
    Existing files are never overwritten: a rerun fetches only the missing ones. Returns the new files.
    """
    out_dir = Path(out_dir)
    targets = [out_dir / name for name in DALLE_FILES if not (out_dir / name).exists()]
    if not targets:
        raise BeitError(f"{out_dir} already holds {' and '.join(DALLE_FILES)}; remove them to download again")
    out_dir.mkdir(parents=True, exist_ok=True)
    manual = (
        f"download {' and '.join(base_url + n for n in DALLE_FILES)} by other means (a browser, or "
        f"`curl -L -o {out_dir}/encoder.pkl {base_url}encoder.pkl`; mirror: {DALLE_MIRROR_URL}) "
        f"into {out_dir}/"
    )
    for target in targets:
        url = base_url + target.name
        part = target.with_name(target.name + ".part")
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp, open(part, "wb") as f:
                total = int(resp.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=target.name) as bar:
                    while chunk := resp.read(1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
        except (urllib.error.URLError, OSError, ValueError) as err:
            part.unlink(missing_ok=True)
            reason = getattr(err, "reason", err)
            raise BeitError(f"cannot download {url} ({reason}); {manual}") from None
        try:
            load_dalle_pickle(part)
        except BeitError as err:
            part.unlink(missing_ok=True)
            raise BeitError(f"downloaded {url} but it is not a valid DALL-E file ({err}); {manual}") from None
        part.replace(target)
    return targets
