"""Sharded data-parallel training with PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`).

Nothing here communicates by itself: `fully_shard` does the all-gathers and reduce-scatters. This module only
chooses the units -- one per transformer layer (every decoder layer of the thinker, talker and code predictor,
and the layers/blocks of the audio, vision and Code2Wav transformers) -- and the root.

The root is a `LossModule` around the model: FSDP2 gathers a unit's parameters in that unit's `forward`
hooks, and its root (the first unit to run forward) prepares the step. The talker loss calls several parts
of the model directly (embeddings, projections, heads, two decoder stacks), so the root's forward must enclose
the whole loss computation. `LossModule.forward(*args)` is `loss_fn(model, *args)`; the parameters outside the
layers (embeddings, heads, norms, projections) form the root's group.

    torch.distributed.init_process_group()               # torchrun sets rank / world size
    model = Qwen3Omni.from_pretrained(path, dtype=torch.bfloat16, device=f"cuda:{local_rank}")
    step = shard_model(model, my_loss)                   # my_loss(model, batch) -> scalar
    opt = torch.optim.AdamW([p for p in step.parameters() if p.requires_grad], lr=1e-5)
    loss = step(batch); loss.backward(); opt.step()
    save_sharded(step.model, out_dir)                    # collective; rank 0 writes the released layout

Data parallelism: each rank computes the mean loss of its own rows and FSDP averages the gradients over the
ranks, which is the gradient of the whole batch's mean when every rank holds as many target tokens (pad or
weight the losses otherwise). The MoE load-balancing loss is computed per rank, over the rank's tokens.
For the 30B release, `load_sharded` replaces the first two lines: it builds the model on `meta`, shards it,
and each rank reads only its own rows of every tensor from the checkpoint (its experts' tensors, for the
stacked experts), so no rank ever holds the whole model:

    step = load_sharded(path, my_loss, dtype=torch.bfloat16, device=f"cuda:{local_rank}")
    model = step.model
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .. import checkpoint as ckpt


class LossModule(nn.Module):
    """`forward(*args, **kwargs) = loss_fn(model, *args, **kwargs)`: one module call per training step."""

    def __init__(self, model: nn.Module, loss_fn: Callable):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, *args, **kwargs):
        return self.loss_fn(self.model, *args, **kwargs)


def layer_units(model: nn.Module) -> list[nn.Module]:
    """Each element of every `layers` / `blocks` ModuleList: the transformer layers of every component."""
    units = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "blocks"):
            units.extend(module)
    return units


def shard_model(model: nn.Module, loss_fn: Callable, mesh=None, **fsdp_kwargs) -> LossModule:
    """Apply `fully_shard` to every transformer layer of `model`, then to a `LossModule` root; return the root.

    `mesh`: a 1-D `DeviceMesh` (default: all ranks, on the device type of the model's parameters).
    `fsdp_kwargs` go to every `fully_shard` call (e.g. `mp_policy=MixedPrecisionPolicy(...)`,
    `reshard_after_forward=False`). Call after freezing/LoRA and before creating the optimizer; the model's
    parameters become sharded `DTensor`s.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if mesh is None:
        device_type = next(model.parameters()).device.type
        mesh = init_device_mesh(device_type, (torch.distributed.get_world_size(),))
    for unit in layer_units(model):
        fully_shard(unit, mesh=mesh, **fsdp_kwargs)
    root = LossModule(model, loss_fn)
    fully_shard(root, mesh=mesh, **fsdp_kwargs)
    return root


def load_sharded(
    path,
    loss_fn: Callable,
    dtype: torch.dtype | None = None,
    device=None,
    components=None,
    mesh=None,
    strict: bool = True,
    **fsdp_kwargs,
) -> LossModule:
    """`Qwen3Omni.from_pretrained` + `shard_model` without a whole copy on any rank (a collective: every rank
    calls it): build on `meta`, `fully_shard`, allocate each rank's shards on `device`, then read each rank's
    rows straight from the safetensors files. Returns the root `LossModule`; its `.model` is the `Qwen3Omni`."""
    from ..config import Qwen3OmniConfig
    from ..model.omni import Qwen3Omni, _as_dtype, _config_dtype

    config = Qwen3OmniConfig.from_pretrained(path)
    with ckpt.on_meta():
        model = Qwen3Omni(config, components)
    dtype = _as_dtype(dtype)
    model.to(dtype if dtype is not None else _config_dtype(config))
    if mesh is None:  # the parameters are on `meta` here: take the device type from `device`
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(torch.device(device or "cpu").type, (torch.distributed.get_world_size(),))
    root = shard_model(model, loss_fn, mesh, **fsdp_kwargs)
    root.to_empty(device=device or "cpu")
    ckpt.reset_buffers(model)
    ckpt.load_state_sharded(model, path, prefixes=[f"{c}." for c in model.components], strict=strict)
    return root


def full_state_dict(model: nn.Module, released_names: bool = True) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict, on CPU, complete on rank 0 (a collective: call it on every rank).

    With `released_names`, in the released layout (experts split per expert), ready for
    `qwen3omni.checkpoint.save_checkpoint`; otherwise our own names, for `model.load_state_dict`.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not released_names:
        return state
    out = {}
    for name, tensor in state.items():
        out.update(ckpt.ExpertLayout.export(name, tensor))
    return out


def save_sharded(model: nn.Module, out_dir, max_shard_size: int | str = "5GB", merge_into=None) -> None:
    """`Qwen3Omni.save_pretrained` for a sharded model: gathers the full tensors, and rank 0 writes them.

    A collective: call it on every rank. As `save_pretrained`, a model with only part of the speech side needs
    `merge_into=<original checkpoint>` (then `max_shard_size` is base's layout and is not used).
    """
    import torch.distributed as dist

    from ..model.omni import saved_config

    # Checked on every rank before the gather, so a refused save raises everywhere instead of leaving the
    # other ranks waiting in the barrier.
    ckpt.refuse_adapters(model.state_dict())
    if merge_into is None:
        saved_config(model, torch.float32)
    state = full_state_dict(model)
    if dist.get_rank() == 0:
        if merge_into is not None:
            from .saving import merge_tensors

            merge_tensors(state, out_dir, merge_into)
        else:
            meta = saved_config(model, next(iter(state.values())).dtype)
            ckpt.save_checkpoint(state, out_dir, meta, max_shard_size)
    dist.barrier()
