"""LoRA with PEFT: the `nn.Linear` names to target, and how to keep the released layout after merging.

Every projection is a plain `nn.Linear` named as in the released checkpoint, so PEFT's `LoraConfig` applies
by name, with no custom code:

    from peft import LoraConfig, get_peft_model
    talker = get_peft_model(model.talker, LoraConfig(r=16, lora_alpha=32, target_modules=TALKER_TARGETS))
    ... train (model.talker now carries the adapters; talker_loss(model, ...) uses them) ...
    talker.merge_and_unload()        # the adapters are folded into model.talker's weights, in place
    model.save_pretrained(out_dir)   # the released layout: same tensor names and shapes as before

`nn.Linear` leaf names (suffixes PEFT matches):
- decoder attention (thinker.model, talker.model, talker.code_predictor.model, code2wav.pre_transformer):
  `self_attn.q_proj`, `k_proj`, `v_proj`, `o_proj`;
- dense SwiGLU MLPs: `gate_proj`, `up_proj`, `down_proj` -- the code predictor's layers, the talker's shared
  expert (`mlp.shared_expert.*`), Code2Wav's transformer and any thinker layer in `mlp_only_layers`; the
  shared expert's gate `mlp.shared_expert_gate`;
- talker inputs and heads: `text_projection.linear_fc1/2`, `hidden_projection.linear_fc1/2`, `codec_head`,
  `code_predictor.lm_head.{0..14}`; thinker head: `lm_head`;
- audio encoder layers: `self_attn.q_proj/k_proj/v_proj/out_proj`, `fc1`, `fc2` (and `proj1`, `proj2`,
  `conv_out`); vision blocks: `attn.qkv`, `attn.proj`, `mlp.linear_fc1/2`; mergers: `merger.mlp.0/2`,
  `merger_list.{i}.mlp.0/2`.
Not `nn.Linear`, so not LoRA targets by module name: the routers (`mlp.gate`, a bare weight) and the routed
experts (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I], stacked 3-D parameters).

Apply PEFT to a component (`model.talker`, `model.thinker`), not to the whole `Qwen3Omni`. PEFT (>= 0.18 with
transformers 5) treats any module whose `config.model_type` is a transformers MoE type ("qwen3_omni_moe",
"qwen3_omni_moe_thinker") as a transformers-v4 adapter target and rewrites `gate_proj`/`up_proj`/`down_proj`
to the stacked experts (LoRA on `experts.gate_up_proj`/`down_proj` through `target_parameters`), and expands a
regex to bare leaf names, which then match in every component. The talker's config has no such type, so
on `model.talker` names are taken literally. On `model.thinker`, the names above address attention as
expected; there `gate_proj`/`up_proj`/`down_proj` mean the experts, as for transformers' own Qwen3-Omni.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from ..errors import InputError

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
DENSE_MLP = ("gate_proj", "up_proj", "down_proj")
TALKER_INPUTS = ("text_projection.linear_fc1", "text_projection.linear_fc2",
                 "hidden_projection.linear_fc1", "hidden_projection.linear_fc2")
# A sensible default for speech fine-tuning: every attention and dense MLP projection of the talker and its
# code predictor, and the projections from the thinker into the talker.
TALKER_TARGETS = [*ATTENTION, *DENSE_MLP, *TALKER_INPUTS]


def linear_names(module: nn.Module, leaves: Iterable[str] | None = None, under: str | None = None) -> list[str]:
    """Full names of the `nn.Linear` modules of `module` (relative to it) whose names end with one of
    `leaves` (default: any), optionally only under the prefix `under` -- an explicit `target_modules` list."""
    wanted = None if leaves is None else (leaves,) if isinstance(leaves, str) else tuple(leaves)  # a str is one name
    names = []
    for name, child in module.named_modules():
        if not isinstance(child, nn.Linear):
            continue
        if under is not None and not (name == under or name.startswith(under + ".")):
            continue
        if wanted is None or any(name == w or name.endswith("." + w) for w in wanted):
            names.append(name)
    if not names:
        raise InputError(f"linear_names: no nn.Linear named {list(wanted or ['*'])} under {under or 'the module'}")
    return names
