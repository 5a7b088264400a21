"""Tokenizer throughput: training images/s, peak memory, encode and decode images/s.

    python benchmarks/tokenizer.py                                   # CPU, the default profile's tiny tokenizer
    python benchmarks/tokenizer.py --device cuda --size L --batch 16 32 [--compile] [--checkpointing all] [--json out.json]

The training step is the one train_tokenizer runs with the loss set L2 + VQ only (VF branch off, no LPIPS, no GAN):
forward (bf16 autocast on CUDA, VQ and pixel decoder fp32), MSE + VQ loss, backward, grad clip, AdamW (fused on
CUDA), EMA update. Encode = image -> codes, decode = all codes -> image, both under no_grad (bf16 on CUDA).
Every configuration runs on the plain eager path; with --compile also with the training stage's regional
torch.compile (`ResTok.compile_regions`), and the ratio compiled / eager is printed. --checkpointing applies the
stage's `loop.checkpointing` to the training step of both paths. Size L is the paper's ResTok-L/128 at 256 px; the official code on one H100 80GB
(bf16 autocast, eager) does 38 train images/s at batch 16 (49.9 GiB peak; batch 32 runs out of memory), and
158 encode / 234 decode images/s at batch 16: those figures are printed beside ours as ratios.
Peak memory: torch.cuda.max_memory_allocated on CUDA; on CPU the process's peak RSS (includes everything loaded).
Each row also lists the attention kernels one profiled training step ran (restok.models.attention.sdpa_kernels).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
import time

import torch
import torch.nn.functional as F

from restok.config.engine import build
from restok.config.profiles import profile_tree
from restok.config.tokenizer import TokenizerParams
from restok.models.attention import sdpa_kernels
from restok.models.recompute_mode import Checkpointing
from restok.models.tokenizer import ResTok, TokenizerConfig
from restok.train import optim
from restok.train.ema import EMA

OFFICIAL_H100 = {  # ResTok-L/128, 256 px, batch 16, bf16 autocast, eager (Kwai-Kolors/ResTok), timed with its own code on one H100
    "train_images_per_s": 38.0,
    "train_peak_gib": 49.9,
    "encode_images_per_s": 158.0,
    "decode_images_per_s": 234.0,
    "batch": 16,
    "note": "batch 32: out of memory",
}


def tokenizer_cfg(size: str) -> TokenizerConfig:
    """'default': the default profile's tokenizer at 64 px; 'L': the paper's ResTok-L/128 at 256 px; VF off."""
    if size == "L":
        return dataclasses.replace(TokenizerConfig(), vf_align=False, vf_dim=None)
    section = build(TokenizerParams, profile_tree("default")["tokenizer"], "workflow/params/default.yaml:tokenizer")
    return TokenizerConfig(**{**dataclasses.asdict(section), "resolution": 64, "vf_dim": None, "vf_align": False})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _rate(fn, batch: int, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return batch * steps / (time.perf_counter() - t0)


def measure(*args, **kwargs) -> dict:
    """`_measure`, then the CUDA cache emptied: its model, EMA and optimiser are gone once it returns."""
    result = _measure(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def _measure(
    cfg: TokenizerConfig,
    batch: int,
    device: torch.device,
    compile: bool,
    checkpointing: Checkpointing,
    steps: int,
    warmup: int,
) -> dict:
    torch.manual_seed(0)
    model = ResTok(cfg).to(device)
    model.set_checkpointing(checkpointing)
    ema = EMA(model, 0.9999)
    opt = optim.adamw(model, 1e-4, 1e-4)
    if compile:
        model.compile_regions()
    x = torch.rand(batch, 3, cfg.resolution, cfg.resolution, device=device)
    bf16 = device.type == "cuda"

    def train_step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        loss = F.mse_loss(out.recon.float(), x) + out.quant_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        ema.update(model)

    result = {"batch": batch, "compile": compile, "checkpointing": checkpointing}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        model.train()
        result["train_images_per_s"] = _rate(train_step, batch, steps, warmup, device)
        result["train_peak_gib"] = _peak_gib(device)
        result["attention_kernels"] = sdpa_kernels(train_step)  # one more step, profiled: fused or math?
        model.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            codes = model.encode(x)
            result["encode_images_per_s"] = _rate(lambda: model.encode(x), batch, steps, warmup, device)
            result["decode_images_per_s"] = _rate(lambda: model.decode(codes), batch, steps, warmup, device)
    except torch.cuda.OutOfMemoryError:
        result["oom"] = True
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--size", default=None, choices=["default", "L"], help="default: 'default' on CPU, 'L' on CUDA")
    ap.add_argument("--batch", type=int, nargs="+", default=None, help="default: 32 on CPU, 16 32 on CUDA")
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile and print compiled / eager")
    ap.add_argument(
        "--checkpointing",
        default="none",
        choices=["none", "blocks", "all"],
        help="activation checkpointing of the training step (params loop.checkpointing)",
    )
    ap.add_argument("--steps", type=int, default=None, help="timed iterations (default 5 CPU, 20 CUDA)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default 1 CPU, 5 CUDA)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    size = args.size or ("L" if cuda else "default")
    batches = args.batch or ([16, 32] if cuda else [32])
    steps, warmup = args.steps or (20 if cuda else 5), args.warmup or (5 if cuda else 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = tokenizer_cfg(size)
    name = torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    print(
        f"tokenizer benchmark: size {size} ({cfg.resolution} px, {cfg.num_tokens} tokens), {name}, "
        f"loss L2 + VQ (VF off), checkpointing {args.checkpointing}, torch {torch.__version__}"
    )
    rows = []
    for batch in batches:
        eager = measure(cfg, batch, device, False, args.checkpointing, steps, warmup)
        rows.append(eager)
        if args.compile:
            compiled = measure(cfg, batch, device, True, args.checkpointing, steps, warmup)
            compiled["speedup_vs_eager"] = {
                k: compiled[k] / eager[k] for k in compiled if k.endswith("images_per_s") and k in eager
            }
            rows.append(compiled)
    for row in rows:
        label = f"batch {row['batch']:>3} {'compiled' if row['compile'] else 'eager   '}"
        if row.get("oom"):
            print(f"{label}: out of memory")
            continue
        cells = [
            f"train {row['train_images_per_s']:8.2f} img/s",
            f"peak {row['train_peak_gib']:6.2f} GiB",
            f"encode {row['encode_images_per_s']:8.2f} img/s",
            f"decode {row['decode_images_per_s']:8.2f} img/s",
        ]
        if size == "L" and cuda and row["batch"] == OFFICIAL_H100["batch"]:
            ref = {k: row[k] / OFFICIAL_H100[k] for k in OFFICIAL_H100 if k.endswith("images_per_s")}
            row["ratio_vs_official_h100"] = ref
            cells.append("vs official H100: " + ", ".join(f"{k.split('_')[0]} x{v:.2f}" for k, v in ref.items()))
        if "speedup_vs_eager" in row:
            speedups = row["speedup_vs_eager"].items()
            cells.append("vs eager: " + ", ".join(f"{k.split('_')[0]} x{v:.2f}" for k, v in speedups))
        print(f"{label}: " + " | ".join(cells))
        print(f"{'':16}  attention kernels: {', '.join(row['attention_kernels']) or 'none seen'}")
    if size == "L" and cuda:
        print(f"official reference (H100 80GB, bf16, eager): {json.dumps(OFFICIAL_H100)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": size, "device": name, "rows": rows, "official_h100": OFFICIAL_H100}, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
