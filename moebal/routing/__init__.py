"""Routing balancers and the router: logits in, expert choices out. Pure tensors."""

from moebal.routing.balancers import BALANCERS, Balancer, RoutingContext, register_balancer
from moebal.routing.router import Router, RouterConfig, Routing

__all__ = [
    "BALANCERS",
    "Balancer",
    "Router",
    "RouterConfig",
    "Routing",
    "RoutingContext",
    "register_balancer",
]
