"""Balancers, one module each, registered by name in ``BALANCERS``."""

from moebal.routing.balancers.base import (
    BALANCERS,
    Balancer,
    BalancerConfig,
    NoBalancer,
    RoutingContext,
    register_balancer,
)

# importing a balancer's module registers it
from moebal.routing.balancers import (  # noqa: E402,F401  (isort: skip)
    aux_loss,
    seq_aux_loss,
    global_aux_loss,
    loss_free,
    bip,
    quantile,
    sinkhorn,
    optimal,
)

__all__ = [
    "BALANCERS",
    "Balancer",
    "BalancerConfig",
    "NoBalancer",
    "RoutingContext",
    "register_balancer",
]
