"""Training losses: the thinker's causal LM loss and the MoE load-balancing (auxiliary) loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InputError, describe

IGNORE_INDEX = -100


def check_labels(labels: torch.Tensor, vocab: int, name: str = "labels") -> None:
    """Integer ids in [0, vocab) or IGNORE_INDEX: anything else would fail inside cross_entropy (on a GPU as a
    device-side assert). One host read per call, negligible next to a training step."""
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise InputError(f"{name}: expected integer token ids (or {IGNORE_INDEX} to ignore), got {describe(labels)}")
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        raise InputError(
            f"{name}: expected token ids in [0, {vocab}) or {IGNORE_INDEX} (ignored), got {int(labels[bad][0])}"
        )


def causal_lm_loss(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 from position t; labels of -100 are ignored."""
    shifted = F.pad(labels_BT, (0, 1), value=IGNORE_INDEX)[:, 1:]
    return F.cross_entropy(
        logits_BTV.float().flatten(0, 1), shifted.flatten().to(logits_BTV.device), ignore_index=IGNORE_INDEX
    )


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch-Transformer balance loss summed over layers: E * Σ_e (fraction routed to e) · (mean prob of e).

    Fractions and mean probabilities are taken over all layers' tokens together, counting only real tokens
    when `attention_mask` is given.
    """
    device = router_logits[0].device
    counts = torch.zeros(num_experts, device=device)
    prob_sum = torch.zeros(num_experts, device=device)
    rows = torch.zeros((), device=device)
    weight = None if attention_mask is None else attention_mask.reshape(-1).to(device, torch.float32)
    for logits in router_logits:
        probs = logits.float().softmax(dim=-1)
        chosen = probs.topk(top_k, dim=-1).indices
        w = torch.ones(probs.shape[0], device=device) if weight is None else weight
        counts = counts.index_add(0, chosen.flatten(), w.repeat_interleave(top_k))
        prob_sum = prob_sum + (probs * w[:, None]).sum(0)
        rows = rows + w.sum()
    return num_experts * ((counts / rows) * (prob_sum / rows)).sum()


def thinker_losses(cfg, out, labels: torch.Tensor | None, attention_mask: torch.Tensor | None) -> None:
    """Fill `out.loss` (LM loss + router_aux_loss_coef × aux) and `out.aux_loss` in place."""
    if out.router_logits:
        out.aux_loss = load_balancing_loss(out.router_logits, cfg.num_experts, cfg.num_experts_per_tok, attention_mask)
    if labels is not None:
        out.loss = causal_lm_loss(out.logits, labels)
        if out.aux_loss is not None:
            out.loss = out.loss + cfg.router_aux_loss_coef * out.aux_loss.to(out.loss.device)
