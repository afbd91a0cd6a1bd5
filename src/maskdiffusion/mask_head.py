"""The MaskDiffusion mask head: attention says where a class is, features say what belongs together.

Per class c, with L2-normalised features f and a non-negative attention map A_c:
prototype mu_c = sum_p A_c(p) f(p) / sum_p A_c(p), score S_c(p) = f(p) . mu_c, label =
argmax_c. The reference leaves mu_c un-normalised (a dot product); by default we
normalise it (cosine), so a class with diffuse attention is not penalised for its
prototype's shorter length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mask_head(features: torch.Tensor, attention: torch.Tensor, *, normalize_prototypes: bool = True) -> torch.Tensor:
    """Class scores from features and per-class attention.

    Arguments:
        features: ``(B, D, h, w)`` raw features (L2-normalised here, over ``D``).
        attention: ``(B, C, h, w)`` non-negative per-class weights at the same size.
        normalize_prototypes: cosine scores (True) or the reference's dot product with
            the un-normalised prototype (False).

    Returns:
        ``(B, C, h, w)`` float32 scores.
    """
    if features.ndim != 4 or attention.ndim != 4 or features.shape[0] != attention.shape[0]:
        raise ValueError(
            f"features (B, D, h, w) and attention (B, C, h, w) expected, got "
            f"{tuple(features.shape)} and {tuple(attention.shape)}"
        )
    if features.shape[-2:] != attention.shape[-2:]:
        raise ValueError(
            f"features {tuple(features.shape[-2:])} and attention {tuple(attention.shape[-2:])} "
            "must share their spatial size; resize one of them first"
        )
    f = F.normalize(features.float(), dim=1).flatten(2)  # (B, D, N)
    a = attention.float().flatten(2)  # (B, C, N)
    mass = a.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    prototypes = torch.bmm(a, f.transpose(1, 2)) / mass  # (B, C, D)
    if normalize_prototypes:
        prototypes = F.normalize(prototypes, dim=-1)
    scores = torch.bmm(prototypes, f)  # (B, C, N)
    return scores.view(*attention.shape)


def class_attention(token_log_maps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-class attention from per-token log-maps, each class max-normalised to [0, 1].

    Arguments:
        token_log_maps: ``(T, h, w)`` float32 logs of token maps (all prompts' tokens).
        weights: ``(C, T)`` non-negative weights of each class's tokens.

    Returns:
        ``(C, h, w)`` float32 maps, ``A_c = sum_t w_ct exp(L_t) / max_p(...)``. Shifts are
        per token and added back, so the result is exact for any scale of ``L``.
    """
    token_shift = token_log_maps.flatten(1).amax(dim=1)  # (T,)
    token_shift = torch.where(torch.isfinite(token_shift), token_shift, torch.zeros_like(token_shift))
    used = weights > 0
    class_shift = torch.where(used, token_shift[None, :], torch.full_like(weights, -torch.inf)).amax(dim=1)
    class_shift = torch.where(torch.isfinite(class_shift), class_shift, torch.zeros_like(class_shift))
    scaled = torch.where(used, weights * torch.exp(token_shift[None, :] - class_shift[:, None]), 0.0)
    normalised_tokens = torch.exp(token_log_maps - token_shift[:, None, None]).flatten(1)  # (T, N)
    maps = (scaled @ normalised_tokens).view(weights.shape[0], *token_log_maps.shape[1:])
    peak = maps.flatten(1).amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    return maps / peak[:, None, None]


def refine(features: torch.Tensor, scores: torch.Tensor, steps: int, *, normalize_prototypes: bool) -> torch.Tensor:
    """Recompute prototypes from the hard labelling ``steps`` times: ``(B, C, h, w)`` scores."""
    for _ in range(steps):
        hard = F.one_hot(scores.argmax(dim=1), scores.shape[1]).permute(0, 3, 1, 2).float()
        scores = mask_head(features, hard, normalize_prototypes=normalize_prototypes)
    return scores
