"""Side-by-side timings of the two speed choices in the BEiT model, printed as JSON with ratios.

1. attention: `scaled_dot_product_attention` with the trainable relative bias as additive mask vs the
   explicit softmax (`beit.model.vit.attend`), forward + backward of the attention core of one layer;
   the model takes the explicit one when training on the CPU, SDPA elsewhere;
2. MIM: the last block, the final norm and `lm_head` on the masked rows only (`model(images, mask)`) vs
   everything on all N patch tokens followed by row selection, forward + backward of the whole model;
3. AdamW: one optimizer step with PyTorch's fused kernel (what `build_optimizer` uses) vs the
   multi-tensor (foreach) implementation (the default on CUDA) and the per-parameter loop (the default
   on the CPU), over the model's parameter groups.

Alternatives are interleaved in one run (this machine is noisy); the median of `--repeats` is reported.

    python bench/model_speed.py --preset small --batch 4 --device cpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from beit.model import create_model
from beit.model.vit import attend
from beit.train.masking import mask_generator
from beit.train.optim import param_groups


def seconds_of(fn, device: torch.device) -> float:
    """Seconds of one call of `fn`, with the GPU synchronized before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def race(alternatives: dict, repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each alternative, run interleaved after one warm-up call each."""
    for fn in alternatives.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in alternatives}
    for _ in range(repeats):
        for name, fn in alternatives.items():
            times[name].append(seconds_of(fn, device))
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    model = create_model(args.preset, mim=True, drop_path_rate=0.0).to(device).train()
    cfg = model.config
    images = torch.randn(args.batch, cfg.in_chans, cfg.image_size, cfg.image_size, device=device)
    generator = mask_generator(cfg.grid)  # the official 75-of-196 blockwise masking, scaled to the grid
    mask = torch.stack([torch.from_numpy(generator()) for _ in range(args.batch)]).flatten(1).to(device)
    targets = torch.randint(0, cfg.vocab_size, (int(mask.sum()),), device=device)

    shape = (args.batch, cfg.num_heads, cfg.num_patches + 1, cfg.embed_dim // cfg.num_heads)
    q, k, v = (torch.randn(shape, device=device, requires_grad=True) for _ in range(3))

    def attention(explicit: bool):
        def step() -> None:
            bias = model.rel_pos_bias().unsqueeze(0)  # [1, H, N+1, N+1], part of the graph as in training
            attend(q, k, v, bias, explicit=explicit)[0].sum().backward()

        return step

    def mim(masked_only: bool):
        def step() -> None:
            if masked_only:
                logits = model(images, mask)
            else:
                logits = model(images, mask, return_all_tokens=True)[mask]
            F.cross_entropy(logits, targets).backward()

        return step

    for param in model.parameters():
        param.grad = torch.randn_like(param)
    variants = {"fused": {"fused": True}, "foreach": {"foreach": True}, "per_parameter": {"foreach": False}}
    optimizers = {  # fresh groups each: an optimizer writes its defaults into the group dicts it gets
        name: torch.optim.AdamW(param_groups(model, weight_decay=0.05), lr=1e-4, **flags)
        for name, flags in variants.items()
    }
    adamw_times = race({name: opt.step for name, opt in optimizers.items()}, args.repeats, device)
    model.zero_grad(set_to_none=True)

    attention_times = race({"sdpa": attention(False), "explicit": attention(True)}, args.repeats, device)
    head_times = race({"masked_rows": mim(True), "all_tokens": mim(False)}, args.repeats, device)
    print(
        json.dumps(
            {
                "device": str(device),
                "torch": torch.__version__,
                "preset": args.preset,
                "batch": args.batch,
                "masked_per_image": float(mask.sum()) / args.batch,
                "attention_fwd_bwd_s": attention_times,
                "attention_explicit_over_sdpa": attention_times["explicit"] / attention_times["sdpa"],
                "mim_step_fwd_bwd_s": head_times,
                "mim_all_tokens_over_masked_rows": head_times["all_tokens"] / head_times["masked_rows"],
                "adamw_step_s": adamw_times,
                "adamw_over_fused": {
                    name: adamw_times[name] / adamw_times["fused"] for name in ("foreach", "per_parameter")
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
