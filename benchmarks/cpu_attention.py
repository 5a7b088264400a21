"""CPU training steps/s with attention computed in fp32 (restok.models.attention) against bf16 SDPA, A/B/A/B.

    python benchmarks/cpu_attention.py                  # the default profile's tokenizer and generator, 2 threads
    python benchmarks/cpu_attention.py --threads 1 --steps 10 --params params.yaml

Both training steps run as the stages run them on a CPU with native bf16 (`loop.precision: auto`): bf16 autocast,
the stage's loss (the tokenizer's with its VF terms, on random teacher features of the profile's teacher width),
backward, grad clip, AdamW, EMA. "fp32 attention" is the models' attention as committed; "bf16 SDPA" replaces it for
the run with `F.scaled_dot_product_attention` called on the bf16 inputs, which is what the models did before. The
two alternate (A/B/A/B) and each prints its steps/s; the ratio is of the summed times. The first steps of every
run are warm-up and not timed. Trust only ratios beyond ~10% on a shared machine.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from restok.config.generator import generator_config
from restok.config.load import load_params
from restok.config.tokenizer import tokenizer_config
from restok.losses.recon import TokenizerLoss
from restok.models import generator as generator_module
from restok.models import vit as vit_module
from restok.models.attention import attention
from restok.models.generator import HARGenerator
from restok.models.teacher import teacher_dim
from restok.models.tokenizer import ResTok
from restok.train import optim
from restok.train.ema import EMA


def bf16_sdpa(q, k, v, mask=None, dropout_p=0.0):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def tokenizer_step(p, batch: int):
    """The default tokenizer's training step on a fixed random batch, as train_tokenizer runs it."""
    tt = p.train_tokenizer
    res = p.data.resolution
    cfg = tokenizer_config(p.tokenizer, res, teacher_dim(p.vf.teacher) if p.tokenizer.vf_align else None)
    torch.manual_seed(0)
    model, loss_fn = ResTok(cfg), TokenizerLoss(tt.loss).train()
    ema, opt = (
        EMA(model, tt.loop.ema_decay),
        optim.adamw(model, tt.optim.lr, tt.optim.weight_decay, tuple(tt.optim.betas)),
    )
    x = torch.rand(batch, 3, res, res)
    dim = cfg.vf_dim
    t_cls = torch.randn(batch, dim) if dim else None
    t_patches = torch.randn(batch, cfg.grid[0] * cfg.grid[1], dim) if dim else None

    def step(i: int) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            o = model(x)
        loss, _ = loss_fn(
            x,
            o.recon,
            o.quant_loss,
            step=i,
            teacher_cls=t_cls,
            teacher_patches=t_patches if t_patches is None else t_patches[: len(o.dec_patch_feat)],
            enc_tokens_proj=o.enc_cls_feat[:, None] if o.enc_cls_feat is not None else None,
            dec_feat_proj=o.dec_patch_feat,
        )
        update(model, opt, ema, loss, tt.optim.grad_clip)

    return step


def generator_step(p, batch: int):
    """The default generator's training step (chunked CE, no logits kept) on fixed random codes."""
    tg, tok = p.train_generator, p.tokenizer
    tokens = sum(tok.level_sizes)
    cfg = generator_config(p.generator, tok.codebook_size, tokens, p.data.num_classes)
    torch.manual_seed(0)
    model = HARGenerator(cfg).train()
    ema, opt = (
        EMA(model, tg.loop.ema_decay),
        optim.adamw(model, tg.optim.lr, tg.optim.weight_decay, tuple(tg.optim.betas)),
    )
    codes = torch.randint(tok.codebook_size, (batch, tokens))
    labels = torch.randint(p.data.num_classes, (batch,))

    def step(i: int) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(codes, labels, with_logits=False)
        update(model, opt, ema, loss, tg.optim.grad_clip)

    return step


def update(model, opt, ema, loss, clip: float) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([q for q in model.parameters() if q.grad is not None], clip)
    opt.step()
    ema.update(model)


def timed(make_step, impl, steps: int, warmup: int) -> float:
    """Seconds for `steps` training steps after `warmup`, with the models' attention replaced by `impl`."""
    vit_module.attention = generator_module.attention = impl
    try:
        step = make_step()
        for i in range(warmup):
            step(i)
        start = time.perf_counter()
        for i in range(steps):
            step(warmup + i)
        return time.perf_counter() - start
    finally:
        vit_module.attention = generator_module.attention = attention


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="A/B pairs per model")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    p = load_params(
        args.params, ("profile", "data", "vf", "tokenizer", "generator", "train_tokenizer", "train_generator")
    )
    models = {
        "tokenizer": lambda: tokenizer_step(p, p.train_tokenizer.loop.batch_size),
        "generator": lambda: generator_step(p, p.train_generator.loop.batch_size),
    }
    print(
        f"cpu attention benchmark: profile {p.profile}, torch {torch.__version__}, {args.threads} threads, "
        f"bf16 autocast, {args.steps} timed steps per run, A/B x {args.rounds}"
    )
    for name, make_step in models.items():
        total = {"fp32 attention": 0.0, "bf16 SDPA": 0.0}
        for _ in range(args.rounds):
            for label, impl in (("fp32 attention", attention), ("bf16 SDPA", bf16_sdpa)):
                seconds = timed(make_step, impl, args.steps, args.warmup)
                total[label] += seconds
                print(f"  {name:9s} {label:14s}: {args.steps / seconds:6.2f} steps/s")
        print(f"{name}: fp32 attention {total['bf16 SDPA'] / total['fp32 attention']:.2f}x the steps/s of bf16 SDPA")


if __name__ == "__main__":
    main()
