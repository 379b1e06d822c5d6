"""Causal 1-D convolution blocks for streaming vocoders: each runs offline (`forward`) or incrementally (`step`).

Tensors are [batch, channels, time]. The streaming contract of every module here: `step(x, state)` takes the
next input samples and returns the next output samples that are final, carrying what it needs from the past
in `state[self]` (a dict owned by the caller, one entry per stateful module, each of a fixed size). Feeding a
sequence through `step` in pieces of any size and concatenating the outputs gives exactly `forward` of the
whole sequence: a causal conv sees only zeros before the start, which is what its history starts as, and a
trimmed transposed conv drops at the end exactly the samples it would still be waiting for.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

StreamState = dict  # module -> the tensors it carries from one step to the next


class CausalConv1d(nn.Module):
    """Conv1d whose output at time t reads inputs at times <= t only (zero left padding).

    With stride > 1 the input is also right-padded up to a multiple of the stride, so that a trailing partial
    window still yields an output; with stride 1 (every conv of Code2Wav) there is no right padding at all,
    which is what makes the stride-1 conv exactly streamable with `kernel_span - 1` samples of history.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1, stride: int = 1,
                 groups: int = 1):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride, dilation=dilation, groups=groups)
        self.stride = stride
        self.span = (kernel_size - 1) * dilation + 1  # input samples one output reads
        self.left_pad = self.span - stride

    def forward(self, x_BCT: torch.Tensor) -> torch.Tensor:
        right_pad = -x_BCT.shape[-1] % self.stride
        if self.left_pad or right_pad:
            x_BCT = F.pad(x_BCT, (self.left_pad, right_pad))
        return self.conv(x_BCT)

    def step(self, x_BCT: torch.Tensor, state: StreamState) -> torch.Tensor:
        if self.stride != 1:
            raise NotImplementedError("streaming a strided causal conv needs its right padding; not supported")
        if self.left_pad == 0:
            return self.conv(x_BCT)
        past = state.get(self)
        if past is None:  # the zeros that forward pads with
            past = x_BCT.new_zeros(x_BCT.shape[0], x_BCT.shape[1], self.left_pad)
        window = torch.cat([past, x_BCT], dim=-1)
        state[self] = window[..., -self.left_pad :].clone()  # clone: keep only the history, not the window
        return self.conv(window)


class CausalConvTranspose1d(nn.Module):
    """ConvTranspose1d with `kernel - stride` samples trimmed from each end.

    Output block i (samples i*stride .. i*stride + stride - 1, after the left trim) mixes inputs i .. i + h,
    with h = (kernel - stride) / stride: it needs h inputs of look-ahead. The right trim drops the blocks of the
    last h inputs, which lack it, so an L-sample input gives (L - h) * stride samples. Streaming therefore
    holds back the last h inputs; they are released when later inputs arrive, and never otherwise (the offline
    forward drops them too), so a stream needs no flush.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1):
        super().__init__()
        self.conv = nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride=stride)
        self.stride = stride
        self.trim = kernel_size - stride
        self.lookahead = -(-self.trim // stride)  # inputs each output block waits for

    def forward(self, x_BCT: torch.Tensor) -> torch.Tensor:
        y = self.conv(x_BCT)
        return y[..., self.trim : y.shape[-1] - self.trim] if self.trim else y

    def step(self, x_BCT: torch.Tensor, state: StreamState) -> torch.Tensor:
        if self.trim == 0:  # no overlap between input frames: stateless
            return self.conv(x_BCT)
        if self.trim % self.stride:
            raise NotImplementedError("streaming a transposed conv whose trim is not a multiple of its stride")
        past, to_drop = state.get(self, (None, self.trim))
        if past is None:
            # Zero inputs "before the start" contribute nothing; the first `trim` outputs they stand for lie
            # before the stream's first sample and are dropped below.
            past = x_BCT.new_zeros(x_BCT.shape[0], x_BCT.shape[1], self.lookahead)
        window = torch.cat([past, x_BCT], dim=-1)
        y = self.forward(window)  # one `stride` block per new input, completed by the new inputs
        if to_drop:
            dropped = min(to_drop, y.shape[-1])
            y, to_drop = y[..., dropped:], to_drop - dropped
        state[self] = (window[..., -self.lookahead :].clone(), to_drop)
        return y


class SnakeBeta(nn.Module):
    """x + sin²(x·e^α) / e^β per channel, with α and β stored as logarithms."""

    def __init__(self, channels: int, eps: float = 1e-9):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x_BCT: torch.Tensor) -> torch.Tensor:
        freq = self.alpha.exp()[:, None]
        inv_magnitude = (1.0 / (self.beta.exp() + self.eps))[:, None]
        wave = torch.sin(x_BCT * freq)
        if torch.is_grad_enabled():
            return x_BCT + inv_magnitude * wave.pow(2)
        # Inference: the same arithmetic in place, one temporary instead of four (this runs at 24 kHz).
        return torch.addcmul(x_BCT, wave.square_(), inv_magnitude)

    def step(self, x_BCT: torch.Tensor, state: StreamState) -> torch.Tensor:
        return self(x_BCT)


class ConvNeXtBlock1d(nn.Module):
    """x + γ · pwconv2(GELU(pwconv1(LayerNorm(depthwise causal conv(x))))), the 1-D ConvNeXt block."""

    def __init__(self, dim: int, kernel_size: int = 7, expansion: int = 4, eps: float = 1e-6):
        super().__init__()
        self.dwconv = CausalConv1d(dim, dim, kernel_size, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.pwconv1 = nn.Linear(dim, expansion * dim)
        self.pwconv2 = nn.Linear(expansion * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))

    def _pointwise(self, h_BCT: torch.Tensor) -> torch.Tensor:
        h_BTC = self.norm(h_BCT.transpose(1, 2))
        h_BTC = self.pwconv2(F.gelu(self.pwconv1(h_BTC)))
        return (h_BTC * self.gamma).transpose(1, 2)

    def forward(self, x_BCT: torch.Tensor) -> torch.Tensor:
        return x_BCT + self._pointwise(self.dwconv(x_BCT))

    def step(self, x_BCT: torch.Tensor, state: StreamState) -> torch.Tensor:
        return x_BCT + self._pointwise(self.dwconv.step(x_BCT, state))


class CausalSequential(nn.Sequential):
    """nn.Sequential whose `step` threads the stream state through every child's `step`."""

    def step(self, x: torch.Tensor, state: StreamState) -> torch.Tensor:
        for module in self:
            x = module.step(x, state)
        return x
