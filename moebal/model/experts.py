"""Routed experts computed as grouped matrix multiplies over tokens sorted by expert.

The path of one MoE layer, for T tokens, K slots per token and N <= T*K kept slots:

1. sort the kept slots by expert (one argsort of their expert ids), giving each expert a
   contiguous run of rows and ``offsets_E``, the int32 cumulative row counts;
2. gather the tokens' rows into that order: ``x_ND``;
3. one grouped matmul per projection (``torch.nn.functional.grouped_mm``):
   ``h_NF = silu(x_ND @ w1[e]) * (x_ND @ w3[e])``, ``y_ND = h_NF @ w2[e]`` for the run of e;
4. scale each row by its gate weight and scatter-add it back to its token (``index_add_``).

There is no Python loop over experts. Where grouped_mm cannot run (no such op in this
torch, a dtype or device it does not take, rows not 16-byte aligned) the same computation
runs as one batched matmul over experts padded to the largest expert's row count.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from moebal.model.dispatch import LocalDispatcher
from moebal.routing import Routing

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


@functools.lru_cache(maxsize=None)
def grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether grouped_mm runs forward and backward for this device type and dtype.

    Decided once per (device type, dtype) by running a 2-expert problem with an empty
    expert (with gradients on, whatever the caller's mode); the answer is cached.
    """
    if _GROUPED_MM is None:
        return False
    try:
        with torch.inference_mode(False), torch.enable_grad(), \
                torch.autocast(device_type, enabled=False):
            return _probe_grouped_mm(device_type, dtype)
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def _probe_grouped_mm(device_type: str, dtype: torch.dtype) -> bool:
    a = torch.randn(3, 16, device=device_type, dtype=dtype, requires_grad=True)
    b = torch.randn(2, 16, 16, device=device_type, dtype=dtype, requires_grad=True)
    offs = torch.tensor([0, 3], dtype=torch.int32, device=device_type)
    out = _GROUPED_MM(a, b, offs=offs)
    out.backward(torch.ones_like(out))
    ref = a.detach().float() @ b.detach()[1].float()
    return bool(torch.allclose(out.detach().float(), ref, rtol=2e-2, atol=2e-2))


def _aligned(t: torch.Tensor) -> bool:
    """grouped_mm wants every non-unit stride and the storage offset 16-byte aligned."""
    size = t.element_size()
    strides_ok = all((s * size) % 16 == 0 for s, n in zip(t.stride(), t.shape) if n > 1
                     and s != 1)
    return strides_ok and (t.data_ptr() % 16 == 0 or t.numel() == 0)


def _use_grouped_mm(a: torch.Tensor, *bs: torch.Tensor) -> bool:
    """Whether ``grouped_mm(a, b)`` can run for each b (and its output rows are aligned)."""
    return (
        all(b.dtype == a.dtype for b in bs)
        and grouped_mm_works(a.device.type, a.dtype)
        and _aligned(a)
        and all(_aligned(b) and (b.shape[-1] * b.element_size()) % 16 == 0 for b in bs)
    )


def _compute_dtype(x: torch.Tensor, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """x and the weights in one dtype: the autocast dtype under autocast, else x's."""
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) \
        else x.dtype
    return tuple(t.to(dtype) for t in (x, *weights))


def padded_bmm(x_ND: torch.Tensor, w_EXY: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """The grouped matmul as one bmm over experts padded to the largest count.

    ``x_ND`` holds the rows of expert 0, then expert 1, ... (``counts_E`` rows each);
    returns ``[N, Y]`` with row n multiplied by the weight of its expert.
    """
    E = w_EXY.shape[0]
    N = x_ND.shape[0]
    expert_N = torch.repeat_interleave(torch.arange(E, device=x_ND.device), counts_E, output_size=N)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    row_N = torch.arange(N, device=x_ND.device) - starts_E[expert_N]
    C = int(counts_E.max()) if E else 0
    x_ECX = x_ND.new_zeros(E, C, x_ND.shape[1])
    x_ECX = x_ECX.index_put((expert_N, row_N), x_ND)
    return torch.bmm(x_ECX, w_EXY)[expert_N, row_N]


def grouped_matmul(
    x_ND: torch.Tensor, w_EXY: torch.Tensor, offsets_E: torch.Tensor, counts_E: torch.Tensor
) -> torch.Tensor:
    """``y[n] = x[n] @ w[e(n)]`` for rows sorted by expert.

    ``offsets_E`` (int32) is the cumulative row count, ``counts_E`` (int64) the counts.
    Uses grouped_mm where it can run, else :func:`padded_bmm`. Under autocast both operands
    are cast to the autocast dtype (grouped_mm takes one dtype).
    """
    x_ND, w_EXY = _compute_dtype(x_ND, w_EXY)
    if _use_grouped_mm(x_ND, w_EXY):
        return _GROUPED_MM(x_ND, w_EXY, offs=offsets_E)
    return padded_bmm(x_ND, w_EXY, counts_E)


class GroupedExperts(nn.Module):
    """E SwiGLU experts, ``y = (silu(x @ w1) * (x @ w3)) @ w2``, as grouped matmuls.

    Parameters ``w1_EDF``, ``w3_EDF`` ([E, D, F]) and ``w2_EFD`` ([E, F, D]).
    ``forward(x_TD, routing) -> y_TD`` sums each token's kept experts' outputs weighted by
    the gate weights; ``run_sorted(x_ND, counts_E)`` applies the experts to rows already
    sorted by expert (what an expert-parallel runtime receives after its all-to-all).
    """

    def __init__(self, num_experts: int, dim: int, hidden: int):
        super().__init__()
        self.num_experts, self.dim, self.hidden = num_experts, dim, hidden
        self.w1_EDF = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w3_EDF = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w2_EFD = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.reset_parameters()

    def extra_repr(self) -> str:
        return f"E={self.num_experts}, D={self.dim}, F={self.hidden}"

    def reset_parameters(self, std: float = 0.02, out_std: Optional[float] = None) -> None:
        nn.init.normal_(self.w1_EDF, std=std)
        nn.init.normal_(self.w3_EDF, std=std)
        nn.init.normal_(self.w2_EFD, std=std if out_std is None else out_std)

    def run_sorted(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Expert outputs ``[N, D]`` for rows sorted by expert, ``counts_E[e]`` rows each."""
        offsets_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
        h1_NF = grouped_matmul(x_ND, self.w1_EDF, offsets_E, counts_E)
        h3_NF = grouped_matmul(x_ND, self.w3_EDF, offsets_E, counts_E)
        return grouped_matmul(F.silu(h1_NF) * h3_NF, self.w2_EFD, offsets_E, counts_E)

    def forward(self, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        dispatcher = LocalDispatcher(self.num_experts)  # sort by expert (moebal.model.dispatch)
        x_ND, counts_E, meta = dispatcher.dispatch(x_TD, routing)
        return dispatcher.combine(self.run_sorted(x_ND, counts_E), meta)


__all__ = ["GroupedExperts", "grouped_matmul", "grouped_mm_works", "padded_bmm"]
