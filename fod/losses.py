"""FOD training objective (fod-method.md section 3; Anomaly-Transformer-style minimax).

For each layer: ``intra1 = Sym(sg(P), S)``, ``intra2 = Sym(P, sg(S))`` (same for inter), entropies
``H(S)``; ``rec = MSE(X_hat, X) + mean_i (1 - cos(X_hat_i, X_i))``. With lambda1 = lambda2 = 0.5:

    loss1 = rec + l1 intra2 - l1 inter2
    loss2 = rec - l1 intra1 - l2 H_intra + l1 inter1 + l2 H_inter

The reference back-propagates loss1 then loss2 before one optimiser step, which is the gradient
of ``loss1 + loss2``; that sum is what :func:`fod_loss` returns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fod.model import LayerMaps, entropy, symmetric_kl


def reconstruction_loss(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """``MSE(x_hat, x)`` over all elements plus mean over tokens of ``1 - cos``: ``[N, L, C]`` -> scalar."""
    return F.mse_loss(x_hat, x) + (1.0 - F.cosine_similarity(x_hat, x, dim=-1, eps=1e-8)).mean()


def fod_loss(
    x: torch.Tensor, x_hat: torch.Tensor, maps: list[LayerMaps], lambda1: float, lambda2: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss ``loss1 + loss2`` of one level and its terms for the progress bar.

    Args:
        x: ``[N, L, C]`` target tokens; x_hat: reconstruction.
        maps: per-layer maps with the intra fields set (``training_maps=True``).
        lambda1, lambda2: weights of the KL and entropy terms.

    Returns:
        scalar loss tensor, and a dict of floats ``rec``, ``intra``, ``inter``, ``h_intra``, ``h_inter``.
    """
    rec = reconstruction_loss(x, x_hat)
    acc: dict[str, torch.Tensor] = {}
    for m in maps:
        if m.intra_attn is None or m.intra_target is None:
            raise ValueError("fod_loss needs training maps: call the level with training_maps=True")
        parts = {
            "intra1": symmetric_kl(m.intra_target.detach(), m.intra_attn),
            "intra2": symmetric_kl(m.intra_target, m.intra_attn.detach()),
            "inter1": symmetric_kl(m.inter_target.detach(), m.inter_attn),
            "inter2": symmetric_kl(m.inter_target, m.inter_attn.detach()),
            "h_intra": entropy(m.intra_attn),
            "h_inter": entropy(m.inter_attn),
        }
        for k, v in parts.items():
            acc[k] = acc.get(k, 0.0) + v.mean() / len(maps)  # type: ignore[operator]
    loss1 = rec + lambda1 * acc["intra2"] - lambda1 * acc["inter2"]
    loss2 = (
        rec - lambda1 * acc["intra1"] - lambda2 * acc["h_intra"] + lambda1 * acc["inter1"] + lambda2 * acc["h_inter"]
    )
    terms = {k: float(v.detach()) for k, v in acc.items()}
    terms["rec"] = float(rec.detach())
    return loss1 + loss2, terms
