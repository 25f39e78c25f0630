"""Balancers, one module each, registered by name in ``BALANCERS``."""

from moebal.routing.balancers.base import (
    BALANCERS,
    Balancer,
    NoBalancer,
    RoutingContext,
    register_balancer,
)

__all__ = ["BALANCERS", "Balancer", "NoBalancer", "RoutingContext", "register_balancer"]
