"""Mixture of experts: router -> dispatch -> stacked experts -> combine, with an optional gated shared expert.

Expert weights are stacked: `gate_up_proj` [E, 2I, H] (gate rows first, then up) and `down_proj` [E, H, I].
The checkpoint stores them one tensor per expert; `qwen3omni.checkpoint` converts between the two.

Two dispatch strategies, chosen by how many (token, expert) pairs there are:
- few pairs (decoding): gather the chosen experts' weights and run one batched matmul per projection.
  No host sync and no data-dependent shapes, so the decode step can be captured in a CUDA graph.
- many pairs (prefill, training): sort the pairs by expert and run each active expert once on its
  contiguous group of tokens, then scatter the weighted outputs back (one host sync per layer for the
  group sizes).
`moe_reference` is the slow, obviously-correct loop the tests compare against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .activations import activation
from .mlp import SwiGLU


@dataclass
class Routing:
    logits: torch.Tensor  # [N, E] router logits (for the load-balancing loss)
    weights: torch.Tensor  # [N, k] combine weights, in the input dtype
    experts: torch.Tensor  # [N, k] chosen expert ids


class Router(nn.Module):
    """linear -> softmax (float32) -> top-k -> optional renormalisation of the k weights."""

    def __init__(self, dim: int, num_experts: int, top_k: int, normalize: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, dim))
        self.top_k, self.normalize = top_k, normalize

    def forward(self, x_NH: torch.Tensor) -> Routing:
        logits = F.linear(x_NH, self.weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return Routing(logits, weights.to(x_NH.dtype), experts)


class Experts(nn.Module):
    """E SwiGLU experts stored as two stacked tensors."""

    def __init__(self, num_experts: int, dim: int, hidden: int, act: str = "silu"):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.act = activation(act)
        # Pairs above this count take the grouped (sorted) path; below, the gathered-weights path.
        self.gather_limit = num_experts

    def _swiglu(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act(gate) * up

    def forward(self, x_NH: torch.Tensor, routing: Routing) -> torch.Tensor:
        pairs = routing.experts.numel()
        if pairs <= self.gather_limit:
            return self._gathered(x_NH, routing)
        return self._grouped(x_NH, routing)

    def _gathered(self, x_NH, routing):
        ids = routing.experts.flatten()  # [P]
        x_P1H = x_NH.repeat_interleave(routing.experts.shape[1], dim=0).unsqueeze(1)
        h = self._swiglu(torch.bmm(x_P1H, self.gate_up_proj[ids].transpose(1, 2)))
        y_PH = torch.bmm(h, self.down_proj[ids].transpose(1, 2)).squeeze(1)
        y_NkH = y_PH.view(*routing.experts.shape, -1) * routing.weights.unsqueeze(-1)
        return y_NkH.sum(dim=1)

    def _grouped(self, x_NH, routing):
        k = routing.experts.shape[1]
        ids = routing.experts.flatten()
        order = torch.argsort(ids, stable=True)
        token = order // k
        counts = torch.bincount(ids, minlength=self.gate_up_proj.shape[0]).tolist()
        x_sorted = x_NH[token]
        out_sorted = torch.empty_like(x_sorted)
        start = 0
        for expert, n in enumerate(counts):
            if n == 0:
                continue
            xs = x_sorted[start : start + n]
            h = self._swiglu(xs @ self.gate_up_proj[expert].T)
            out_sorted[start : start + n] = h @ self.down_proj[expert].T
            start += n
        out_sorted = out_sorted * routing.weights.flatten()[order].unsqueeze(-1)
        return torch.zeros_like(x_NH).index_add_(0, token, out_sorted)


class MoeBlock(nn.Module):
    """Routed experts plus, optionally, a shared expert scaled by sigmoid(shared_expert_gate(x))."""

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        expert_hidden: int,
        normalize: bool,
        shared_hidden: int = 0,
        act: str = "silu",
    ):
        super().__init__()
        self.gate = Router(dim, num_experts, top_k, normalize)
        self.experts = Experts(num_experts, dim, expert_hidden, act)
        self.shared_expert = SwiGLU(dim, shared_hidden, act) if shared_hidden else None
        self.shared_expert_gate = nn.Linear(dim, 1, bias=False) if shared_hidden else None

    def forward(self, x_BTH: torch.Tensor, reference: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the block output and the router logits [B*T, E]."""
        x_NH = x_BTH.reshape(-1, x_BTH.shape[-1])
        routing = self.gate(x_NH)
        y = moe_reference(self.experts, x_NH, routing) if reference else self.experts(x_NH, routing)
        if self.shared_expert is not None:
            y = y + torch.sigmoid(self.shared_expert_gate(x_NH)) * self.shared_expert(x_NH)
        return y.view_as(x_BTH), routing.logits


def moe_reference(experts: Experts, x_NH: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Every expert over every token, masked by the routing: slow and obviously correct."""
    out = torch.zeros_like(x_NH)
    for e in range(experts.gate_up_proj.shape[0]):
        weight_N = (routing.weights * (routing.experts == e)).sum(dim=-1)
        h = experts._swiglu(x_NH @ experts.gate_up_proj[e].T)
        out = out + weight_N.unsqueeze(-1) * (h @ experts.down_proj[e].T)
    return out
