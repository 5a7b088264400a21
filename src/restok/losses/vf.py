"""Vision-foundation-model (VF) alignment losses, docs/method.md, training-and-eval §2.5.

Both terms are the margin cosine loss ReLU(1 - m - cos), m = 0.25, computed in fp32:
- encoder term: cosine between the teacher CLS and the mean over the coarsest image group's tokens after the
  tokenizer's 1x1 projection P_e (docs/method.md, tokenizer §2.11, §5), averaged over the batch;
- decoder term: cosine over channels between each teacher patch token and the projected feature-branch output
  P_d(g) at the same grid position (docs/method.md, tokenizer §4.4), averaged over batch and positions.
The projections belong to the tokenizer; these functions take their outputs.

Cosine is `F.cosine_similarity(eps=1e-8)`, whose torch 2.x semantics clamp each norm separately:
x.y / (max(|x|, eps) * max(|y|, eps)), as docs/method.md, training-and-eval §2.5 says.
"""

import torch
import torch.nn.functional as F

COS_EPS = 1e-8


def margin_cosine_loss(a: torch.Tensor, b: torch.Tensor, margin: float) -> torch.Tensor:
    """mean of ReLU(1 - margin - cos(a, b)) with the cosine over the last dim; fp32."""
    cos = F.cosine_similarity(a.float(), b.float(), dim=-1, eps=COS_EPS)
    return F.relu(1.0 - margin - cos).mean()


def vf_cls_loss(enc_tokens_proj: torch.Tensor, teacher_cls: torch.Tensor, margin: float) -> torch.Tensor:
    """enc_tokens_proj (B, N, D): projected coarsest image tokens; teacher_cls (B, D) -> scalar."""
    pooled = enc_tokens_proj.float().mean(dim=1)  # (B, D)
    return margin_cosine_loss(pooled, teacher_cls, margin)


def vf_patch_loss(dec_feat_proj: torch.Tensor, teacher_patches: torch.Tensor, margin: float) -> torch.Tensor:
    """dec_feat_proj, teacher_patches (B, P, D), same row-major grid order -> scalar."""
    if dec_feat_proj.shape != teacher_patches.shape:
        raise ValueError(
            f"decoder VF features {tuple(dec_feat_proj.shape)} and teacher patches {tuple(teacher_patches.shape)} "
            "must have the same (B, P, D); cache the teacher features at the tokenizer's grid"
        )
    return margin_cosine_loss(dec_feat_proj, teacher_patches, margin)
