"""The code predictor (`talker.code_predictor`, the "MTP" module): codebooks 1..15 of one codec frame.

The talker predicts codebook 0 of a frame; this small dense decoder fills the remaining
`num_code_groups - 1` codebooks one after another. For one frame it reads a 2-token prompt
[talker hidden state, embedding of code 0] and then its own previous code, embedded by the table of that
codebook. Step s (0-based) uses head `lm_head[s]` and yields code s+1; code s+1 is then embedded with
`codec_embedding[s]`. So code c (1..15) comes from head c-1 and is embedded by table c-1.

At inference it runs 15 times per frame, so `predict` is a fixed Python loop over a preallocated cache of
`num_code_groups` positions with no host syncs. In float32 on an AVX-512 or AVX2 CPU each step (every layer, then the
head) is one native call (`modules.dense_step`), and a greedy frame one call in all: about a third faster than
the torch path there.
`teacher_forced_logits` computes all heads of many frames in one pass for training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import CodePredictorConfig
from ..errors import InputError, describe
from ..generation.sampling import SamplingConfig, choose
from ..modules.attention import Attention
from ..modules.decoder import DecoderLayer, DecoderStack
from ..modules.dense_step import NativeDenseStep, hooked
from ..modules.few_rows import FewRowLinear
from ..modules.kv_cache import KVCache
from ..modules.mlp import SwiGLU
from ..modules.rotary import RotaryEmbedding

# The reference samples the residual codebooks with these knobs whenever the talker samples (its own
# generation config leaves temperature at 1.0), and decodes them greedily when the talker is greedy.
PREDICTOR_TOP_K = 50
PREDICTOR_TOP_P = 0.8
PREDICTOR_TEMPERATURE = 1.0


def predictor_sampling(
    do_sample: bool,
    top_k: int = PREDICTOR_TOP_K,
    top_p: float = PREDICTOR_TOP_P,
    temperature: float = PREDICTOR_TEMPERATURE,
    prefix: str = "",
) -> SamplingConfig:
    """The code predictor's sampling knobs; `do_sample` mirrors the talker's (as the reference does).
    `prefix` is how the caller names them in error messages (generate: "predictor_")."""
    return SamplingConfig(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, prefix=prefix)


def _dense_layers(cfg: CodePredictorConfig) -> list[DecoderLayer]:
    return [
        DecoderLayer(
            Attention(
                cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                bias=cfg.attention_bias, qk_norm=True, eps=cfg.rms_norm_eps,
            ),
            SwiGLU(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act),
            cfg.hidden_size,
            cfg.rms_norm_eps,
        )
        for _ in range(cfg.num_hidden_layers)
    ]


class CodePredictorModel(DecoderStack):
    """`talker.code_predictor.model`: dense decoder + one embedding table per residual codebook."""

    def __init__(self, cfg: CodePredictorConfig):
        rotary = RotaryEmbedding.plain(cfg.head_dim, cfg.rope_theta)
        super().__init__(_dense_layers(cfg), cfg.hidden_size, cfg.rms_norm_eps, rotary)
        self.codec_embedding = nn.ModuleList(
            nn.Embedding(cfg.vocab_size, cfg.hidden_size) for _ in range(cfg.num_code_groups - 1)
        )


@dataclass
class PredictedFrame:
    codes: torch.Tensor  # [B, G-1] codes of codebooks 1..G-1
    codec_embeds: torch.Tensor  # [B, G, C]: embedding of code 0 (talker table), then of codes 1..G-1
    logits: torch.Tensor | None = None  # [B, G-1, V] raw logits of each step, when asked for

    @property
    def next_talker_embed(self) -> torch.Tensor:
        """[B, C]: the sum of all G codebook embeddings, the codec part of the talker's next input."""
        return self.codec_embeds.sum(dim=1)


