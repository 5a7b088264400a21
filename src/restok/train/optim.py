"""AdamW with the weight-decay parameter groups of docs/method.md, training-and-eval §3.2 and §4.

No weight decay for a parameter if it has ndim < 2 or its name contains any of NO_DECAY_KEYWORDS. This rule is the
same for the tokenizer (wd 1e-4), the discriminator heads (wd 1e-4) and the HAR generator (wd 0.05): it excludes
norms, biases, layer scales, level embeddings, mask/query tokens, the codebook, token/class embeddings and RoPE tables.
Frozen parameters (requires_grad False: DINOv3, LPIPS, the discriminator's DINO) are left out.

`build` picks the algorithm from params `optim.algorithm`: "adamw" (official) or "muon", where the weight matrices of
the linear layers (2D parameters of the decay group) are updated by Muon (momentum orthogonalised by Newton-Schulz,
`Muon` below, with its learning rate matched to AdamW's update RMS, so one `optim.lr` serves both) and every other
parameter (convolutions, norms, biases, embeddings, the codebook) by AdamW as before.

The official rule (`utils/train_utils.create_optimizer`) matches substrings of the *official* parameter names. Some of
our names differ (key tables: restok.convert.tokenizer, restok.convert.official), so OUR_NO_DECAY_KEYWORDS names the
same parameters in our spelling; the test checks both rules give the same groups through the key tables.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

NO_DECAY_KEYWORDS = (
    "ln",
    "bias",
    "latent_tokens",
    "mask_token",
    "embedding",
    "norm",
    "gamma",
    "embed",
    "mask_latent_token",
    "rope",
    "freqs_cis",
)
# Our spelling of parameters the official names exempt: {our substring: the official name it stands for}.
OUR_NO_DECAY_KEYWORDS = {
    "level_emb": "encoder.level_embedding, (en|de)coder.latent_token_level_embedding",
    ".tokens": "latent_tokens (learned latent init), decoder.mask_token / feat_mask_token (LearnedTokens)",
    "quantizer.codebook": "quantize.embedding.weight",
    "tok_emb": "tok_embeddings",
    "cls_emb": "cls_embedding.embedding_table",
    "special_emb": "spe_tok_embeddings.special_embeddings",
}


def spec_no_decay(name: str) -> bool:
    """The name rule of docs/method.md, training-and-eval §3.2: True if `name` contains one of NO_DECAY_KEYWORDS (as a substring, as the paper code)
    or one of OUR_NO_DECAY_KEYWORDS (the same parameters under our names)."""
    return any(keyword in name for keyword in (*NO_DECAY_KEYWORDS, *OUR_NO_DECAY_KEYWORDS))


def param_groups(
    model: nn.Module, weight_decay: float, no_decay_names: Callable[[str], bool] = spec_no_decay
) -> list[dict]:
    """Two AdamW groups, [decay, no_decay], each with `param_names` (kept in the optimizer's state_dict).

    A parameter goes to the no-decay group if it has ndim < 2 or `no_decay_names(name)` is True.
    """
    groups = {
        True: {"params": [], "param_names": [], "weight_decay": weight_decay},
        False: {"params": [], "param_names": [], "weight_decay": 0.0},
    }
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        group = groups[param.ndim >= 2 and not no_decay_names(name)]
        group["params"].append(param)
        group["param_names"].append(name)
    return [group for group in (groups[True], groups[False]) if group["params"]]


NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # the quintic Newton-Schulz iteration of Muon's reference code


def orthogonalise(update: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately U V^T of update = U S V^T (2D) by `steps` Newton-Schulz iterations, in bf16 on CUDA and in
    fp32 elsewhere: a CPU without native bf16 emulates it (torch.optim.Muon, which always uses bf16, made the
    default tokenizer's step 5x slower on a 2-core AVX2 CPU)."""
    a, b, c = NS_COEFFICIENTS
    x = update.to(torch.bfloat16 if update.is_cuda else torch.float32)
    wide = x.shape[0] <= x.shape[1]
    x = x if wide else x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x if wide else x.T).to(update.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for 2D weight matrices: Nesterov momentum, orthogonalised (`orthogonalise`), decoupled weight decay, the
    step scaled by 0.2 sqrt(max(rows, cols)) so that its RMS matches AdamW's and AdamW's learning rate applies
    (the "match_rms_adamw" rule of torch.optim.Muon, which this follows except for the orthogonalisation dtype)."""

    def __init__(self, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.95, ns_steps: int = 5):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "ns_steps": ns_steps})
        for group in self.param_groups:
            if any(q.ndim != 2 for q in group["params"]):
                raise ValueError("Muon takes 2D weight matrices only")

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param)
                buf = state["momentum_buffer"].lerp_(param.grad, 1 - momentum)
                update = orthogonalise(param.grad.lerp(buf, momentum), group["ns_steps"])
                param.mul_(1 - lr * group["weight_decay"])
                param.add_(update, alpha=-lr * 0.2 * max(param.shape) ** 0.5)


class Optimizers:
    """Several optimisers stepped as one: `param_groups` lists every group (so a loop that sets each group's LR sets
    them all), and the state dict keeps each optimiser's under its name."""

    def __init__(self, **optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [group for opt in self.optimizers.values() for group in opt.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self.optimizers):
            raise ValueError(f"optimizer state holds {sorted(state)}, this run has {sorted(self.optimizers)}")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


def build(model: nn.Module, cfg) -> torch.optim.Optimizer | Optimizers:
    """The optimiser of params `optim` (an `Optim` section): AdamW, or Muon for the linear layers' weight matrices
    (the decay group's 2D parameters) with AdamW for the rest."""
    if cfg.algorithm == "adamw":
        return adamw(model, cfg.lr, cfg.weight_decay, tuple(cfg.betas))
    decay, *no_decay = param_groups(model, cfg.weight_decay)

    def part(group: dict, matrices: bool) -> dict:
        keep = [i for i, q in enumerate(group["params"]) if (q.ndim == 2) == matrices]
        return {
            **group,
            "params": [group["params"][i] for i in keep],
            "param_names": [group["param_names"][i] for i in keep],
        }

    matrices = part(decay, True)
    if not matrices["params"]:
        raise ValueError(f"optim.algorithm=muon: {type(model).__name__} has no weight matrix for Muon")
    rest = [g for g in (part(decay, False), *no_decay) if g["params"]]
    return Optimizers(adamw=_adamw(rest, cfg.lr, tuple(cfg.betas)), muon=Muon([matrices], cfg.lr, cfg.weight_decay))


def adamw(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    no_decay_names: Callable[[str], bool] = spec_no_decay,
) -> torch.optim.AdamW:
    """AdamW over `param_groups(model, ...)`: fused kernels on CUDA, foreach on CPU. eps is PyTorch's default.

    Args:
        model: the model whose trainable parameters are optimised (may be DDP-wrapped).
        lr: initial learning rate; the loop overwrites it every step with `lr.lr_at`.
        weight_decay: decay of the decay group (1e-4 tokenizer and discriminator, 0.05 generator).
        betas: (0.9, 0.95) in the paper for all three optimisers.
        no_decay_names: name predicate for the no-decay group (by default the rule of docs/method.md, training-and-eval §3.2).
    """
    groups = param_groups(model, weight_decay, no_decay_names)
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameters to optimise")
    return _adamw(groups, lr, betas)


def _adamw(groups: list[dict], lr: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    on_cuda = all(p.is_cuda for group in groups for p in group["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=on_cuda or None, foreach=None if on_cuda else True)
