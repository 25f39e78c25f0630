"""Which tokens of the batch count as load: those the attention mask keeps.

The MoE blocks of ``transformers`` models do not see the attention mask, so a router would
count padding as load. :class:`AttentionMask` catches the mask as the patched model's
forward starts (:class:`MaskCatchHook`) and lets it go as it ends; each layer's adapter asks
it which of its tokens are real (:meth:`AttentionMask.valid_T`).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn


class AttentionMask:
    """The 2-D attention mask (``[B, W]``, nonzero = a real token) of the model forward in
    progress; None outside a forward or when the forward was given none.

    With a KV cache the mask covers the past and the current tokens (W >= S): the current
    ones are its last S columns."""

    def __init__(self) -> None:
        self.mask_BW: Optional[torch.Tensor] = None

    def valid_T(self, num_tokens: int, seq_len: Optional[int]) -> Optional[torch.Tensor]:
        """bool [T]: which of the ``num_tokens`` tokens (rows ``b * S + s`` of a router whose
        block sees ``[B, S, D]`` with ``S = seq_len``) the mask keeps; None when every token
        counts: no mask, no padding, or tokens that are not the batch's ``B * S`` (a block
        that routes a subset of them, as a vision-expert block does)."""
        mask_BW = self.mask_BW
        if mask_BW is None or seq_len is None:
            return None
        B, W = mask_BW.shape
        S = seq_len
        if num_tokens != B * S or S > W:
            return None
        valid_BS = mask_BW[:, W - S:] != 0
        if bool(valid_BS.all()):
            return None
        return valid_BS.reshape(-1)


class MaskCatchHook:
    """Forward pre-hook (with kwargs) on the patched model: keeps the ``attention_mask`` it is
    called with (a keyword, or the second positional argument) for the adapters."""

    def __init__(self, mask: AttentionMask) -> None:
        self.mask = mask

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1:
            mask = args[1]
        keep = isinstance(mask, torch.Tensor) and mask.dim() == 2 and not mask.is_floating_point()
        self.mask.mask_BW = mask.detach() if keep else None


class MaskReleaseHook:
    """Forward hook on the patched model: forgets the mask once the forward is over."""

    def __init__(self, mask: AttentionMask) -> None:
        self.mask = mask

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.mask.mask_BW = None


__all__ = ["AttentionMask", "MaskCatchHook", "MaskReleaseHook"]
