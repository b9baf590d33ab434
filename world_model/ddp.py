"""Multi-process data parallel on CPU (gloo), started by ``torchrun``.

    torchrun --nproc_per_node=2 -m world_model.train stage=teacher ...

``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT;
:func:`init_distributed` reads them (a plain ``python -m`` run is world size 1
and never touches ``torch.distributed``). Every rank builds the same model
(DDP broadcasts rank 0's weights), draws different batches (samplers take the
rank as part of their seed), and averages gradients in ``backward``. Only rank 0
logs, validates and saves; every rank reads the saved state on resume.
"""
from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


class DistError(RuntimeError):
    """A distributed launch that cannot work (e.g. WORLD_SIZE set without torchrun's other variables)."""


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str = "gloo", timeout_minutes: float = 30.0) -> DistInfo:
    """Join the process group described by torchrun's environment; world size 1 without one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise DistError(f"WORLD_SIZE={world} but {', '.join(missing)} unset: launch with torchrun")
    if backend == "gloo":
        _pin_gloo_to_loopback()
    if not dist.is_initialized():
        # Validation on rank 0 can take minutes while other ranks wait in the next all-reduce.
        dist.init_process_group(backend, init_method="env://",
                                timeout=timedelta(minutes=timeout_minutes))
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def _pin_gloo_to_loopback() -> None:
    """Single-host runs talk over loopback, whatever the host name resolves to.

    Without GLOO_SOCKET_IFNAME, gloo binds to the address its host name resolves
    to; in sandboxes and containers that address can be one the peers cannot
    reach, and the ranks then wait for each other forever. When the master is a
    loopback address every rank is on this host, so the loopback device is right.
    """
    if "GLOO_SOCKET_IFNAME" in os.environ:
        return
    try:
        master = ipaddress.ip_address(socket.gethostbyname(os.environ["MASTER_ADDR"]))
    except (OSError, ValueError):
        return
    if not master.is_loopback:
        return
    loopback = [name for _, name in socket.if_nameindex() if name == "lo" or name.startswith("lo")]
    if loopback:
        os.environ["GLOO_SOCKET_IFNAME"] = loopback[0]


def wrap_model(model: nn.Module, info: DistInfo) -> nn.Module:
    """DistributedDataParallel around ``model`` when running distributed, else ``model`` itself."""
    if not info.enabled:
        return model
    # DDP broadcasts rank 0's parameters and buffers at construction: all ranks start equal.
    return DistributedDataParallel(model)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def all_reduce_max(values: Sequence[float], info: DistInfo) -> list[float]:
    """Element-wise max over ranks (used to agree on stop / checkpoint decisions)."""
    if not info.enabled:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean over ranks of a tensor (returns a new tensor; the input is untouched)."""
    if not info.enabled:
        return t.clone()
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / info.world_size


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
