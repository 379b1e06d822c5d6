"""Fine-tune the code predictor (or any part) on synthetic speech data, and print the losses.

    python scripts/finetune_example.py                       # tiny random model on CPU, a few seconds
    python scripts/finetune_example.py --train talker --steps 20 --out /tmp/tuned
    torchrun --standalone --nproc-per-node 8 scripts/finetune_example.py \\
        --model /path/to/Qwen3-Omni-30B-A3B-Instruct --device cuda --dtype bfloat16 --train talker

Each example is (conversation prompt, answer tokens, answer speech codes [16, T]); here they are random, in
the released token layout. The loss is the thinker's LM loss on the answer (when the thinker trains) plus
`talker_loss` (codec layer 0 + the 15 residual codebooks). Under torchrun every rank takes its own rows and
FSDP2 (`qwen3omni.training.shard_model`) shards each transformer layer across the ranks; with --model, each rank
reads only its own shards of the checkpoint (`load_sharded`).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from qwen3omni.model.omni import Qwen3Omni
from qwen3omni.training import (
    load_sharded,
    set_gradient_checkpointing,
    shard_model,
    synthetic_example,
    talker_loss,
    train_only,
    with_answer,
)


def build_model(args) -> Qwen3Omni:
    dtype = getattr(torch, args.dtype)
    if args.model:
        return Qwen3Omni.from_pretrained(args.model, dtype=dtype, device=args.device)
    from qwen3omni.demo import random_init_, tiny_config

    with torch.device(args.device):
        model = random_init_(Qwen3Omni(tiny_config()), seed=0)
    return model.to(dtype)


def training_loss(model, batch, answer, codes):
    """Thinker LM loss on the answer (only if the thinker trains) + the talker / code predictor loss."""
    talker = talker_loss(model, batch, answer, codes)
    total = talker.loss
    parts = {"layer0": talker.layer0_loss.detach(), "residual": talker.residual_loss.detach()}
    if any(p.requires_grad for p in model.thinker.parameters()):
        thinker = model.thinker(**with_answer(batch, answer, model.config))
        total = total + thinker.loss
        parts["thinker"] = thinker.loss.detach()
    return total, parts


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="checkpoint folder (default: the tiny config with random weights)")
    parser.add_argument("--train", nargs="+", default=["talker.code_predictor"],
                        help="components or name patterns to train (default: talker.code_predictor)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch", type=int, default=2, help="rows per rank")
    parser.add_argument("--frames", type=int, default=12, help="codec frames per answer (12.5 per second)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--out", help="save the fine-tuned model here (released layout)")
    args = parser.parse_args(argv)

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank = 0
    if distributed:
        backend = "nccl" if args.device.startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend)
        rank = torch.distributed.get_rank()
        if args.device.startswith("cuda"):
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(args.device)
    torch.manual_seed(0)
    if distributed and args.model:  # each rank reads only its shards: no rank holds the whole model
        step_fn = load_sharded(args.model, training_loss, dtype=getattr(torch, args.dtype), device=args.device)
        model = step_fn.model.train()
    else:
        model = build_model(args).train()
    trained = train_only(model, *args.train)
    if args.gradient_checkpointing:
        set_gradient_checkpointing(model)
    if distributed and not args.model:
        step_fn = shard_model(model, training_loss)
    elif not distributed:
        step_fn = lambda *a: training_loss(model, *a)  # noqa: E731
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    batch, answer, codes = synthetic_example(model.config, args.batch, frames=args.frames, seed=rank)
    batch = {k: v.to(args.device) for k, v in batch.items()}
    answer, codes = answer.to(args.device), codes.to(args.device)
    if rank == 0:
        print(f"training {len(trained)} tensors ({sum(p.numel() for p in params):,} parameters) under {args.train}")
    history, start = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        loss, parts = step_fn(batch, answer, codes)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append({"loss": float(loss.detach()), **{k: float(v) for k, v in parts.items()}})
        if rank == 0:
            shown = "  ".join(f"{k} {v:.4f}" for k, v in history[-1].items())
            print(f"step {step:3d}  {shown}", flush=True)
    if rank == 0:
        print(f"{args.steps} steps in {time.perf_counter() - start:.1f} s")
    if args.out:
        if distributed:
            from qwen3omni.training import save_sharded

            save_sharded(model, args.out)  # collective: gathers the shards, rank 0 writes
        else:
            model.save_pretrained(args.out)
        if rank == 0:
            print(f"saved to {args.out}")
    if distributed:
        torch.distributed.destroy_process_group()
    return {"history": history}


if __name__ == "__main__":
    main()
