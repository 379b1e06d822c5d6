"""Fine-tuning: losses for every trainable part, freezing, activation checkpointing, LoRA names, FSDP2, saving.

- thinker: `model.thinker(**with_answer(batch, answer, model.config), output_router_logits=True)` gives `.loss`
  (causal LM + router_aux_loss_coef x load balancing) and `.aux_loss`, as transformers computes them;
- talker and code predictor: `talker_loss(model, batch, answer, codes)` -> `.loss`, `.layer0_loss`,
  `.residual_loss`, teacher-forced through the same prompt builder as generation.
"""

from .data import synthetic_example, with_answer
from .distributed import LossModule, full_state_dict, layer_units, load_sharded, save_sharded, shard_model
from .freezing import (
    decoder_stacks,
    freeze,
    select_parameters,
    set_gradient_checkpointing,
    set_trainable,
    train_only,
    trainable_parameters,
    unfreeze,
)
from .lora import ATTENTION, DENSE_MLP, TALKER_INPUTS, TALKER_TARGETS, linear_names
from .losses import IGNORE_INDEX, causal_lm_loss, load_balancing_loss
from .saving import changed_tensors, save_merged
from .talker_loss import TalkerLossOutput, talker_loss

__all__ = [
    "ATTENTION", "DENSE_MLP", "IGNORE_INDEX", "TALKER_INPUTS", "TALKER_TARGETS", "LossModule", "TalkerLossOutput",
    "causal_lm_loss", "changed_tensors", "decoder_stacks", "freeze", "full_state_dict", "layer_units",
    "linear_names", "load_balancing_loss", "load_sharded", "save_merged", "save_sharded", "select_parameters",
    "set_gradient_checkpointing", "set_trainable", "shard_model", "synthetic_example", "talker_loss", "train_only",
    "trainable_parameters", "unfreeze", "with_answer",
]
