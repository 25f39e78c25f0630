"""Collectives of the expert-parallel runtime: process-group start-up with a timeout, the
differentiable variable-split all-to-all, and the all-gather of per-expert counts.

Every collective here is wrapped so that a failure (a peer that died, a timeout) is raised
as :class:`CollectiveError` naming this rank, the operation and the timeout, instead of
the backend's bare message.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0


class CollectiveError(RuntimeError):
    """A collective failed or timed out, usually because another rank failed first."""


def default_backend() -> str:
    """``nccl`` when CUDA is available, else ``gloo``."""
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


class _State:
    timeout_s: float = DEFAULT_TIMEOUT_S  # set by init_distributed


_STATE = _State()


def _timeout_s() -> float:
    return _STATE.timeout_s


@contextlib.contextmanager
def collective(what: str, group: Optional[dist.ProcessGroup] = None) -> Iterator[None]:
    """Re-raise a failing collective as a :class:`CollectiveError` that says what and where."""
    try:
        yield
    except CollectiveError:
        raise
    except RuntimeError as exc:  # DistBackendError, DistNetworkError, gloo/nccl timeouts
        rank = dist.get_rank() if dist.is_initialized() else -1
        raise CollectiveError(
            f"rank {rank}: collective {what!r} failed (collective timeout {_timeout_s():g} s); "
            f"if another rank failed or stopped first, its error is the cause. Backend said: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
        ) from exc


def init_distributed(
    backend: Optional[str] = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    init_method: Optional[str] = None,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
) -> tuple[int, int, torch.device]:
    """Start the default process group (once); returns ``(rank, world_size, device)``.

    Without arguments the rank, world size and rendezvous come from the environment that
    ``torchrun`` sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). The backend
    is :func:`default_backend` unless given; with nccl each process uses the GPU
    ``LOCAL_RANK``. Every collective of the run fails after ``timeout_s`` seconds instead of
    waiting for ever.
    """
    if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
        raise ValueError(f"timeout_s must be a positive number, got {timeout_s!r}")
    backend = backend or default_backend()
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    _STATE.timeout_s = float(timeout_s)
    if backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        kwargs = {}
        if rank is not None:
            kwargs = {"rank": rank, "world_size": world_size}
        dist.init_process_group(
            backend,
            init_method=init_method,
            timeout=datetime.timedelta(seconds=float(timeout_s)),
            **kwargs,
        )
    return dist.get_rank(), dist.get_world_size(), device


def world_from_env() -> tuple[int, int]:
    """``(rank, world_size)``: the process group's when one is started, else torchrun's
    environment (RANK, WORLD_SIZE; 0 and 1 without a launcher)."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(
            f"RANK={os.environ.get('RANK')!r} / WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} "
            f"are not integers"
        ) from None


def new_group(ranks: Sequence[int]) -> Optional[dist.ProcessGroup]:
    """``dist.new_group`` with this run's timeout. Every rank must call it, in the same order."""
    with collective(f"new_group({list(ranks)})"):
        return dist.new_group(
            list(ranks), timeout=datetime.timedelta(seconds=_timeout_s())
        )


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with variable splits; its backward is the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x_ND, output_splits, input_splits, group, what):  # type: ignore[override]
        ctx.splits = (list(output_splits), list(input_splits))
        ctx.group, ctx.what = group, what
        return _all_to_all(x_ND, output_splits, input_splits, group, what)

    @staticmethod
    def backward(ctx, grad_recv_ND):  # type: ignore[override]
        output_splits, input_splits = ctx.splits
        grad_ND = _all_to_all(
            grad_recv_ND, input_splits, output_splits, ctx.group, ctx.what + " (backward)"
        )
        return grad_ND, None, None, None, None


def _all_to_all(x_ND, output_splits, input_splits, group, what):
    x_ND = x_ND.contiguous()
    out_recv_ND = x_ND.new_empty((int(sum(output_splits)),) + tuple(x_ND.shape[1:]))
    with collective(what, group):
        dist.all_to_all_single(
            out_recv_ND, x_ND, list(map(int, output_splits)), list(map(int, input_splits)),
            group=group,
        )
    return out_recv_ND


def all_to_all(
    x_ND: torch.Tensor,
    output_splits: Sequence[int],
    input_splits: Sequence[int],
    group: Optional[dist.ProcessGroup] = None,
    what: str = "all_to_all",
) -> torch.Tensor:
    """Differentiable variable-split all-to-all over ``group``.

    Rows ``x_ND`` are sent in consecutive chunks of ``input_splits[i]`` rows to the i-th rank
    of the group; the result stacks ``output_splits[i]`` rows from the i-th rank. Gradients
    travel back along the same routes.
    """
    if len(output_splits) != len(input_splits):
        raise ValueError(
            f"output_splits ({len(output_splits)}) and input_splits ({len(input_splits)}) "
            f"must have one entry per rank of the group"
        )
    if int(sum(input_splits)) != x_ND.shape[0]:
        raise ValueError(
            f"input_splits sum to {int(sum(input_splits))} but x has {x_ND.shape[0]} rows"
        )
    return _AllToAll.apply(x_ND, list(output_splits), list(input_splits), group, what)


def all_gather_counts(
    counts_E: torch.Tensor, group: Optional[dist.ProcessGroup] = None, what: str = "counts"
) -> torch.Tensor:
    """int64 ``[group size, E]``: every rank's ``counts_E``, in group rank order, on every rank."""
    counts_E = counts_E.to(torch.int64).contiguous()
    size = dist.get_world_size(group)
    parts = [torch.empty_like(counts_E) for _ in range(size)]
    with collective(f"all_gather {what}", group):
        dist.all_gather(parts, counts_E, group=group)
    return torch.stack(parts)


def all_reduce_(tensor: torch.Tensor, group: Optional[dist.ProcessGroup] = None,
                what: str = "all_reduce") -> torch.Tensor:
    """In-place sum over ``group``."""
    with collective(what, group):
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def broadcast_(tensor: torch.Tensor, src: int = 0, group: Optional[dist.ProcessGroup] = None,
               what: str = "broadcast") -> torch.Tensor:
    """In-place broadcast from global rank ``src``."""
    with collective(what, group):
        dist.broadcast(tensor, src=src, group=group)
    return tensor


def barrier(what: str = "barrier") -> None:
    with collective(what):
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()
