"""The DALL-E tokenizer against the `dall-e` package itself, and its safe loading.

The official encoder.pkl / decoder.pkl are whole modules saved with `torch.save(module)`. Here small
dall_e modules with random weights are saved exactly that way (in torch's zip format and in the legacy
format), loaded through our safe path, and must give the token ids and images the package gives.
"""

from __future__ import annotations

import functools
import http.server
import json
import threading
from pathlib import Path

import dall_e
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from beit.errors import BeitError
from beit.tokenize.base import Tokenizer
from beit.tokenize.dalle import DalleTokenizer, convert_dalle, fetch_dalle, load_dalle_pickle
from beit.tokenize.loading import load_tokenizer, reconstruct_files, save_tokenizer

FINGERPRINT_KEYS = {"name", "vocab_size", "input_size", "grid", "pixel_mapping", "weights_sha256"}
CLOSED_PORT_URL = "http://127.0.0.1:9/"  # the discard port: nothing listens, the connection is refused


def small_encoder(seed: int = 0) -> dall_e.Encoder:
    torch.manual_seed(seed)
    return dall_e.Encoder(n_hid=64, vocab_size=512)  # the package's smallest valid settings


def small_decoder(seed: int = 1) -> dall_e.Decoder:
    torch.manual_seed(seed)
    return dall_e.Decoder(n_init=32, n_hid=64, vocab_size=512)


