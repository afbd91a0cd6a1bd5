"""The MaskDiffusion mask head: attention says where a class is, features say what belongs together.

Per class c, with L2-normalised features f and a non-negative attention map A_c:
prototype mu_c = sum_p A_c(p) f(p) / sum_p A_c(p), score S_c(p) = f(p) . mu_c, label =
argmax_c. The reference leaves mu_c un-normalised (a dot product); cosine scores
normalise it, so a class with diffuse attention is not penalised for its prototype's
shorter length.

A whole-vocabulary prompt gives every class a map, also the classes that are not in the
image. Max-normalising each map (the reference) gives an absent class a peak somewhere,
and its prototype then steals pixels. The options below keep the attention's own evidence
in the decision (one small function each; :func:`segment_scores` applies what a preset
picks):

* :func:`class_attention` ``normalization``: ``max`` (the reference), ``probabilities``
  (raw softmax mass of the class's tokens: comparable across classes) or ``calibrated``
  (probabilities divided by a per-class scale measured without labels);
* :func:`supported_classes`: a class is present only if it wins the attention argmax on
  enough cells; absent classes get no prototype and no pixel;
* :func:`confident_weights`: prototypes from the cells a class wins, not its whole map;
* :func:`product_of_experts`: score = cosine + lambda * log A (features and attention vote);
* :func:`em_posterior`: EM on a von Mises-Fisher mixture over the features with the
  attention as a per-pixel prior (the product of experts, iterated, with class weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .presets import Preset

LOG_FLOOR = 1e-8  # attention below it counts as this much in log-attention terms (no -inf)


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


def class_attention(
    token_log_maps: torch.Tensor,
    weights: torch.Tensor,
    *,
    normalization: str = "max",
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-class attention from per-token log-maps.

    Arguments:
        token_log_maps: ``(T, h, w)`` float32 logs of token maps (all prompts' tokens).
        weights: ``(C, T)`` non-negative weights of each class's tokens.
        normalization: ``"max"``: each class map divided by its maximum (the reference);
            ``"probabilities"``: the weighted sum itself (softmax maps: the class's
            probability mass); ``"calibrated"``: that sum divided by ``scale``.
        scale: ``(C,)`` positive per-class divisors, for ``"calibrated"``.

    Returns:
        ``(C, h, w)`` float32 maps ``sum_t w_ct exp(L_t)`` (normalised as asked). Shifts
        are per token and added back, so the result is exact for any scale of ``L``.
    """
    token_shift = token_log_maps.flatten(1).amax(dim=1)  # (T,)
    token_shift = torch.where(torch.isfinite(token_shift), token_shift, torch.zeros_like(token_shift))
    used = weights > 0
    class_shift = torch.where(used, token_shift[None, :], torch.full_like(weights, -torch.inf)).amax(dim=1)
    class_shift = torch.where(torch.isfinite(class_shift), class_shift, torch.zeros_like(class_shift))
    scaled = torch.where(used, weights * torch.exp(token_shift[None, :] - class_shift[:, None]), 0.0)
    normalised_tokens = torch.exp(token_log_maps - token_shift[:, None, None]).flatten(1)  # (T, N)
    maps = (scaled @ normalised_tokens).view(weights.shape[0], *token_log_maps.shape[1:])
    if normalization == "max":
        peak = maps.flatten(1).amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
        return maps / peak[:, None, None]
    maps = maps * torch.exp(class_shift)[:, None, None]
    if normalization == "probabilities":
        return maps
    if normalization == "calibrated":
        if scale is None:
            raise ValueError("calibrated attention needs the per-class scale")
        return maps / scale.to(maps)[:, None, None]
    raise ValueError(f"normalization must be 'max', 'probabilities' or 'calibrated', got {normalization!r}")


def supported_classes(attention: torch.Tensor, min_cells: int) -> torch.Tensor:
    """``(C,)`` bool: classes that win the attention argmax on at least ``min_cells`` cells.

    ``attention`` is ``(C, h, w)``. At least one class is always kept (the one with the
    most cells), so every pixel can be labelled.
    """
    wins = torch.bincount(attention.flatten(1).argmax(dim=0), minlength=attention.shape[0])
    present = wins >= min_cells
    if not present.any():
        present[wins.argmax()] = True
    return present


