"""Generator throughput: training sequences/s, MFU and peak memory, and sampling images/s with the static KV cache.

    python benchmarks/generator.py --device cuda --size har-L --batch 32 --dtype bf16 --compile    # GPU
    python benchmarks/generator.py --device cpu --size har-tiny --batch 8 --sample-batch 4 --steps 3  # CPU smoke

Setting of the paper's reference (docs/method.md, generator §1-4): GPT-L HAR (`har-L`), 128 tokens, vocabulary
8192, 1000 classes; training = forward + cross-entropy + backward + AdamW step (fused on CUDA) at batch 32;
sampling = generator only, 9 passes, CFG 3.75 with the step schedule, top-p 0.95, batch 50. Every run measures our
plain eager path and, with --compile, the fast path (torch.compile of the training model and of the cached
inference pass), and prints the ratios fast / eager and against the official numbers on one H100 80GB (bf16,
eager): 286 training sequences/s at batch 32 (11.2 GiB peak, about 9 % of the bf16 peak) and 177 sampled images/s
at batch 50 (162 in fp32). Targets on that GPU: >= 4x training throughput and 5x sampling throughput.

Each path also lists the attention kernels of one profiled training step and sampling call
(restok.models.attention.sdpa_kernels: fused, or the `_math` fallback), and how often inductor declined a CUDA graph.
MFU counts 6 * (matmul parameters) * T + 12 * layers * T^2 * width FLOPs per training sequence (nanoGPT's rule; the
block mask is not subtracted) against the dense peak of the GPU model (bf16, or TF32 for fp32); none on CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import time

import torch
from torch import nn
from torch._dynamo.utils import counters

from restok.models.attention import sdpa_kernels
from restok.models.generator import GENERATOR_PRESETS, HARGenerator, generator_config
from restok.sampling import SamplingConfig, allocate_kv_cache, compile_sampling, generate, pass_rows
from restok.train.optim import adamw

OFFICIAL_H100 = {"train_seq_per_s": 286.0, "train_peak_gib": 11.2, "sample_img_per_s": {"bf16": 177.0, "fp32": 162.0}}
TARGETS = {"train": 4.0, "sample": 5.0}  # the speed targets on that GPU
PEAK_FLOPS = {
    "H100": {"bf16": 989.4e12, "fp32": 494.7e12},
    "H200": {"bf16": 989.4e12, "fp32": 494.7e12},
    "A100": {"bf16": 312e12, "fp32": 156e12},
}  # dense tensor-core peaks (fp32 = TF32)


def build(size: str, tokens: int, vocab: int, classes: int, device: torch.device) -> HARGenerator:
    """The preset with a N(0, 0.02) output head (the zero head would make sampling uniform, docs/method.md, generator §1)."""
    torch.manual_seed(0)
    model = HARGenerator(generator_config(size, num_tokens=tokens, vocab_size=vocab, num_classes=classes))
    nn.init.normal_(model.head.weight, std=model.cfg.init_std)
    return model.to(device)


def compile_for_training(model: HARGenerator, mode: str = "default") -> nn.Module:
    """The fast training path: the whole teacher-forced forward (trunk + chunked fp32 CE) compiled."""
    return torch.compile(model, mode=mode, dynamic=False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory since the last reset, or on CPU the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def train_flops_per_sequence(model: HARGenerator) -> float:
    cfg = model.cfg
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    return 6.0 * matmul * cfg.num_tokens + 12.0 * cfg.n_layer * cfg.num_tokens**2 * cfg.dim


def bench_train(
    model: HARGenerator, net: nn.Module, batch: int, steps: int, warmup: int, autocast, device: torch.device
) -> dict:
    """Sequences/s of full optimiser steps on random codes; peak memory over the timed steps."""
    cfg = model.cfg
    opt = adamw(model, 1e-4, 0.05)
    codes = torch.randint(0, cfg.vocab_size, (batch, cfg.num_tokens), device=device)
    labels = torch.randint(0, cfg.num_classes, (batch,), device=device)
    model.train()

    def step():
        with autocast:
            _, loss = net(codes, labels, with_logits=False)  # the training stage's chunked loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()

    for _ in range(warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = time.perf_counter() - t0
    return {
        "seq_per_s": batch * steps / seconds,
        "peak_gib": peak_memory_gib(device),
        "attention_kernels": sdpa_kernels(step),
    }  # one more step, profiled: fused or math?


def bench_sample(
    model: HARGenerator, batch: int, reps: int, autocast, device: torch.device, cache_dtype: torch.dtype
) -> dict:
    """Images/s of `generate` (9 passes at 128 tokens) with CFG 3.75, step schedule, top-p 0.95, as the sample
    stage runs it: one KV cache reused by every call. Also how often inductor declined a CUDA graph."""
    sampling = SamplingConfig(cfg_scale=3.75, cfg_schedule="step", window_start=0.25, top_p=0.95)
    labels = torch.arange(batch, device=device) % model.cfg.num_classes
    kv = allocate_kv_cache(model, pass_rows(sampling, batch), cache_dtype, device)
    model.eval()

    def run():
        with autocast:
            return generate(model, labels, sampling, generator=torch.Generator().manual_seed(0), kv=kv)

    skips = counters["inductor"]["cudagraph_skips"]
    run()  # warm-up (and compilation and CUDA-graph recording of every block size)
    run()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        run()
    sync(device)
    return {
        "img_per_s": batch * reps / (time.perf_counter() - t0),
        "passes": len(model.cfg.block_sizes),
        "cudagraph_skips": counters["inductor"]["cudagraph_skips"] - skips,
        "sample_attention_kernels": sdpa_kernels(run),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--size", default="har-L", choices=list(GENERATOR_PRESETS))
    ap.add_argument("--batch", type=int, default=32, help="training batch (the reference: 32)")
    ap.add_argument("--sample-batch", type=int, default=50, help="sampling batch (the reference: 50); 0: no sampling")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="bf16 autocast or plain fp32/TF32")
    ap.add_argument("--compile", action="store_true", help="also measure the torch.compile fast path")
    ap.add_argument(
        "--compile-mode",
        default="default",
        help="torch.compile mode of the training fast path (default, max-autotune, ...); sampling "
        "compiles as the sample stage does (reduce-overhead on CUDA)",
    )
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=20, help="timed training steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed training steps before (compilation included)")
    ap.add_argument("--reps", type=int, default=5, help="timed sampling calls")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is available")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    torch.set_float32_matmul_precision("high")
    bf16 = args.dtype == "bf16"
    autocast = torch.autocast(device.type, torch.bfloat16) if bf16 else contextlib.nullcontext()
    cache_dtype = torch.bfloat16 if bf16 else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v[args.dtype] for k, v in PEAK_FLOPS.items() if k in name), None)

    paths = ["eager"] + (["compiled"] if args.compile else [])
    rows = {}
    for path in paths:
        model = build(args.size, args.tokens, args.vocab, args.classes, device)
        net = compile_for_training(model, args.compile_mode) if path == "compiled" else model
        try:
            train = bench_train(model, net, args.batch, args.steps, args.warmup, autocast, device)
            train["mfu"] = train_flops_per_sequence(model) * train["seq_per_s"] / peak if peak else None
        except torch.cuda.OutOfMemoryError:
            train = {"oom": True}
        del net, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        sample = {}
        if args.sample_batch:
            model = build(args.size, args.tokens, args.vocab, args.classes, device)
            if path == "compiled":
                compile_sampling(model)  # the sample stage's `sample.compile` (CUDA graphs on a GPU)
            sample = bench_sample(model, args.sample_batch, args.reps, autocast, device, cache_dtype)
            del model
        rows[path] = {**train, **sample}
        if device.type == "cuda":
            torch.cuda.empty_cache()

    cfg = generator_config(args.size, num_tokens=args.tokens, vocab_size=args.vocab, num_classes=args.classes)
    n_params = sum(p.numel() for p in HARGenerator(cfg).parameters()) / 1e6
    mem = "peak GiB" if device.type == "cuda" else "peak RSS GiB"
    print(
        f"{args.size}: {n_params:.2f}M params, {args.tokens} tokens, vocab {args.vocab}, {args.classes} classes; "
        f"{name}, {args.dtype}, train batch {args.batch}, sample batch {args.sample_batch or '-'} "
        f"({len(cfg.block_sizes)} passes, CFG 3.75)"
    )
    print(f"{'path':10} {'train seq/s':>12} {'MFU':>7} {mem:>13} {'sample img/s':>13}")
    for path, r in rows.items():
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        graphs = f"   ({r['cudagraph_skips']} CUDA graphs declined)" if r.get("cudagraph_skips") else ""
        train = "OOM" if r.get("oom") else f"{r['seq_per_s']:.1f}"
        peak_gib = f"{r['peak_gib']:.2f}" if "peak_gib" in r else "-"
        img = f"{r['img_per_s']:.1f}" if "img_per_s" in r else "-"
        print(f"{path:10} {train:>12} {mfu:>7} {peak_gib:>13} {img:>13}{graphs}")
        for what in ("attention_kernels", "sample_attention_kernels"):
            if what in r:
                print(f"{'':10} {what.replace('_', ' ')}: {', '.join(r[what]) or 'none seen'}")
    ref_sample = OFFICIAL_H100["sample_img_per_s"][args.dtype]
    ref = OFFICIAL_H100
    print(
        f"{'official':10} {ref['train_seq_per_s']:12.1f} {'~9%':>7} {ref['train_peak_gib']:13.2f} "
        f"{ref_sample:13.1f}   (one H100 80GB, bf16 eager, train batch 32, sample batch 50)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "size": args.size,
                    "device": name,
                    "dtype": args.dtype,
                    "batch": args.batch,
                    "sample_batch": args.sample_batch,
                    "rows": rows,
                    "official_h100": OFFICIAL_H100,
                },
                f,
                indent=2,
            )
    best, eager = rows[paths[-1]], rows["eager"]
    ratios = [("train", "seq_per_s", ref["train_seq_per_s"]), ("sample", "img_per_s", ref_sample)]
    if args.compile:
        print(
            "fast / eager: "
            + ", ".join(
                f"{what} {best[key] / eager[key]:.2f}x" for what, key, _ in ratios if key in best and key in eager
            )
        )
    comparable = "H100" in name and args.size == "har-L" and args.tokens == 128 and args.vocab == 8192
    print(
        f"{paths[-1]} / official: "
        + ", ".join(
            f"{what} {best[key] / official:.2f}x (target {TARGETS[what]:.0f}x)"
            for what, key, official in ratios
            if key in best
        )
        + ("" if comparable else "  [not comparable: not har-L/128/8192 on an H100]")
    )


if __name__ == "__main__":
    main()
