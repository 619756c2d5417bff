"""FOD training objective (fod-method.md section 3; Anomaly-Transformer-style minimax).

For each layer: ``intra1 = Sym(sg(P), S)``, ``intra2 = Sym(P, sg(S))`` (same for inter), entropies
``H(S)``; ``rec = MSE(X_hat, X) + mean_i (1 - cos(X_hat_i, X_i))``. With lambda1 = lambda2 = 0.5:

    loss1 = rec + l1 intra2 - l1 inter2
    loss2 = rec - l1 intra1 - l2 H_intra + l1 inter1 + l2 H_inter

The reference back-propagates loss1 then loss2 before one optimiser step, which is the gradient
of ``loss1 + loss2``; :func:`fod_loss` returns that sum. The logs of P and S are computed once per
map and shared by both KL directions and the entropy (detached copies are free), which cuts the
element-wise work on the ``[N, H, L, L]`` maps, the cost that dominates training on a CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fod.model import EPS_KL, LayerMaps


def reconstruction_loss(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """``MSE(x_hat, x)`` over all elements plus mean over tokens of ``1 - cos``: ``[N, L, C]`` -> scalar."""
    return F.mse_loss(x_hat, x) + (1.0 - F.cosine_similarity(x_hat, x, dim=-1, eps=1e-8)).mean()


def _branch_terms(p: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``Sym(sg(p), s)``, ``Sym(p, sg(s))`` and ``H(s)``, each a scalar mean over N, L (heads averaged).

    Args:
        p: ``[N, H, L, S]`` target rows; s: ``[N, H, L, S]`` attention rows.
    """
    log_p = torch.log(p + EPS_KL)
    log_s = torch.log(s + EPS_KL)
    p_sg, s_sg, log_p_sg, log_s_sg = p.detach(), s.detach(), log_p.detach(), log_s.detach()
    to_s = ((p_sg - s) * (log_p_sg - log_s)).sum(-1).mean()  # Sym(sg P, S): gradient reaches S
    to_p = ((p - s_sg) * (log_p - log_s_sg)).sum(-1).mean()  # Sym(P, sg S): gradient reaches P
    ent = -(s * log_s).sum(-1).mean()
    return to_s, to_p, ent


TERMS = ("intra1", "intra2", "inter1", "inter2", "h_intra", "h_inter", "rec")


def fod_loss(
    x: torch.Tensor, x_hat: torch.Tensor, maps: list[LayerMaps], lambda1: float, lambda2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Total loss ``loss1 + loss2`` of one level, and its terms for the progress bar.

    (Means over heads, tokens and batch are interchangeable here: every term is a plain mean.)

    Args:
        x: ``[N, L, C]`` target tokens; x_hat: reconstruction.
        maps: per-layer maps with the intra fields set (``training_maps=True``).
        lambda1, lambda2: weights of the KL and entropy terms.

    Returns:
        scalar loss tensor, and the detached terms ``[7]`` float32 in the order of :data:`TERMS`
        (``intra1``, ``intra2``, ``inter1``, ``inter2``, ``h_intra``, ``h_inter`` as means over the
        layers, then ``rec``): a tensor, not floats, so that a compiled step has no graph break.

    Raises:
        ValueError: maps without the intra fields.
    """
    rec = reconstruction_loss(x, x_hat)
    acc: dict[str, torch.Tensor] = {}
    for m in maps:
        if m.intra_attn is None or m.intra_target is None:
            raise ValueError("fod_loss needs training maps: call the level with training_maps=True")
        intra1, intra2, h_intra = _branch_terms(m.intra_target, m.intra_attn)
        inter1, inter2, h_inter = _branch_terms(m.inter_target, m.inter_attn)
        for k, v in (("intra1", intra1), ("intra2", intra2), ("inter1", inter1), ("inter2", inter2),
                     ("h_intra", h_intra), ("h_inter", h_inter)):
            acc[k] = acc[k] + v / len(maps) if k in acc else v / len(maps)
    loss1 = rec + lambda1 * acc["intra2"] - lambda1 * acc["inter2"]
    loss2 = (
        rec - lambda1 * acc["intra1"] - lambda2 * acc["h_intra"] + lambda1 * acc["inter1"] + lambda2 * acc["h_inter"]
    )
    terms = torch.stack([acc[k] for k in TERMS[:-1]] + [rec]).detach()
    return loss1 + loss2, terms
