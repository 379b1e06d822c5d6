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

from .few_rows import FewRowLinear, few_row_linear

StreamState = dict  # module -> the tensors it carries from one step to the next


def short_input(length: int, weight: torch.Tensor, groups: int = 1) -> bool:
    """Whether an ungrouped conv over `length` outputs is better done as one matmul (see `conv_as_matmul`)."""
    return groups == 1 and length <= weight.shape[0]


def conv_as_matmul(x_BCT: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dilation: int = 1):
    """An unpadded stride-1 conv1d as one matmul, returned time-major: [B, C, L] -> [B, L - span + 1, out].

    For the few dozen samples of a streaming step against a weight of megabytes, the conv is bound by
    reading the weight: viewed as [out, in * k] a matmul reads it once, while the mkldnn conv reorders it on
    every call. Used only when the unfolded input is no larger than the weight (`short_input`).
    """
    B, C, _ = x_BCT.shape
    out, _, k = weight.shape
    cols = x_BCT.unfold(2, (k - 1) * dilation + 1, 1)[..., ::dilation]  # [B, C, n, k]
    cols = cols.permute(0, 2, 1, 3).reshape(B, cols.shape[2], C * k)
    return few_row_linear(cols, weight.reshape(out, C * k), bias)


def _keep(state: StreamState, module: nn.Module, past: torch.Tensor, history: torch.Tensor, *extra) -> None:
    """Carry `history` (a slice of this step's window) as `module`'s state: copied in place into the tensor
    carried so far, so the state keeps its address from step to step (what a CUDA graph replay needs), or
    a copy of it at the first step (only the history, not the window it is a view of)."""
    if module in state:
        past.copy_(history)
    else:
        past = history.clone()
    state[module] = (past, *extra) if extra else past


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
        conv, length = self.conv, x_BCT.shape[-1]
        if self.stride != 1:
            return conv(F.pad(x_BCT, (self.left_pad, -length % self.stride)))
        if short_input(length, conv.weight, conv.groups):
            return self._valid(F.pad(x_BCT, (self.left_pad, 0)) if self.left_pad else x_BCT)
        # Let the conv pad both sides (no padded copy of the input) and drop the outputs that read the right
        # padding: `left_pad` of them, a negligible waste next to a copy of a 24 kHz signal.
        y = F.conv1d(x_BCT, conv.weight, conv.bias, 1, self.left_pad, conv.dilation, conv.groups)
        return y[..., :length] if self.left_pad else y

    def _valid(self, x_BCT: torch.Tensor) -> torch.Tensor:
        """The conv without padding (stride 1): `span - 1` fewer outputs than inputs."""
        conv = self.conv
        if short_input(x_BCT.shape[-1] - self.span + 1, conv.weight, conv.groups):
            return conv_as_matmul(x_BCT, conv.weight, conv.bias, conv.dilation[0]).transpose(1, 2)
        return F.conv1d(x_BCT, conv.weight, conv.bias, 1, 0, conv.dilation, conv.groups)

    def step(self, x_BCT: torch.Tensor, state: StreamState) -> torch.Tensor:
        if self.stride != 1:
            raise NotImplementedError("streaming a strided causal conv needs its right padding; not supported")
        if x_BCT.shape[-1] == 0:
            return x_BCT.new_zeros(x_BCT.shape[0], self.conv.out_channels, 0)
        if self.left_pad == 0:
            return self._valid(x_BCT)
        past = state.get(self)
        if past is None:  # the zeros that forward pads with
            past = x_BCT.new_zeros(x_BCT.shape[0], x_BCT.shape[1], self.left_pad)
        window = torch.cat([past, x_BCT], dim=-1)
        _keep(state, self, past, window[..., -self.left_pad :])
        return self._valid(window)


