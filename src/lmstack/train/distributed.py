"""Distributed data parallel through PyTorch's own engine: launch with `torchrun`, gloo on CPU, NCCL on GPU.

Every process holds a full replica of the model and trains on its own slice of each global batch;
after the backward pass DDP all-reduces (averages) the gradients, so every replica takes the same
optimizer step (Li et al. 2020, PyTorch Distributed). With the same global batch the update equals one
process's up to floating-point summation order. `torchrun` sets RANK, WORLD_SIZE, LOCAL_RANK and the
rendezvous address in the environment; without them a run is a single process and nothing here
touches `torch.distributed`.

    torchrun --nproc_per_node 2 --no-python lmstack train --data corpus/ --threads 1
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

from lmstack.errors import InputError, RunError


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job; `world_size == 1` means no process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """`auto` picks CUDA when available (one GPU per local rank), else the CPU."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise InputError(f"unknown device {spec!r} — use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError("device cuda was asked for but no CUDA GPU is visible — use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


def setup(device: str = "auto") -> DistInfo:
    """Join the process group `torchrun` describes in the environment (or stay a single process)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    dev = resolve_device(device, local_rank)
    if world_size > 1 and not torch_dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        torch_dist.init_process_group(
            backend=backend, rank=rank, world_size=world_size, device_id=dev if dev.type == "cuda" else None
        )
    return DistInfo(rank, world_size, local_rank, local_world, dev)


def teardown(info: DistInfo) -> None:
    if info.enabled and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def wrap(model: nn.Module, info: DistInfo) -> nn.Module:
    """DDP around `model` when distributed. MoE experts that received no token have no gradient in a
    step, so they need `find_unused_parameters`."""
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    has_experts = getattr(getattr(model, "config", None), "is_moe", False)
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=has_experts)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP and/or `torch.compile` wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a float64 tensor over processes (a no-op for a single process)."""
    if info.enabled:
        values = values.to(info.device)
        torch_dist.all_reduce(values, op=torch_dist.ReduceOp.SUM)
    return values.cpu()


def all_reduce_mean(value: float, info: DistInfo) -> float:
    if not info.enabled:
        return value
    return float(all_reduce_sum(torch.tensor([value], dtype=torch.float64), info)[0]) / info.world_size


def broadcast_object(value: Any, info: DistInfo) -> Any:
    """Rank 0's `value` on every rank."""
    if not info.enabled:
        return value
    box = [value]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value: Any, info: DistInfo) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    if not info.enabled:
        return [value]
    out: list[Any] = [None] * info.world_size
    torch_dist.all_gather_object(out, value)
    return out


def run_on_main(fn: Callable[[], Any], info: DistInfo) -> Any:
    """Run `fn` on rank 0 only and hand its result to every rank. If it raises, every rank raises
    the same kind of error with the same message, so no process waits forever at a barrier."""
    if not info.enabled:
        return fn()
    outcome: tuple[str, Any]
    if info.is_main:
        try:
            outcome = ("ok", fn())
        except (InputError, RunError) as exc:
            outcome = (type(exc).__name__, str(exc))
        except Exception as exc:
            outcome = ("RunError", f"rank 0 failed: {type(exc).__name__}: {exc}")
    else:
        outcome = ("", None)
    kind, value = broadcast_object(outcome, info)
    if kind == "ok":
        return value
    raise (InputError if kind == "InputError" else RunError)(value)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        torch_dist.barrier()
