"""Routing balancers and the router: logits in, expert choices out. Pure tensors."""

from moebal.routing.balancers import BALANCERS, Balancer, RoutingContext, register_balancer
from moebal.routing.router import (
    NonFiniteLogits,
    Router,
    RouterConfig,
    Routing,
    RoutingLog,
)

__all__ = [
    "BALANCERS",
    "Balancer",
    "NonFiniteLogits",
    "Router",
    "RouterConfig",
    "Routing",
    "RoutingContext",
    "RoutingLog",
    "register_balancer",
]