class CausalConvTranspose1d(nn.Module):
    """ConvTranspose1d with `kernel - stride` samples trimmed from each end.

    With kernel = (h + 1) * stride, output block i (samples i*stride .. i*stride + stride - 1, after the left
    trim) mixes inputs i .. i + h: it waits for h inputs of look-ahead. The right trim drops the blocks of the
    last h inputs, which lack it, so an L-sample input gives (L - h) * stride samples. Streaming therefore
    holds back the last h inputs; their blocks come out when later inputs arrive, and never otherwise (the
    offline forward drops them too), so a stream has nothing left to flush.

    Computed as its polyphase equivalent: a plain conv with kernel h + 1 and stride * out channels whose
    outputs are interleaved into blocks. On CPU that beat conv_transpose1d on every Code2Wav shape measured
    (1.1-2.5x; the transposed conv also computes the 2 * trim samples that are trimmed away, and copies its
    output). Kernels that are not a multiple of the stride use conv_transpose1d.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1):
        super().__init__()
        self.conv = nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride=stride)
        self.stride = stride
        self.trim = kernel_size - stride
        self.lookahead = -(-self.trim // stride)  # inputs each output block waits for
        self.polyphase = kernel_size % stride == 0
        self._phase_cache: tuple | None = None

    def _phase_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The conv weight [out * stride, in, h + 1]: its channel c * stride + r, tap j is the transposed conv's
        channel c, tap (h - j) * stride + r."""
        w, b = self.conv.weight, self.conv.bias
        if torch.is_grad_enabled() and (w.requires_grad or (b is not None and b.requires_grad)):
            return self._rearrange(w, b)  # training: stay differentiable, cache nothing
        key = (w.data_ptr(), w._version, w.dtype, w.device, None if b is None else (b.data_ptr(), b._version))
        if self._phase_cache is not None and self._phase_cache[0] == key:
            return self._phase_cache[1]
        # Inference: derive once per weight version (a derived copy of this layer's weight is kept), as
        # ordinary tensors even under inference_mode so that a later no_grad call can use them too.
        with torch.inference_mode(False), torch.no_grad():
            self._phase_cache = (key, self._rearrange(w, b))
        return self._phase_cache[1]

    def _rearrange(self, w: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        c_in, c_out, k = w.shape
        taps = k // self.stride
        w_phase = w.view(c_in, c_out, taps, self.stride).flip(2).permute(1, 3, 0, 2)
        w_phase = w_phase.reshape(c_out * self.stride, c_in, taps)
        return w_phase, None if b is None else b.repeat_interleave(self.stride)

    def forward(self, x_BCT: torch.Tensor) -> torch.Tensor:
        if not self.polyphase:
            y = self.conv(x_BCT)
            return y[..., self.trim : y.shape[-1] - self.trim] if self.trim else y
        w_phase, b_phase = self._phase_weights()
        B, S = x_BCT.shape[0], self.stride
        blocks = x_BCT.shape[-1] - self.lookahead
        if blocks <= 0:  # no input has its look-ahead yet
            return x_BCT.new_zeros(B, self.conv.out_channels, 0)
        # channel c * stride + r of block i is sample i * stride + r of channel c
        if short_input(blocks, w_phase):
            y_BNO = conv_as_matmul(x_BCT, w_phase, b_phase)  # [B, blocks, out * stride]
            return y_BNO.view(B, blocks, -1, S).permute(0, 2, 1, 3).reshape(B, -1, blocks * S)
        y = F.conv1d(x_BCT, w_phase, b_phase)  # [B, out * stride, blocks]
        return y if S == 1 else y.view(B, -1, S, blocks).transpose(2, 3).reshape(B, -1, blocks * S)

    def step(self, x_BCT: torch.Tensor, state: StreamState) -> torch.Tensor:
        if x_BCT.shape[-1] == 0:
            return x_BCT.new_zeros(x_BCT.shape[0], self.conv.out_channels, 0)
        if self.trim == 0:  # no overlap between input frames: stateless
            return self(x_BCT)
        if not self.polyphase:
            raise NotImplementedError("streaming a transposed conv whose kernel is not a multiple of its stride")
        past, to_drop = state.get(self, (None, self.trim))
        if past is None:
            # Zero inputs "before the start" contribute nothing; the first `trim` outputs they complete lie
            # before the stream's first sample and are dropped below.
            past = x_BCT.new_zeros(x_BCT.shape[0], x_BCT.shape[1], self.lookahead)
        window = torch.cat([past, x_BCT], dim=-1)
        y = self(window)  # one block per new input, each completed by that input
        if to_drop:
            dropped = min(to_drop, y.shape[-1])
            y, to_drop = y[..., dropped:], to_drop - dropped
        _keep(state, self, past, window[..., -self.lookahead :], to_drop)
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
        if torch.is_grad_enabled():
            return x_BCT + inv_magnitude * torch.sin(x_BCT * freq).pow(2)
        # Inference: the same arithmetic in one buffer instead of four (this runs at up to 24 kHz, where
        # every fresh allocation also costs page faults).
        wave = torch.mul(x_BCT, freq).sin_().square_()
        return torch.addcmul(x_BCT, wave, inv_magnitude, out=wave)

    def step(self, x_BCT: torch.Tensor, state: StreamState) -> torch.Tensor:
        return self(x_BCT)


class ConvNeXtBlock1d(nn.Module):
    """x + γ · pwconv2(GELU(pwconv1(LayerNorm(depthwise causal conv(x))))), the 1-D ConvNeXt block."""

    def __init__(self, dim: int, kernel_size: int = 7, expansion: int = 4, eps: float = 1e-6):
        super().__init__()
        self.dwconv = CausalConv1d(dim, dim, kernel_size, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        # FewRowLinear: a streamed frame is 4 rows here
        self.pwconv1 = FewRowLinear(dim, expansion * dim)
        self.pwconv2 = FewRowLinear(expansion * dim, dim)
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
