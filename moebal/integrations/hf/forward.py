"""One forward of a patched model: its attention mask, its routing log, what it routed.

The MoE blocks of ``transformers`` models see neither the attention mask nor anything that
spans the whole forward. :class:`ModelForward` is opened by a forward pre-hook on the
patched model (:class:`ForwardBeginHook`, which keeps the ``attention_mask`` the model was
called with) and closed by a forward hook (:class:`ForwardEndHook`). In between, each
layer's adapter asks it which of its tokens are real (:meth:`ModelForward.valid_T`), routes
into its :class:`moebal.routing.RoutingLog` and hands it the :class:`Routing`. Closing
commits the log (every balancer update of the forward, in layer order) and adds the
routings to the :class:`RoutingRecord`; a forward that raises is never closed, so it changes
no balancer state and no record (the next one starts afresh).
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import nn

from moebal.integrations.hf.record import RoutingRecord
from moebal.routing import Routing, RoutingLog


class ModelForward:
    """The patched model's forward in progress (``open`` is False outside one).

    mask_BW  the 2-D attention mask it was called with (``[B, W]``, nonzero = a real
             token; with a KV cache W covers the past and the current tokens), or None.
    log      the RoutingLog the layers route into.
    """

    def __init__(self, record: RoutingRecord) -> None:
        self.record = record
        self.open = False
        self.mask_BW: Optional[torch.Tensor] = None
        self.log: Optional[RoutingLog] = None
        self._routed: list[tuple[int, Routing, bool]] = []
        self._layers: set[int] = set()

    def begin(self, mask_BW: Optional[torch.Tensor]) -> None:
        self.open, self.mask_BW, self.log = True, mask_BW, RoutingLog()
        self._routed, self._layers = [], set()

    def log_for(self, layer: int) -> Optional[RoutingLog]:
        """The log layer ``layer`` routes into: None outside a forward, or when the layer has
        routed in this forward already (a block called twice: its update applies at once)."""
        if not self.open or layer in self._layers:
            return None
        self._layers.add(layer)
        return self.log

    def routed(self, layer: int, routing: Routing, training: bool) -> None:
        """What layer ``layer`` routed; recorded when the forward ends (at once outside one)."""
        if self.open:
            self._routed.append((layer, routing, training))
        else:
            self.record.add(layer, routing, training)

    def end(self) -> None:
        """Commit the forward's balancer updates and record its routings."""
        log, routed = self.log, self._routed
        self.open, self.mask_BW, self.log, self._routed, self._layers = False, None, None, [], set()
        if log is not None:
            log.commit()
        for layer, routing, training in routed:
            self.record.add(layer, routing, training)

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

    def __deepcopy__(self, memo: dict) -> "ModelForward":
        """A copy outside any forward (a forward's log cannot be copied)."""
        clone = ModelForward(copy.deepcopy(self.record, memo))
        memo[id(self)] = clone
        return clone


class ForwardBeginHook:
    """Forward pre-hook (with kwargs) on the patched model: opens its :class:`ModelForward`
    with the ``attention_mask`` it is called with (a keyword, or the second positional
    argument; a 2-D integer or bool mask)."""

    def __init__(self, forward: ModelForward) -> None:
        self.forward = forward

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1:
            mask = args[1]
        keep = isinstance(mask, torch.Tensor) and mask.dim() == 2 and not mask.is_floating_point()
        self.forward.begin(mask.detach() if keep else None)


class ForwardEndHook:
    """Forward hook on the patched model: closes its :class:`ModelForward`."""

    def __init__(self, forward: ModelForward) -> None:
        self.forward = forward

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.forward.end()


__all__ = ["ForwardBeginHook", "ForwardEndHook", "ModelForward"]
