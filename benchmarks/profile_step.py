"""Where one tokenizer training step spends its time, part by part (the `train_tokenizer` stage's own step).

    python benchmarks/profile_step.py                     # params.yaml, 20 timed steps after 5 warm-up steps
    python benchmarks/profile_step.py --set tokenizer.dec_depth=2 --steps 30 --json out.json

The step is the stage's (restok.stages.train_tokenizer.setup / train, on the pipeline's shards and cached teacher
features). Forward and backward of each model part are timed by module hooks: a forward pre-hook and hook around the
part's forward, a backward pre-hook and hook around the gradient through it (on a CPU the work runs in the calling
thread, so the wall clock between two hooks is the part's). The decoder ViT's share is split into the image queries
and the feature queries of VF alignment (a decoder pass runs B image rows and B x `tokenizer.vf_dec_fraction` feature
rows, each at the same cost, so the split is by rows). The rest of the step is timed around its calls: data loading (next batch), loss, backward not
inside a part (loss terms, quantiser straight-through), optimiser step (with clipping), EMA update, logging and
checkpointing. To time the pixel encoder's backward, its input (the normalised image) is made to require a gradient,
which adds that one gradient (3 channels) to its backward. CUDA runs are synchronised at every hook, which slows them: read CUDA shares as rough.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import yaml

import restok.stages  # noqa: F401  (torch threads from the job's CPUs, as in every stage)
from restok.config.engine import cli_value, read_yaml, set_dotted
from restok.config.load import load_params
from restok.stages import train_tokenizer as stage

PARTS = {
    "pixel CNN encoder": "pixel_encoder",
    "ViT encoder": "encoder",
    "quantiser": "quantizer",
    "ViT decoder": "decoder",
    "pixel CNN decoder": "pixel_decoder",
}


class Clock:
    """Sums wall time per name; `sync` makes CUDA work count where it is launched."""

    def __init__(self, device: torch.device):
        self.device, self.totals, self.open = device, defaultdict(float), {}

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def start(self, name: str) -> None:
        self.open[name] = self.now()

    def stop(self, name: str) -> None:
        self.totals[name] += self.now() - self.open.pop(name)


def hook(module: torch.nn.Module, name: str, clock: Clock) -> None:
    def start(_module, inputs):
        clock.start(f"{name} forward")
        if not inputs[0].requires_grad:  # the first part (the pixel encoder sees the image): without an input that
            return (inputs[0].detach().requires_grad_(True), *inputs[1:])  # needs a gradient its hooks fire together
        return None

    module.register_forward_pre_hook(start)
    module.register_forward_hook(lambda *_: clock.stop(f"{name} forward"))
    module.register_full_backward_pre_hook(lambda *_: clock.start(f"{name} backward"))
    module.register_full_backward_hook(lambda *_: clock.stop(f"{name} backward"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--shards", default="data/shard")
    ap.add_argument("--features", default="data/cache_features")
    ap.add_argument("--set", action="append", default=[], help="dotted.key=value (YAML), repeatable")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    tree = read_yaml(args.params)
    for item in args.set:
        key, _, value = item.partition("=")
        set_dotted(tree, key, cli_value(value), f"{args.params}: ")
    with tempfile.TemporaryDirectory(prefix="profile_step.") as work:
        params_path = Path(work) / "params.yaml"
        params_path.write_text(yaml.safe_dump(tree, sort_keys=False))
        p = load_params(params_path, stage.PARAMS)
        ns = argparse.Namespace(
            params=str(params_path),
            shards=args.shards,
            features=args.features,
            out=str(Path(work) / "out"),
            results=str(Path(work) / "results"),
        )
        run = stage.setup(p, ns)
        clock = Clock(run.device)
        for label, attr in PARTS.items():
            hook(getattr(run.model, attr), label, clock)
        timed = instrument(run, clock)
        for _ in range(args.warmup):
            stage.train(run, steps=1)
        clock.totals.clear()
        t0 = time.perf_counter()
        stage.train(run, steps=args.steps)
        total = time.perf_counter() - t0
        if run.curve is not None:
            run.curve.close()
        shutil.rmtree(work, ignore_errors=True)
    rows = table(clock.totals, total, args.steps, run, timed)
    print(f"{'part':<40} {'ms/step':>8} {'share':>6}")
    for name, ms, share in rows:
        print(f"{name:<40} {ms:8.1f} {share:6.1%}")
    print(f"{'step (measured around train())':<40} {1000 * total / args.steps:8.1f}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "overrides": args.set,
                    "steps": args.steps,
                    "device": str(run.device),
                    "threads": torch.get_num_threads(),
                    "bf16": run.bf16,
                    "ms_per_step": 1000 * total / args.steps,
                    "rows": [{"part": n, "ms": m, "share": s} for n, m, s in rows],
                },
                indent=2,
            )
        )


def instrument(run, clock: Clock) -> dict:
    """Wrap the calls of the step outside the model parts: data, loss, optimiser, EMA (timed by name)."""
    loader = run.loader

    class TimedLoader:
        def __next__(self):
            clock.start("data loading")
            batch = next(loader)
            clock.stop("data loading")
            return batch

    run.loader = TimedLoader()
    loss_fn, ema_update = run.loss_fn.forward, run.ema.update
    opts = run.opts["tokenizer"]
    opt_step, zero_grad = opts.step, opts.zero_grad

    def timed(name, fn):
        def wrapped(*a, **k):
            clock.start(name)
            out = fn(*a, **k)
            clock.stop(name)
            return out

        return wrapped

    run.loss_fn.forward = timed("loss forward", loss_fn)
    run.ema.update = timed("EMA update", ema_update)
    opts.step = timed("optimiser step", opt_step)
    opts.zero_grad = timed("zero grad", zero_grad)
    return {"clip": True}


def table(totals: dict, total: float, steps: int, run, timed: dict) -> list[tuple[str, float, float]]:
    rows = []
    feat_share = run.cfg.vf_dec_fraction / (1 + run.cfg.vf_dec_fraction) if run.cfg.vf_align else 0.0
    for label in PARTS:
        for phase in ("forward", "backward"):
            seconds = totals.get(f"{label} {phase}", 0.0)
            if label == "ViT decoder" and feat_share:
                rows.append((f"{label} {phase}, image queries", seconds * (1 - feat_share)))
                rows.append((f"{label} {phase}, VF feature queries", seconds * feat_share))
            else:
                rows.append((f"{label} {phase}", seconds))
    for name in ("loss forward", "data loading", "optimiser step", "zero grad", "EMA update"):
        rows.append((name, totals.get(name, 0.0)))
    accounted = sum(s for _, s in rows)
    rows.append(("rest (backward outside the parts, clipping, logging, checkpoints)", max(0.0, total - accounted)))
    return [(name, 1000 * s / steps, s / total) for name, s in rows]


if __name__ == "__main__":
    main()
