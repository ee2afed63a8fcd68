"""More than one GPU: data parallelism under torchrun, in one small module.

    torchrun --nproc-per-node 8 train.py --model Qwen2.5-1.5B ...        # one node, 8 GPUs
    python train.py ...                                                 # a world of one: no process group

Each process (rank) holds the whole model and takes a contiguous share of every step's query groups:
a group's G rollouts stay on one rank, so RAAE, rewards and group statistics need nothing from the
others. What crosses ranks, and only this:
  - rank 0's choice of the step's queries (`broadcast`), so the curriculum state stays single;
  - the step's rewards and RAAE token masks (`gather`): every rank then computes the advantages of
    the whole batch (as one process would, --scale-rewards batch included) and the logged metrics,
    and every rank applies the same curriculum update;
  - the loss normalisers (`total`: tokens and rollouts of the whole step), so dapo / dr_grpo / grpo
    divide by the global count;
  - the gradients, summed once per optimiser step over one flat buffer (`sum_gradients`: what DDP
    does with its buckets, with no wrapper around the model), so every rank takes the same AdamW
    step and the weights never need to be sent again.
Sampling is rank-invariant too: each rank draws the random numbers of the whole batch and uses its
rows' (sampling.generate's row_offset / total_rows), so N ranks sample what one process would.
Checkpoints are written by rank 0 alone and are the same whatever the world size: a run resumes on
any number of ranks. With one process every function below is a no-op (or the identity).

--fsdp (`shard`): for a model whose training state (float32 weights, gradients, AdamW moments: 16
bytes per parameter) does not fit one GPU, FSDP2 shards it: each decoder layer, and the rest
(embeddings, final norm, head), is one unit whose parameters every rank holds 1/N of, gathered
for its forward and backward, its gradients reduce-scattered. The split of the work, the losses and
the checkpoints are the same as above; what changes:
  - the sampling copy (and the reference) are whole models on every rank, refreshed from the shards
    once per step (`full`, one parameter at a time): sampling reads no sharded weights, so it
    gathers nothing per decode token;
  - every forward is a collective, so every rank runs the same number of them (the trainer pads a
    rank's micro-batches with empty ones);
  - checkpoints gather each tensor to rank 0 (`full`), so they are the files one process writes, and
    `like` cuts a loaded optimiser moment back to this rank's shard.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def launched() -> bool:
    """Started by torchrun (or another launcher that sets RANK, WORLD_SIZE and MASTER_ADDR). A process
    group is formed even for one process: `torchrun --nproc-per-node 1` runs the distributed code on
    one GPU (the GPU check does), where a plain `python train.py` runs none of it."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def setup(device: torch.device) -> torch.device:
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU); on CUDA each rank takes
    the GPU of its LOCAL_RANK. Returns the device this rank runs on."""
    if not launched():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # Rank 0 evaluates alone while the others wait: the default 10-30 min timeout is too short.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=3))
    return device


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0: the one that prints, writes files and evaluates."""
    return rank() == 0


def share(items: list) -> list:
    """This rank's contiguous share of a list whose length the world size divides."""
    n = len(items) // world()
    return items[rank() * n:(rank() + 1) * n]


def broadcast(obj):
    """Rank 0's object, on every rank."""
    if world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj) -> list:
    """[rank 0's obj, rank 1's obj, ...] on every rank."""
    if world() == 1:
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def concat(parts: list):
    """One object from the ranks' parts (as `gather` returns them), rank order: lists and arrays joined,
    dataclasses and dicts field by field (a RewardBreakdown of the whole batch from each rank's)."""
    import dataclasses

    import numpy as np
    first = parts[0]
    if len(parts) == 1:
        return first
    if dataclasses.is_dataclass(first):
        return dataclasses.replace(first, **{f.name: concat([getattr(p, f.name) for p in parts])
                                             for f in dataclasses.fields(first)})
    if isinstance(first, dict):
        return {k: concat([p[k] for p in parts]) for k in first}
    if isinstance(first, np.ndarray):
        return np.concatenate(parts)
    if isinstance(first, list):
        return [x for p in parts for x in p]
    return first  # a scalar setting, the same on every rank


def _device() -> torch.device:
    """Where collectives take their tensors: the rank's GPU under nccl, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def totals(values: dict[str, float], maxima: tuple[str, ...] = ()) -> dict[str, float]:
    """Each value summed over ranks (the keys in `maxima`: their maximum), in two collectives at most."""
    if world() == 1:
        return dict(values)
    out = {}
    for keys, op in (([k for k in values if k not in maxima], dist.ReduceOp.SUM),
                     ([k for k in values if k in maxima], dist.ReduceOp.MAX)):
        if keys:
            t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_device())
            dist.all_reduce(t, op=op)
            out.update(zip(keys, t.tolist()))
    return out


def total(x: float) -> float:
    """The sum of x over ranks."""
    return totals({"x": x})["x"]


def anyone(flag: bool) -> bool:
    """True on every rank when it is true on any (a signal arrived somewhere: all stop)."""
    return total(float(flag)) > 0


def sum_gradients(params) -> None:
    """Add up every rank's gradients (one flat buffer, one all-reduce): each rank's loss is already
    its share of the step's loss, so the sum is the gradient one process would have. Sharded
    parameters (--fsdp) are left alone: FSDP already summed theirs in backward."""
    if world() == 1:
        return
    params = [p for p in params if not is_sharded(p)]
    if not params:
        return
    for p in params:  # a rank with nothing to train this step still takes part, with zeros
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    i = 0
    for g in grads:
        g.copy_(flat[i:i + g.numel()].view_as(g))
        i += g.numel()


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_, also over sharded gradients: their norm is the whole gradient's
    (the shards' squares summed over ranks), and it is returned as a plain tensor."""
    params = [p for p in params if p.grad is not None]
    if not any(is_sharded(p) for p in params):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    norm = full(torch.nn.utils.get_total_norm([p.grad for p in params]))
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


# ----------------------------------------------------------------------------- --fsdp

def shard(model) -> None:
    """FSDP2 over a CausalLM, in place: each decoder layer one unit, the embeddings, final norm and
    head the root unit. The trainer calls the model through `hidden_states` and `head` and the
    layers through `shared` as well as `forward`; those are registered so that each gathers its
    unit's parameters. The root keeps its parameters gathered from its forward to the end of
    backward (FSDP's default for the root), which is what lets `head` run outside any forward.
    Each rank's loss is its share of the step's, so gradients are summed, not averaged."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    for layer in model.model.layers:
        fully_shard(layer)
        register_fsdp_forward_method(layer, "shared")
    fully_shard(model)
    for name in ("hidden_states", "shared_hidden_states"):
        register_fsdp_forward_method(model, name)
    for unit in [model, *model.model.layers]:  # each unit reduces its own gradients
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied sum)


def is_sharded(t) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded one (an all-gather: every rank must call it), else t."""
    return t.full_tensor() if is_sharded(t) else t


def whole(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Named tensors to save, whole: when any is sharded (--fsdp), each is gathered in turn (every rank
    must call this) and rank 0 alone keeps it, on the CPU (the others get {}); otherwise `tensors`."""
    if not any(is_sharded(t) for t in tensors.values()):
        return tensors
    out = {}
    for k, v in tensors.items():
        v = full(v)
        if is_main():
            out[k] = v.detach().cpu()
    return out


def like(value: torch.Tensor, param) -> torch.Tensor:
    """A whole tensor (a loaded optimiser moment) cut as `param` is: this rank's shard of it when the
    parameter is sharded (each rank holds the whole value already: no communication), else itself."""
    if not is_sharded(param) or value.dim() == 0:
        return value
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