def photos(size: int) -> torch.Tensor:
    """Two real photos (scikit-image) as uint8 [2,3,size,size]."""
    images = [Image.fromarray(skdata.astronaut()), Image.fromarray(skdata.chelsea())]
    arrays = [np.asarray(im.resize((size, size), Image.Resampling.LANCZOS)) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def package_ids(encoder: dall_e.Encoder, images: torch.Tensor) -> torch.Tensor:
    """What the package gives: map_pixels on [0,1] RGB, encoder logits, argmax over the vocabulary."""
    with torch.no_grad():
        logits = encoder(dall_e.map_pixels(images.float() / 255))
    return logits.argmax(dim=1)


class Payload:
    """A pickle that creates a marker file when it is unpickled by an unsafe loader."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize(("legacy", "size"), [(False, 112), (True, 32)], ids=["zip-format", "legacy-format"])
def test_safe_load_gives_the_package_token_ids(tmp_path: Path, legacy: bool, size: int) -> None:
    encoder = small_encoder()
    path = tmp_path / "encoder.pkl"
    torch.save(encoder, path, _use_new_zipfile_serialization=not legacy)  # as the official file is saved

    tok = load_tokenizer(path, input_size=size)
    assert isinstance(tok, DalleTokenizer) and isinstance(tok, Tokenizer)
    assert (tok.vocab_size, tok.input_size, tok.grid) == (512, size, size // 8)
    images = photos(size)
    ids = tok.encode(images)
    assert ids.dtype == torch.int64 and ids.shape == (2, size // 8, size // 8)
    assert torch.equal(ids, package_ids(encoder, images))
    assert ids.unique().numel() > 1  # real content, not a constant map


def test_encode_at_other_input_sizes_and_map_pixels_range(tmp_path: Path) -> None:
    encoder = small_encoder()
    torch.save(encoder, tmp_path / "encoder.pkl")
    tok = load_tokenizer(tmp_path / "encoder.pkl", input_size=40)
    images = photos(40)
    assert tok.grid == 5 and load_tokenizer(tmp_path / "encoder.pkl").input_size == 112  # the default
    assert torch.equal(tok.encode(images), package_ids(encoder, images))
    mapped = tok.map_pixels(torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1))
    assert torch.allclose(mapped.flatten(), torch.tensor([0.1, 0.5, 0.9]))  # 0.8x + 0.1, not mean/std


def test_encode_rejects_wrong_inputs(tmp_path: Path) -> None:
    torch.save(small_encoder(), tmp_path / "encoder.pkl")
    tok = load_tokenizer(tmp_path / "encoder.pkl", input_size=32)
    with pytest.raises(BeitError, match="uint8"):
        tok.encode(torch.rand(1, 3, 32, 32))
    with pytest.raises(BeitError, match="32 px"):
        tok.encode(torch.zeros(1, 3, 48, 48, dtype=torch.uint8))
    with pytest.raises(BeitError, match="multiple of 8"):
        load_tokenizer(tmp_path / "encoder.pkl", input_size=36)


def test_fingerprint_covers_weights_and_preprocessing(tmp_path: Path) -> None:
    torch.save(small_encoder(seed=0), tmp_path / "encoder.pkl")
    torch.save(small_encoder(seed=5), tmp_path / "other.pkl")
    fp = load_tokenizer(tmp_path / "encoder.pkl").fingerprint()
    assert set(fp) == FINGERPRINT_KEYS
    assert fp["name"] == "dall-e" and "0.8" in fp["pixel_mapping"] and len(fp["weights_sha256"]) == 64
    other = load_tokenizer(tmp_path / "other.pkl").fingerprint()
    assert other["weights_sha256"] != fp["weights_sha256"]
    assert load_tokenizer(tmp_path / "encoder.pkl", input_size=64).fingerprint()["input_size"] == 64


def test_safetensors_conversion_keeps_weights_fingerprint_and_ids(tmp_path: Path) -> None:
    torch.save(small_encoder(), tmp_path / "encoder.pkl")
    converted = convert_dalle(tmp_path / "encoder.pkl")
    assert converted == tmp_path / "encoder.safetensors"
    from_pkl = load_tokenizer(tmp_path / "encoder.pkl", input_size=32)
    from_st = load_tokenizer(converted, input_size=32)
    assert from_st.fingerprint() == from_pkl.fingerprint()
    images = photos(32)
    assert torch.equal(from_st.encode(images), from_pkl.encode(images))
    with pytest.raises(BeitError, match="already exists"):
        convert_dalle(tmp_path / "encoder.pkl")
    # a weights folder prefers the safetensors file; both give the same tokenizer
    assert load_tokenizer(tmp_path, input_size=32).fingerprint() == from_pkl.fingerprint()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip-format", "legacy-format"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path, legacy: bool) -> None:
    marker = tmp_path / "pwned"
    save = {"_use_new_zipfile_serialization": not legacy}
    torch.save(Payload(marker), tmp_path / "probe.pkl", **save)
    torch.load(tmp_path / "probe.pkl", weights_only=False)  # an unsafe loader runs the payload ...
    assert marker.exists()
    marker.unlink()

    bare = tmp_path / "bare.pkl"
    torch.save(Payload(marker), bare, **save)
    hidden = tmp_path / "encoder.pkl"  # a working encoder that carries the payload as an attribute
    encoder = small_encoder()
    encoder.extra = Payload(marker)
    torch.save(encoder, hidden, **save)
    for path in (bare, hidden):
        with pytest.raises(BeitError, match=r"refused to load .*`io\.open`.*nothing in it was run"):
            load_tokenizer(path)
        with pytest.raises(BeitError, match="refused"):
            convert_dalle(path, tmp_path / "out.safetensors")
    assert not marker.exists()  # ... ours refuses it before anything runs
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip-format", "legacy-format"])
def test_pickles_needing_other_classes_are_refused(tmp_path: Path, legacy: bool) -> None:
    path = tmp_path / "encoder.pkl"
    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 2)), path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(BeitError, match=r"needs `torch\.nn\.modules\.linear\.Linear`"):
        load_dalle_pickle(path)
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(BeitError, match="holds a dict, not a dall_e Encoder"):
        load_dalle_pickle(path)
    looped = small_encoder()
    looped.blocks._modules["again"] = looped.blocks  # only allowed classes, but a module inside itself
    torch.save(looped, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(BeitError, match="malformed dall_e module"):
        load_dalle_pickle(path)


def test_broken_downloads_get_a_clear_error(tmp_path: Path) -> None:
    html = tmp_path / "html.pkl"
    html.write_text("<html><body>404 Not Found</body></html>")  # what `wget -o` or a bad URL leaves
    truncated = tmp_path / "truncated.pkl"
    torch.save(small_encoder(), tmp_path / "whole.pkl")
    truncated.write_bytes((tmp_path / "whole.pkl").read_bytes()[:5000])
    for path in (html, truncated, tmp_path / "missing.pkl"):
        with pytest.raises(BeitError) as err:
            load_tokenizer(path)
        assert "\n" not in str(err.value)
    with pytest.raises(BeitError, match="fetch-dalle"):
        load_tokenizer(html)


def test_decoder_beside_the_encoder_reconstructs_like_the_package(tmp_path: Path) -> None:
    encoder, decoder = small_encoder(), small_decoder()
    torch.save(encoder, tmp_path / "encoder.pkl")
    torch.save(decoder, tmp_path / "decoder.pkl")
    tok = load_tokenizer(tmp_path / "encoder.pkl", input_size=32)
    assert tok.has_decoder
    ids = tok.encode(photos(32))
    images = tok.decode(ids)
    with torch.no_grad():
        one_hot = torch.nn.functional.one_hot(ids, 512).permute(0, 3, 1, 2).float()
        expected = dall_e.unmap_pixels(torch.sigmoid(decoder(one_hot)[:, :3]))
    assert images.shape == (2, 3, 32, 32)
    assert torch.allclose(images, expected)

    without = load_tokenizer(tmp_path / "encoder.pkl", input_size=32, with_decoder=False)
    assert not without.has_decoder
    with pytest.raises(BeitError, match="no decoder"):
        without.decode(ids)
    with pytest.raises(BeitError, match="no decoder"):
        reconstruct_files(without, [tmp_path], tmp_path / "grid.png")
    with pytest.raises(BeitError, match="decoder"):
        load_tokenizer(tmp_path / "decoder.pkl")  # a decoder is not a tokenizer

    saved = save_tokenizer(tok, tmp_path / "exported")
    assert sorted(p.name for p in saved.iterdir()) == ["decoder.safetensors", "encoder.safetensors"]
    again = load_tokenizer(saved, input_size=32)
    assert again.fingerprint() == tok.fingerprint()
    assert torch.allclose(again.decode(ids), images)


def test_reconstruct_writes_a_grid_and_psnr(tmp_path: Path) -> None:
    torch.save(small_encoder(), tmp_path / "encoder.pkl")
    torch.save(small_decoder(), tmp_path / "decoder.pkl")
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(skdata.astronaut()).save(folder / "astronaut.png")
    Image.fromarray(skdata.coffee()).save(folder / "coffee.jpg")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    tok = load_tokenizer(tmp_path / "encoder.pkl", input_size=32)
    report = reconstruct_files(tok, [folder], tmp_path / "grid.png")
    assert len(report["psnr"]) == 2 and list(report["skipped"]) == [str(folder / "broken.jpg")]
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (2 + 2 * (32 + 2), 2 + 2 * (32 + 2))  # 2 columns, originals over reconstructions
    assert all(np.isfinite(report["psnr"]))


def test_fetch_dalle_without_network_says_what_to_do(tmp_path: Path) -> None:
    out = tmp_path / "weights"
    with pytest.raises(BeitError) as err:
        fetch_dalle(out, base_url=CLOSED_PORT_URL, timeout=5)
    message = str(err.value)
    assert "cannot download" in message and "curl -L -o" in message and str(out) in message
    assert list(out.iterdir()) == []  # no partial file is left behind

    for name in ("encoder.pkl", "decoder.pkl"):
        (out / name).write_bytes(b"kept")
    with pytest.raises(BeitError, match="already holds"):
        fetch_dalle(out, base_url=CLOSED_PORT_URL, timeout=5)
    assert (out / "encoder.pkl").read_bytes() == b"kept"  # never overwritten


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def local_server(tmp_path: Path):
    """A loopback HTTP server over tmp_path/"served" (the download path without any real network)."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_fetch_dalle_downloads_checks_and_renames(tmp_path: Path, local_server: tuple[Path, str]) -> None:
    served, url = local_server
    torch.save(small_encoder(), served / "encoder.pkl")
    torch.save(small_decoder(), served / "decoder.pkl")
    out = tmp_path / "weights"
    assert fetch_dalle(out, base_url=url) == [out / "encoder.pkl", out / "decoder.pkl"]
    assert sorted(p.name for p in out.iterdir()) == ["decoder.pkl", "encoder.pkl"]  # no .part left
    assert load_tokenizer(out).has_decoder

    (out / "decoder.pkl").unlink()  # a rerun fetches only what is missing
    (served / "decoder.pkl").write_text("<html>Access denied</html>")  # a server's error page
    with pytest.raises(BeitError, match="not a valid DALL-E file"):
        fetch_dalle(out, base_url=url)
    assert sorted(p.name for p in out.iterdir()) == ["encoder.pkl"]


def test_cli_errors_are_one_line_and_convert_works(tmp_path: Path, run_cli) -> None:
    code, _, err = run_cli(
        "tokenizer",
        "fetch-dalle",
        "--out",
        str(tmp_path / "w"),
        "--base-url",
        CLOSED_PORT_URL,
        "--timeout",
        "5",
    )
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: cannot download")
    bad = tmp_path / "bad.pkl"
    torch.save(torch.nn.Linear(2, 2), bad)
    code, _, err = run_cli("tokenizer", "convert", str(bad))
    assert code == 2 and err.count("\n") == 1 and "refused" in err

    torch.save(small_encoder(), tmp_path / "encoder.pkl")
    code, out, _ = run_cli("tokenizer", "convert", str(tmp_path / "encoder.pkl"))
    assert code == 0 and (tmp_path / "encoder.safetensors").is_file()
    code, out, _ = run_cli("tokenizer", "info", str(tmp_path / "encoder.safetensors"))
    expected = load_tokenizer(tmp_path / "encoder.pkl").fingerprint()
    assert code == 0 and json.loads(out)["fingerprint"] == expected
