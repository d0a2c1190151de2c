"""The `beit` command: one sub-command per job. Thin by design: parse, validate, call the stage.

A `BeitError` raised anywhere below becomes one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import typer

from beit.errors import BeitError

app = typer.Typer(
    help="BEiT: offline tokenization to WebDataset shards, masked-image-modeling pretraining, fine-tuning.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


# ---- beit model … (engineer M1) ----------------------------------------------------------------------

model_app = typer.Typer(help="Inspect the BEiT Vision Transformer presets.", no_args_is_help=True)
app.add_typer(model_app, name="model")


@model_app.command("summary")
def model_summary(
    preset: str = typer.Option("base", help="Model preset: tiny, small, base or large."),
    mim: bool = typer.Option(False, "--mim", help="Pretraining layout (mask token, shared rel-pos, lm_head)"),
    num_classes: int = typer.Option(0, help="Classes of the fine-tuning head (0: pooled features, no head)."),
    image_size: int = typer.Option(None, help="Override the preset's image size (pixels)."),
    num_masked: int = typer.Option(None, help="MIM only: masked patches for the head (default 75/196 of N)."),
) -> None:
    """Print the layout, parameter count and FLOPs per image of a preset (built on the meta device: no
    weights are allocated, so even `large` is instant)."""
    import torch

    from beit.model import create_model
    from beit.model.vit import count_flops
    from beit.train.masking import scaled_mask_size

    overrides = {} if image_size is None else {"image_size": image_size}
    with torch.device("meta"):
        model = create_model(preset, mim=mim, num_classes=num_classes, **overrides)
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    masked = scaled_mask_size(cfg.num_patches)[0] if num_masked is None else num_masked
    flops = count_flops(cfg, masked)
    layout = "pretraining layout (MIM)" if cfg.mim else f"fine-tuning layout, {cfg.num_classes} classes"
    rel_pos = "off" if not cfg.use_rel_pos_bias else ("shared" if cfg.rel_pos_shared else "per block")
    typer.echo(f"preset        {preset}, {layout}")
    typer.echo(f"image         {cfg.image_size} px, patch {cfg.patch_size}, grid {cfg.grid}x{cfg.grid}")
    typer.echo(
        f"encoder       {cfg.depth} blocks, width {cfg.embed_dim}, {cfg.num_heads} heads, "
        f"MLP x{cfg.mlp_ratio:g}, LayerScale {cfg.layer_scale_init:g}, rel-pos {rel_pos}, "
        f"abs-pos {'on' if cfg.use_abs_pos_emb else 'off'}"
    )
    if cfg.mim:
        typer.echo(f"head          lm_head to {cfg.vocab_size} tokens, on {masked} masked patches")
    typer.echo(f"parameters    {params:,}")
    typer.echo(f"FLOPs/image   {flops:,} ({flops / 1e9:.2f} GFLOPs = {flops / 2e9:.2f} GMACs, forward)")


# ---- beit pretrain (engineer P) --------------------------------------------------------------------------


def _model_options(items: list[str] | None) -> dict | None:
    """`--model key=value` pairs -> ModelConfig overrides (values parsed as JSON: 2, 0.1, true; else text)."""
    import json

    if not items:
        return None
    overrides = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise BeitError(f"--model expects key=value (e.g. depth=2), got {item!r}")
        try:
            overrides[key.strip()] = json.loads(raw)
        except ValueError:
            overrides[key.strip()] = raw
    return overrides


@app.command("pretrain")
def pretrain_command(
    shards: str = typer.Argument(None, help="Shard set directory written by `beit tokenize`."),
    output: str = typer.Option(None, "--output", "-o", help="Run directory (checkpoints, metrics, model)."),
    preset: str = typer.Option(None, help="Model size and its training defaults: tiny, small, base, large."),
    config: str = typer.Option(
        None, help="TOML file: keys named as the options, plus a model table of model overrides."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest complete checkpoint."),
    steps: int = typer.Option(None, help="Optimizer steps in total."),
    warmup_steps: int = typer.Option(None, help="Linear warmup steps (from lr 0)."),
    batch_size: int = typer.Option(None, help="Images per process per micro-batch."),
    grad_accum: int = typer.Option(None, help="Micro-batches per optimizer step."),
    lr: float = typer.Option(None, help="Peak learning rate (official: 1.5e-3 for a total batch of 2048)."),
    min_lr: float = typer.Option(None, help="Final learning rate of the cosine schedule."),
    weight_decay: float = typer.Option(None, help="AdamW weight decay (official 0.05)."),
    weight_decay_end: float = typer.Option(None, help="Final weight decay of a cosine (default: constant)."),
    betas: tuple[float, float] = typer.Option(None, help="AdamW betas, two numbers (official: 0.9 0.999)."),
    eps: float = typer.Option(None, help="AdamW epsilon (official 1e-8)."),
    clip_grad: float = typer.Option(None, help="Gradient-norm clip (official 3.0 base, 1.0 large; 0: off)."),
    drop_path: float = typer.Option(None, help="Stochastic depth rate of the last block (official 0.1)."),
    layer_scale: float = typer.Option(None, help="LayerScale init (default: the preset's; 0 disables)."),
    model: list[str] = typer.Option(None, "--model", help="Model override key=value, repeatable: depth=2."),
    num_masked: int = typer.Option(None, help="Patches to mask per image (default: 75/196 of the grid)."),
    min_block: int = typer.Option(None, help="Smallest mask block (default: max(4, 16/196 of the grid))."),
    max_block: int = typer.Option(None, help="Largest mask block (default: num_masked)."),
    min_aspect: float = typer.Option(
        None, help="Smallest mask-block aspect ratio; the largest is 1/it (0.3)."
    ),
    random_masking: bool = typer.Option(
        None,
        "--random-masking/--block-masking",
        help="Uniform random masking (paper ablation) instead of blockwise.",
    ),
    normalization: str = typer.Option(None, help="Normalization on the device: half (0.5) or imagenet."),
    mixed_precision: str = typer.Option(None, help="no, bf16 or fp16 (fp16 adds a gradient scaler)."),
    compile: bool = typer.Option(None, "--compile/--no-compile", help="torch.compile the model."),
    num_workers: int = typer.Option(None, help="Loader worker processes per process."),
    shuffle_buffer: int = typer.Option(None, help="Samples in each worker's shuffle buffer."),
    epoch_batches: int = typer.Option(None, help="Batches per epoch per process (default: one pass)."),
    split: str = typer.Option(None, help="Shard split to train on (default: train)."),
    seed: int = typer.Option(None, help="Seed of the weights, masks and data order."),
    save_every: int = typer.Option(None, help="Checkpoint every N steps (and at the end)."),
    keep_last: int = typer.Option(None, help="Complete checkpoints to keep."),
    log_every: int = typer.Option(None, help="Log metrics every N steps."),
    tensorboard: bool = typer.Option(None, "--tensorboard/--no-tensorboard", help="Also log to TensorBoard."),
) -> None:
    """Pretrain BEiT by masked image modeling on a shard set (Accelerate: `accelerate launch` or
    `torchrun` for several processes or nodes). Settings: preset < --config TOML < options; an option left
    out keeps the preset's or the file's value (the README's recipe table lists the defaults)."""
    options = {k: v for k, v in locals().items() if k not in ("config", "resume", "model")}
    import logging

    from beit.config import pretrain_config
    from beit.train.pretrain import pretrain

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one INFO line per file of every checkpoint
    cfg = pretrain_config(config, model=_model_options(model), **options)
    final = pretrain(cfg, resume=resume)
    if final:
        typer.echo(
            f"step {final['step']}: loss {final['loss']:.4f}, masked accuracy {final['mlm_acc']:.4f}; "
            f"model in {cfg.output}"
        )


# ---- beit tokenize, beit shards … (engineer J) -------------------------------------------------------------


@app.command("tokenize")
def tokenize_command(
    data: str = typer.Argument(
        ...,
        help="Image folder (class sub-folders become labels), or a .txt/.parquet "
        "file list (path, optional label).",
    ),
    out: str = typer.Argument(..., help="Shard set directory; created, or resumed/extended by a rerun."),
    tokenizer: str = typer.Option(..., help="DALL-E encoder.pkl/.safetensors, or a dVAE directory."),
    preset: str = typer.Option("base", help="Model preset whose image size the patch view takes."),
    image_size: int = typer.Option(None, help="Patch-view size in pixels (overrides the preset's)."),
    views: int = typer.Option(1, help="Augmented views per image; rerun with more to add view series."),
    seed: int = typer.Option(0, help="Seed of every augmentation (with item id and view index)."),
    shard_size: int = typer.Option(1000, help="Images per shard (chunk) for items new to the plan."),
    split: str = typer.Option("train", help="Split name of these images (part of the shard names)."),
    partition: str = typer.Option(
        None,
        help="i/N: write every N-th shard from the i-th (default: "
        "RANK/WORLD_SIZE of torchrun or accelerate launch, else 0/1).",
    ),
    workers: int = typer.Option(None, help="Decode/augment processes (default: CPU cores per process)."),
    batch_size: int = typer.Option(64, help="Images per tokenizer batch."),
    device: str = typer.Option(None, help="Tokenizer device (default: the fastest present: cuda, mps, cpu)."),
    claim_timeout: float = typer.Option(
        600.0, help="Seconds after which another machine's silent claim on a shard is taken over."
    ),
    progress: bool = typer.Option(True, "--progress/--quiet", help="Show a progress bar."),
) -> None:
    """Run the tokenizer over augmented views of DATA and write WebDataset shards to OUT.

    Partitioned, resumable and idempotent: rerun the same command (cron, another machine, after a kill) and
    only missing shards are written, with the same bytes an uninterrupted run gives."""
    import logging
    import os

    from beit.config import model_config
    from beit.tokenize.job import parse_partition, tokenize_dataset
    from beit.tokenize.loading import load_tokenizer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tok = load_tokenizer(tokenizer, with_decoder=False)
    model = model_config(preset)
    if image_size is None:
        if model.grid != tok.grid:
            raise BeitError(
                f"preset {preset!r} has a {model.grid}x{model.grid} patch grid but the tokenizer "
                f"gives {tok.grid}x{tok.grid} tokens; pick the matching --preset or --image-size"
            )
        image_size = model.image_size
    if workers is None:
        workers = min(8, max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    summary = tokenize_dataset(
        data,
        out,
        tok,
        image_size=image_size,
        views=views,
        seed=seed,
        shard_size=shard_size,
        partition=parse_partition(partition),
        num_workers=workers,
        batch_size=batch_size,
        split=split,
        device=device,
        claim_timeout=claim_timeout,
        progress=progress,
    )
    typer.echo(
        f"wrote {summary.shards_written} of {summary.shards_assigned} shards of this partition "
        f"({summary.samples} samples, {summary.skipped} items skipped) in {summary.seconds:.1f} s "
        f"({summary.images_per_second:.1f} images/s); {summary.shards_complete_before} were complete, "
        f"{summary.shards_busy} busy elsewhere; shard set {out}"
    )


shards_app = typer.Typer(help="Check and look into shard sets of `beit tokenize`.", no_args_is_help=True)
app.add_typer(shards_app, name="shards")


@shards_app.command("verify")
def shards_verify(
    directory: str = typer.Argument(..., help="Shard set directory."),
    progress: bool = typer.Option(True, "--progress/--quiet", help="Show a progress bar."),
) -> None:
    """Check every complete shard against its stats (size, SHA-256, count) and decode every sample
    (image size, token grid and range, metadata). Exit code 1 on any problem."""
    from beit.shards.verify import verify_shard_set

    report = verify_shard_set(directory, progress=progress)
    for note in report.notes:
        typer.echo(f"note: {note}")
    for problem in report.problems:
        typer.echo(f"PROBLEM: {problem}", err=True)
    status = "OK" if report.ok else f"{len(report.problems)} problem(s)"
    typer.echo(f"{status}: {report.shards} shards, {report.samples} samples checked in {directory}")
    if not report.ok:
        raise typer.Exit(1)


@shards_app.command("inspect")
def shards_inspect(
    directory: str = typer.Argument(..., help="Shard set directory."),
    render: tuple[int, str] = typer.Option(
        (0, ""), metavar="N OUT.PNG", help="Also draw the first N samples with their token grids."
    ),
) -> None:
    """Print counts per split and view, sizes, skipped items by reason and the label histogram (JSON)."""
    import json

    from beit.shards import inspect as shard_inspect

    typer.echo(json.dumps(shard_inspect.summarize(directory), indent=2))
    count, png = render
    if count > 0:
        if not png:
            raise BeitError("--render needs a count and an output file, e.g. --render 8 samples.png")
        typer.echo(f"rendered {count} samples to {shard_inspect.render(directory, count, png)}")


# ---- beit checkpoint … (engineer M2) -------------------------------------------------------------------

checkpoint_app = typer.Typer(
    help="Inspect and convert checkpoints: ours, official unilm .pth files, timm weights.",
    no_args_is_help=True,
)
app.add_typer(checkpoint_app, name="checkpoint")


@checkpoint_app.command("info")
def checkpoint_info(
    path: str = typer.Argument(..., help="Checkpoint directory, .safetensors or official/timm .pth file."),
) -> None:
    """Print a checkpoint's model config, parameter count and metadata as JSON.

    The config comes from our config.json, or is inferred from the weights' shapes for official and timm
    files. Only weights are read: no pickled code ever runs."""
    import json

    from beit.model.checkpoint import checkpoint_model_config, read_checkpoint

    state, config = read_checkpoint(path)
    info = {
        "path": str(path),
        "kind": "beit" if config else "official/timm (config inferred from shapes)",
        "model": checkpoint_model_config(state, config).to_dict(),
        "tensors": len(state),
        "parameters": sum(t.numel() for t in state.values()),
        **{k: v for k, v in (config or {}).items() if k not in ("model", "format_version")},
    }
    typer.echo(json.dumps(info, indent=2))


@checkpoint_app.command("convert")
def checkpoint_convert(
    source: str = typer.Argument(..., help="Checkpoint directory, .safetensors or official/timm .pth file."),
    out: str = typer.Argument(..., help="Output checkpoint directory (model.safetensors + config.json)."),
    image_size: int = typer.Option(
        None,
        help="Image size of the new model: position tables and embeddings "
        "are resampled to its patch grid (e.g. 384).",
    ),
    finetune: bool = typer.Option(
        False,
        "--finetune",
        help="Fine-tuning layout: the shared pretraining "
        "table is copied into every block; lm_head, "
        "mask_token and norm are dropped.",
    ),
    num_classes: int = typer.Option(
        None,
        help="Classes of the fine-tuning head (implies --finetune); a "
        "head of another size is dropped and freshly initialized.",
    ),
) -> None:
    """Convert SOURCE into our checkpoint format in OUT, optionally for another image size or layout.

    The weights are converted the way the official fine-tuning script converts them when it loads them:
    shared table copied per block, tables resampled geometrically, pos_embed resized bicubically."""
    from beit.model.checkpoint import convert_checkpoint

    overrides: dict = {} if image_size is None else {"image_size": image_size}
    if finetune or num_classes is not None:
        overrides["mim"] = False
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    directory = convert_checkpoint(source, out, **overrides)
    typer.echo(f"wrote {directory}")


# ---- beit tokenizer … (engineer T) -------------------------------------------------------------------

tokenizer_app = typer.Typer(
    help="Visual tokenizers: fetch/convert the DALL-E weights, train your own dVAE, inspect, reconstruct.",
    no_args_is_help=True,
)
app.add_typer(tokenizer_app, name="tokenizer")


@tokenizer_app.command("fetch-dalle")
def tokenizer_fetch_dalle(
    out: str = typer.Option("weights", help="Directory for encoder.pkl and decoder.pkl (never overwritten)."),
    base_url: str = typer.Option(
        None,
        help="Where the two files live (default: OpenAI's CDN; the BEiT "
        "mirror is https://conversationhub.blob.core.windows.net/"
        "beit-share-public/dall-e_vae/).",
    ),
    timeout: float = typer.Option(60.0, help="Network timeout in seconds."),
) -> None:
    """Download the official DALL-E encoder.pkl and decoder.pkl (the only command that uses the network).

    Each file is checked to unpickle safely as a DALL-E module before it is renamed into place. Without a
    network, the error says how to fetch the files by hand and where to put them."""
    from beit.tokenize.dalle import DALLE_BASE_URL, fetch_dalle

    for path in fetch_dalle(out, base_url or DALLE_BASE_URL, timeout=timeout):
        typer.echo(f"wrote {path}")


@tokenizer_app.command("convert")
def tokenizer_convert(
    source: str = typer.Argument(..., help="Official encoder.pkl or decoder.pkl."),
    out: str = typer.Option(None, help="Output .safetensors file (default: beside SOURCE, same stem)."),
) -> None:
    """Convert a DALL-E .pkl to .safetensors once: read by safe unpickling (only the classes of the official
    files are allowed; nothing in the file runs), same weights, same tokenizer fingerprint."""
    from beit.tokenize.dalle import convert_dalle

    typer.echo(f"wrote {convert_dalle(source, out)}")


@tokenizer_app.command("info")
def tokenizer_info(
    path: str = typer.Argument(..., help="encoder.pkl/.safetensors, DALL-E weights folder or dVAE folder."),
) -> None:
    """Print a tokenizer's fingerprint (name, vocabulary, input size, grid, pixel mapping, weights SHA-256)
    as JSON: shard sets made with different fingerprints are never mixed."""
    import json

    from beit.tokenize.loading import load_tokenizer

    tok = load_tokenizer(path, with_decoder=False)
    typer.echo(json.dumps({"path": path, "fingerprint": tok.fingerprint()}, indent=2))


@tokenizer_app.command("train")
def tokenizer_train(
    data: str = typer.Option(..., help="Image folder (searched recursively) or a .txt/.parquet file list."),
    out: str = typer.Option(
        ...,
        help="Output directory: a loadable tokenizer at every checkpoint, plus "
        "train_state.pt and train_log.jsonl.",
    ),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue the run in OUT (its model shape is kept; raise --steps to train longer).",
    ),
    preset: str = typer.Option(
        "base",
        help="dVAE shape: base (112 px, x8 -> 14x14, 8192 codes) or tiny "
        "(32 px, x4 -> 8x8, 512 codes: pairs with the tiny BEiT).",
    ),
    input_size: int = typer.Option(None, help="Image size in pixels (overrides the preset)."),
    downsample: int = typer.Option(None, help="Pixels per token cell side, a power of 2 (overrides)."),
    vocab_size: int = typer.Option(None, help="Codebook size K (overrides)."),
    hidden: int = typer.Option(None, help="Conv width (overrides)."),
    codebook_dim: int = typer.Option(None, help="Codebook embedding width (overrides)."),
    num_resblocks: int = typer.Option(None, help="Residual blocks per resolution (overrides)."),
    steps: int = typer.Option(20_000, help="Optimizer steps in total."),
    batch_size: int = typer.Option(64, help="Images per step."),
    lr: float = typer.Option(1e-3, help="Peak learning rate (AdamW)."),
    min_lr: float = typer.Option(1e-5, help="Final learning rate of the cosine schedule."),
    warmup_steps: int = typer.Option(200, help="Linear learning-rate warmup steps."),
    weight_decay: float = typer.Option(1e-4, help="AdamW weight decay."),
    temperature_start: float = typer.Option(1.0, help="Gumbel-softmax temperature at step 0."),
    temperature_end: float = typer.Option(1 / 16, help="Final temperature (DALL-E: 1/16)."),
    temperature_steps: int = typer.Option(None, help="Cosine annealing length in steps (default: all)."),
    kl_weight: float = typer.Option(0.001, help="Weight of KL(q || uniform prior), nats per cell."),
    kl_warmup_steps: int = typer.Option(1000, help="Steps of the KL weight's linear warmup from 0."),
    usage_weight: float = typer.Option(
        0.1,
        help="Weight of KL(mean posterior || uniform): spreads the codes "
        "over the codebook (0: the DALL-E recipe as published).",
    ),
    straight_through: bool = typer.Option(
        False, "--straight-through", help="Hard one-hot samples in the forward pass, soft gradients."
    ),
    crop_min_scale: float = typer.Option(0.35, help="Smallest crop area share of the random resized crops."),
    workers: int = typer.Option(2, help="Image decoding processes."),
    log_every: int = typer.Option(20, help="Write a train_log.jsonl line every N steps."),
    checkpoint_every: int = typer.Option(1000, help="Checkpoint every N steps (and at the end)."),
    seed: int = typer.Option(0, help="Seed of the weights, data order, crops and Gumbel noise."),
    device: str = typer.Option(None, help="cuda or cpu (default: cuda when present)."),
) -> None:
    """Train our own discrete VAE tokenizer (Gumbel-softmax relaxation, temperature annealed, KL to a
    uniform prior, MSE reconstruction) on an image folder; bad images are skipped and counted.

    OUT is a loadable tokenizer at every checkpoint; train_log.jsonl has the reconstruction loss, KL,
    temperature, learning rate, perplexity and share of codes used; --resume continues exactly."""
    import logging

    from beit.tokenize.dvae import dvae_config
    from beit.tokenize.dvae_train import DVAETrainConfig, train_dvae

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model_cfg = dvae_config(
        preset,
        input_size=input_size,
        downsample=downsample,
        vocab_size=vocab_size,
        hidden=hidden,
        codebook_dim=codebook_dim,
        num_resblocks=num_resblocks,
    )
    cfg = DVAETrainConfig(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        min_lr=min_lr,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        temperature_start=temperature_start,
        temperature_end=temperature_end,
        temperature_steps=temperature_steps,
        kl_weight=kl_weight,
        kl_warmup_steps=kl_warmup_steps,
        usage_weight=usage_weight,
        straight_through=straight_through,
        crop_scale=(crop_min_scale, 1.0),
        num_workers=workers,
        log_every=log_every,
        checkpoint_every=checkpoint_every,
        seed=seed,
    )
    summary = train_dvae(data, out, model_cfg, cfg, resume=resume, device=device)
    last = summary["last"]
    metrics = (
        (
            f": reconstruction loss {last['recon_loss']:.4f}, {last['codes_used']:.0%} of the codes used, "
            f"perplexity {last['perplexity']:.1f}"
        )
        if last
        else ""
    )
    typer.echo(
        f"step {summary['step']}{metrics}; {summary['skipped_images']} images skipped; tokenizer in {out}"
    )


@tokenizer_app.command("reconstruct")
def tokenizer_reconstruct(
    tokenizer: str = typer.Option(..., help="A dVAE folder, or DALL-E weights with the decoder beside them."),
    images: list[str] = typer.Option(..., help="An image file or folder; repeat for more."),
    out: str = typer.Option("reconstructions.png", help="PNG grid: originals on top, reconstructions below."),
    limit: int = typer.Option(16, help="Use at most this many images."),
    device: str = typer.Option(None, help="cuda or cpu (default: cuda when present)."),
) -> None:
    """Encode images to tokens and decode them back: writes a PNG grid and prints the PSNR."""
    import torch

    from beit.tokenize.loading import load_tokenizer, reconstruct_files

    tok = load_tokenizer(tokenizer).to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    report = reconstruct_files(tok, images, out, limit=limit)
    for path, psnr in zip(report["images"], report["psnr"], strict=True):
        typer.echo(f"{psnr:6.2f} dB  {path}")
    for path, reason in report["skipped"].items():
        typer.echo(f"skipped {path}: {reason}", err=True)
    typer.echo(
        f"mean PSNR {report['mean_psnr']:.2f} dB over {len(report['psnr'])} images; grid in {report['out']}"
    )


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except BeitError as err:
        typer.echo(f"error: {err}", err=True)
        raise SystemExit(err.exit_code) from None