class CodePredictor(nn.Module):
    """`talker.code_predictor`: `model` and the per-codebook heads `lm_head`."""

    def __init__(self, cfg: CodePredictorConfig):
        super().__init__()
        self.config = cfg
        self.num_residual = cfg.num_code_groups - 1
        self.model = CodePredictorModel(cfg)
        self.lm_head = nn.ModuleList(
            FewRowLinear(cfg.hidden_size, cfg.vocab_size, bias=False) for _ in range(self.num_residual)
        )
        # `predict` runs each step (every layer, then the head) as one native call where it can (float32 on an
        # AVX-512 or AVX2 CPU, no hooks: see `native_step`); False keeps it on the torch path.
        self.cpu_kernel = True

    def embed_residual(self, residual_codes: torch.Tensor) -> torch.Tensor:
        """[..., n] codes of codebooks 1..n (n <= G-1) -> [..., n, C], code c embedded by table c-1."""
        tables = self.model.codec_embedding
        return torch.stack([tables[i](residual_codes[..., i]) for i in range(residual_codes.shape[-1])], dim=-2)

    def new_cache(self, batch: int, dtype=None, device=None) -> KVCache:
        """A cache for one frame: the 2-token prompt plus G-2 fed-back codes = G positions."""
        return self.model.new_cache(batch, self.num_residual + 1, dtype, device)

    @torch.no_grad()
    def predict(
        self,
        talker_hidden_BC: torch.Tensor,
        layer0_embed_BC: torch.Tensor,
        sampling: SamplingConfig | None = None,
        generator: torch.Generator | None = None,
        cache: KVCache | None = None,
        return_logits: bool = False,
    ) -> PredictedFrame:
        """Codes 1..G-1 of one frame per row, greedy unless `sampling.do_sample`.

        `talker_hidden_BC` is the talker's last (normed) hidden state at the position that produced code 0;
        `layer0_embed_BC` is code 0 embedded by `talker.model.codec_embedding`. A `cache` from `new_cache`
        may be passed to reuse its buffers across frames (it is rewound here); otherwise one is allocated.
        """
        sampling = sampling or SamplingConfig()
        self._check_inputs(talker_hidden_BC, layer0_embed_BC)
        dtype = self.model.norm.weight.dtype  # hand-made float32 inputs to a bf16 model work, as elsewhere
        talker_hidden_BC, layer0_embed_BC = talker_hidden_BC.to(dtype), layer0_embed_BC.to(dtype)
        B, C = talker_hidden_BC.shape
        G = self.num_residual + 1
        if cache is None:
            cache = self.new_cache(B, talker_hidden_BC.dtype, talker_hidden_BC.device)
        else:
            if cache.keys.shape[1] != B or cache.capacity < G or cache.keys.shape[0] != len(self.model.layers):
                raise InputError(
                    f"cache: expected one from new_cache({B}) (batch {B}, {G} positions), got batch "
                    f"{cache.keys.shape[1]} with {cache.capacity} positions"
                )
            cache.length, cache.has_padding = 0, False  # rewind: every row is a full, unpadded frame
        # [hidden, embed(code 0), embed(code 1), ..., embed(code G-1)]: the prompt, the fed-back codes and, shifted
        # by one, exactly the tensors the next talker step sums.
        seq = torch.empty(B, G + 1, C, dtype=talker_hidden_BC.dtype, device=talker_hidden_BC.device)
        seq[:, 0], seq[:, 1] = talker_hidden_BC, layer0_embed_BC
        codes = torch.empty(B, self.num_residual, dtype=torch.long, device=talker_hidden_BC.device)
        logits_all = [] if return_logits else None
        positions = torch.arange(G, device=talker_hidden_BC.device).view(1, 1, G).expand(1, B, G)
        native = self.native_step(cache)
        if native is not None and not sampling.do_sample:  # the whole frame in one native call
            logits = torch.empty(B, self.num_residual, self.config.vocab_size)
            heads, tables = [h.weight for h in self.lm_head], [t.weight for t in self.model.codec_embedding]
            native.greedy_frame(seq, heads, tables, codes, logits)
            return PredictedFrame(codes=codes, codec_embeds=seq[:, 1:], logits=logits if return_logits else None)
        for step in range(self.num_residual):
            if native is not None:
                start, width = (0, 2) if step == 0 else (step + 1, 1)
                _, logits = native.step(seq[:, start : start + width], start, self.lm_head[step].weight)
            else:
                logits = self.step_logits(step, seq, positions, cache)
            code = choose(logits, sampling, generator)
            codes[:, step] = code
            seq[:, step + 2] = self.model.codec_embedding[step](code)
            if logits_all is not None:
                logits_all.append(logits)
        return PredictedFrame(
            codes=codes,
            codec_embeds=seq[:, 1:],
            logits=torch.stack(logits_all, dim=1) if logits_all is not None else None,
        )

    def native_step(self, cache: KVCache) -> NativeDenseStep | None:
        """The native kernel for this frame's steps over `cache` (see `modules.dense_step`), or None where it
        cannot stand in for `step_logits`: `cpu_kernel` off, not float32 inference on an AVX-512 or AVX2 CPU, a
        batch of more than 2, or forward hooks on the stack or the heads (they would not run)."""
        if not self.cpu_kernel or cache.keys.device.type != "cpu" or any(hooked(head) for head in self.lm_head):
            return None
        weights = [m.weight for m in (*self.lm_head, *self.model.codec_embedding)]
        if any(w.dtype != torch.float32 or not w.is_contiguous() for w in weights):
            return None
        return NativeDenseStep.create(self.model, cache, cache.keys.shape[1])

    def step_logits(self, step: int, seq: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits [B, V] of head `step` for the frame in `seq` [B, G+1, C] (see `predict`).

        Step 0 reads the 2-token prompt at positions 0-1, step s >= 1 the code fed back at position s + 1: the
        offsets are fixed per step, which is what lets each step be captured once as a CUDA graph.
        """
        start, width = (0, 2) if step == 0 else (step + 1, 1)
        cache.length = start
        out = self.model(seq[:, start : start + width], positions[..., start : start + width], cache=cache)
        return self.lm_head[step](out.last_hidden_state[:, -1])

    def forward(
        self, talker_hidden_BTC: torch.Tensor, layer0_embed_BTC: torch.Tensor, residual_codes_BTN: torch.Tensor
    ) -> torch.Tensor:
        """The training / inspection call: `teacher_forced_logits` (so forward hooks on the code predictor, and
        wrappers that act on `forward` such as FSDP units, see it). Generation calls `predict`."""
        return self.teacher_forced_logits(talker_hidden_BTC, layer0_embed_BTC, residual_codes_BTN)

    def teacher_forced_logits(
        self, talker_hidden_BTC: torch.Tensor, layer0_embed_BTC: torch.Tensor, residual_codes_BTN: torch.Tensor
    ) -> torch.Tensor:
        """Logits [B, T, G-1, V] of every head for frames whose codes are known (training).

        Each frame is an independent sequence [hidden, embed(code 0), embed_0(code 1), ..., embed_{G-3}(code G-2)]
        of length G; position s+1 feeds head s. One causal pass over all B*T frames gives what step-by-step
        prediction would give with those codes fed back.
        """
        B, T, C = talker_hidden_BTC.shape
        if residual_codes_BTN.shape != (B, T, self.num_residual):
            raise InputError(
                f"residual_codes: expected shape {[B, T, self.num_residual]}, got {describe(residual_codes_BTN)}"
            )
        # The last code is only predicted, never fed. Negative ids (an ignore index in training labels) are
        # clamped for the lookup; the loss masks their positions anyway.
        fed = self.embed_residual(residual_codes_BTN[..., :-1].reshape(B * T, -1).clamp_min(0))
        seq = torch.cat(
            [talker_hidden_BTC.reshape(B * T, 1, C), layer0_embed_BTC.reshape(B * T, 1, C), fed], dim=1
        )
        positions = torch.arange(seq.shape[1], device=seq.device).view(1, 1, -1).expand(1, B * T, -1)
        hidden = self.model(seq, positions).last_hidden_state  # [BT, G, C]
        logits = torch.stack([head(hidden[:, s + 1]) for s, head in enumerate(self.lm_head)], dim=1)
        return logits.view(B, T, self.num_residual, -1)

    def _check_inputs(self, hidden: torch.Tensor, embed: torch.Tensor) -> None:
        C = self.config.hidden_size
        for name, t in (("talker_hidden_BC", hidden), ("layer0_embed_BC", embed)):
            if t.dim() != 2 or t.shape[1] != C:
                raise InputError(f"{name}: expected shape [batch, {C}], got {describe(t)}")
        if hidden.shape != embed.shape:
            raise InputError(
                f"layer0_embed_BC: expected the shape of talker_hidden_BC {list(hidden.shape)}, got {describe(embed)}"
            )
