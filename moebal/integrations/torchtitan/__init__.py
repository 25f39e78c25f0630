"""moebal inside torchtitan (0.3.x) MoE models, through torchtitan's own extension points.

Two independent parts (``pip install 'moebal[torchtitan]'``; torchtitan is imported here,
never by the rest of moebal):

- :func:`patch_model` (:mod:`.router`): every ``MoE`` block's ``TokenChoiceTopKRouter`` is
  swapped for a subclass that computes torchtitan's scores (the same gate, ``score_func``,
  ``route_norm``, ``route_scale``) and lets a moebal balancer choose the experts. The
  handle gives per-layer loads and MaxVio, ``step()`` (or an optimizer step pre-hook, the
  way torchtitan updates its own expert bias, which is switched off while moebal drives),
  the balancer state in ``model.state_dict()`` and an exact ``unpatch()``.
- :class:`ScheduledTokenDispatcher` (:mod:`.dispatcher`): an expert-parallel token
  dispatcher, chosen through ``RoutedExperts.Config(token_dispatcher=...)``, that runs
  moebal's scheduled replicated experts: replicas placed by ``moebal.schedule``, the
  per-(source, expert) counts all-gathered, one deterministic LP plan on every rank,
  tokens sent to their scheduled replica and combined back;
  :func:`sync_replica_grads` sums each expert's gradient over its replicas.

See docs/integrations.md for torchtitan's knobs next to moebal's.
"""

from moebal.integrations.torchtitan.dispatcher import (
    DispatchRecord,
    ScheduledTokenDispatcher,
    place_experts,
    scheduled_dispatchers,
    sync_replica_grads,
    use_scheduled_dispatcher,
)
from moebal.integrations.torchtitan.router import (
    BalancedRouter,
    TitanPatchHandle,
    get_handle,
    moe_blocks,
    patch_model,
    router_config,
)

__all__ = [
    "BalancedRouter",
    "DispatchRecord",
    "ScheduledTokenDispatcher",
    "TitanPatchHandle",
    "get_handle",
    "moe_blocks",
    "patch_model",
    "place_experts",
    "router_config",
    "scheduled_dispatchers",
    "sync_replica_grads",
    "use_scheduled_dispatcher",
]