def confident_weights(attention: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """``attention`` ``(C, h, w)`` kept only on the cells where its class wins the argmax among ``present``."""
    masked = attention.masked_fill(~present[:, None, None], -torch.inf)
    winner = F.one_hot(masked.flatten(1).argmax(dim=0), attention.shape[0]).T.view_as(attention)
    return attention * winner


def product_of_experts(cosine: torch.Tensor, attention: torch.Tensor, weight: float) -> torch.Tensor:
    """``cosine + weight * log(attention)`` (``(C, h, w)``): features and attention vote together."""
    return cosine + weight * attention.clamp_min(LOG_FLOOR).log()


def em_posterior(
    features: torch.Tensor,
    attention: torch.Tensor,
    prototypes: torch.Tensor,
    present: torch.Tensor,
    *,
    steps: int,
    concentration: float,
    prior_weight: float,
) -> torch.Tensor:
    """Posterior class probabilities of a von Mises-Fisher mixture with an attention prior.

    ``p(c | pixel) ~ pi_c * A_c(p)^prior_weight * exp(concentration * mu_c . f(p))``;
    ``steps`` EM rounds re-estimate the mean directions ``mu_c`` and weights ``pi_c``
    (uniform over present classes at first), then a last E step gives the posterior.

    Arguments:
        features: ``(D, h, w)`` L2-normalised features.
        attention: ``(C, h, w)`` non-negative attention (the prior).
        prototypes: ``(C, D)`` initial mean directions.
        present: ``(C,)`` bool; absent classes get probability 0.

    Returns:
        ``(C, h, w)`` float32 posterior, summing to 1 over classes.
    """
    f = features.flatten(1)  # (D, N)
    log_prior = prior_weight * attention.clamp_min(LOG_FLOOR).log().flatten(1)  # (C, N)
    log_weights = torch.where(present, -torch.log(present.sum().float()), -torch.inf)
    directions = F.normalize(prototypes.float(), dim=1)

    def expectation() -> torch.Tensor:
        return (log_weights[:, None] + log_prior + concentration * (directions @ f)).softmax(dim=0)

    for _ in range(steps):
        posterior = expectation()
        directions = F.normalize(posterior @ f.T, dim=1)
        share = posterior.mean(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
        log_weights = torch.where(present, share.log(), -torch.inf)
    return expectation().view_as(attention)


@dataclass(frozen=True)
class HeadOutput:
    """What the mask head decides on the feature grid.

    ``scores``: ``(C, h, w)`` float32 (cosine, dot product, product of experts or EM
    posterior, as the preset says); ``present``: ``(C,)`` bool, the classes that may take
    pixels (all of them unless the preset judges presence).
    """

    scores: torch.Tensor
    present: torch.Tensor


def segment_scores(features: torch.Tensor, attention: torch.Tensor, preset: Preset) -> HeadOutput:
    """The preset's mask head on one image.

    Arguments:
        features: ``(D, h, w)`` raw features.
        attention: ``(C, h, w)`` per-class attention at the same size, normalised as the
            preset says (:func:`class_attention`).

    Returns:
        :class:`HeadOutput`.
    """
    if preset.class_presence == "support":
        present = supported_classes(attention, preset.presence_min_cells)
    else:
        present = torch.ones(attention.shape[0], dtype=torch.bool)
    if preset.scoring == "attention":
        return HeadOutput(scores=attention.float(), present=present)
    weights = confident_weights(attention, present) if preset.prototype_cells == "confident" else attention
    cosine = preset.scoring != "dot"
    scores = mask_head(features[None], weights[None], normalize_prototypes=cosine)[0]  # normalises the features
    if preset.refine_steps and preset.refinement == "hard":
        absent_masked = scores.masked_fill(~present[:, None, None], -torch.inf)
        scores = refine(features[None], absent_masked[None], preset.refine_steps, normalize_prototypes=cosine)[0]
    if preset.scoring == "poe":
        scores = product_of_experts(scores, attention, preset.poe_weight)
    if preset.refine_steps and preset.refinement == "em":
        unit = F.normalize(features.float(), dim=0)
        prototypes = weights.flatten(1) @ unit.flatten(1).T
        scores = em_posterior(
            unit,
            attention,
            prototypes,
            present,
            steps=preset.refine_steps,
            concentration=preset.em_concentration,
            prior_weight=preset.em_prior_weight,
        )
    return HeadOutput(scores=scores, present=present)


def refine(features: torch.Tensor, scores: torch.Tensor, steps: int, *, normalize_prototypes: bool) -> torch.Tensor:
    """Recompute prototypes from the hard labelling ``steps`` times: ``(B, C, h, w)`` scores."""
    for _ in range(steps):
        hard = F.one_hot(scores.argmax(dim=1), scores.shape[1]).permute(0, 3, 1, 2).float()
        scores = mask_head(features, hard, normalize_prototypes=normalize_prototypes)
    return scores
