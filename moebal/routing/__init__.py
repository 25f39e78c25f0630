"""Balancers and the router: logits in, expert choices out. Pure tensors.

Shape suffixes (``logits_TE``, ``indices_TK``, ``loads_E``) follow the legend in
docs/design.md. Adding a balancer: docs/design.md, "Balancers".
"""

from moebal.routing.balancers import (
    BALANCERS,
    Balancer,
    BalancerConfig,
    RoutingContext,
    register_balancer,
)
from moebal.routing.config import (
    RouterConfig,
    balancer_defaults,
    router_defaults,
    router_option_names,
    routing_settings,
)
from moebal.routing.log import (
    FINITE_CHECKS,
    NonFiniteLogits,
    PendingUpdate,
    RouterTimer,
    RoutingLog,
)
from moebal.routing.router import Router, Routing, gate_logits

__all__ = [
    "BALANCERS",
    "FINITE_CHECKS",
    "Balancer",
    "BalancerConfig",
    "NonFiniteLogits",
    "PendingUpdate",
    "Router",
    "RouterConfig",
    "RouterTimer",
    "Routing",
    "RoutingContext",
    "RoutingLog",
    "balancer_defaults",
    "gate_logits",
    "register_balancer",
    "router_defaults",
    "router_option_names",
    "routing_settings",
]
