"""The router's configuration: router-level knobs plus one balancer's typed config.

``RouterConfig(num_experts=16, top_k=2, balancer=BIPBalancer.Config(iters=4))`` is the
typed form; ``balancer="bip"`` takes that balancer's defaults. The flat, Megatron-style
spelling of earlier versions (``bip_iters=4``, ``aux_loss_coeff=0.1``, ...) is accepted by
``RouterConfig(...)`` and :meth:`RouterConfig.from_options`, which map each flat name onto
the chosen balancer's config and refuse one it does not read.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Optional, Union

from moebal.routing.balancers import BALANCERS, BalancerConfig
from moebal.routing.groups import check_groups
from moebal.routing.validate import check_bool, check_choice, check_int, check_number

SCORE_FUNCTIONS = ("softmax", "sigmoid")
DROP_POLICIES = ("probs", "position")
# the router's own knobs (every other option belongs to a balancer's config)
ROUTER_FIELDS = ("num_experts", "top_k", "score_function", "norm_topk_prob",
                 "capacity_factor", "drop_policy", "z_loss_coeff", "num_groups", "group_topk",
                 "group_score")
# read only with a group limit (num_groups set)
GROUP_FIELDS = ("num_groups", "group_topk", "group_score")


def flat_option_owners() -> dict[str, list[tuple[str, str]]]:
    """Every flat balancer option name -> the (balancer, config field) pairs that read it."""
    owners: dict[str, list[tuple[str, str]]] = {}
    for name, cls in BALANCERS.items():
        for field_name, flat in cls.Config.flat_names.items():
            owners.setdefault(flat, []).append((name, field_name))
    return owners


def router_option_names() -> list[str]:
    """Every option name ``RouterConfig.from_options`` takes besides ``balancer``."""
    return sorted(set(ROUTER_FIELDS) | set(flat_option_owners()))


def balancer_defaults(name: str) -> dict[str, Any]:
    """The options balancer ``name`` reads, flat name -> default (from its ``Config``)."""
    if name not in BALANCERS:
        raise ValueError(f"unknown balancer {name!r}; known: {sorted(BALANCERS)}")
    return BALANCERS[name].Config().flat()


def _check_flat(flat: str, value: Any, owners: list[tuple[str, str]]) -> None:
    """Validate one flat option by the config of a balancer that reads it."""
    balancer, field_name = owners[0]
    BALANCERS[balancer].Config(**{field_name: value})


@dataclass(init=False)
class RouterConfig:
    """Everything the router needs; names follow Megatron-core's ``moe_router_*`` knobs.

    num_experts, top_k      E and K.
    score_function          "softmax" or "sigmoid" over the logits (computed in float32).
    norm_topk_prob          rescale each token's K gate weights to sum to 1.
    capacity_factor         None = dropless; else each expert takes at most
                            ceil(capacity_factor * T * K / E) tokens of a batch.
    drop_policy             which tokens an over-full expert keeps: "probs" (highest gate
                            weight) or "position" (earliest in the batch).
    z_loss_coeff            beta of the router z-loss, usable with any balancer (0 = off).
    num_groups, group_topk  group-limited routing (Megatron-core ``moe_router_num_groups``/
                            ``moe_router_group_topk``, DeepSeek-V3 ``n_group``/
                            ``topk_group``): the experts in ``num_groups`` groups of
                            consecutive ids, each token choosing among its best
                            ``group_topk`` groups; None/None = off. Works with every
                            balancer (:mod:`moebal.routing.groups`).
    group_score             how a group is scored: "top2" (DeepSeek-V3, torchtitan) or
                            "topk_share" (Megatron-core).
    balancer                the balancer's typed config, e.g. ``BIPBalancer.Config(iters=4)``
                            (given as a registered name: that balancer's defaults).
    balancer_name           its registered name (derived from ``balancer``).

    ``**options``: flat option names (``bip_iters=4``, ``aux_loss_coeff=0.1``; see
    :func:`router_option_names`) for the chosen balancer, as :meth:`from_options` with
    ``strict=True``.
    """

    num_experts: int
    top_k: int
    score_function: str
    norm_topk_prob: bool
    capacity_factor: Optional[float]
    drop_policy: str
    z_loss_coeff: float
    num_groups: Optional[int]
    group_topk: Optional[int]
    group_score: str
    balancer: BalancerConfig
    balancer_name: str

    def __init__(
        self,
        num_experts: int,
        top_k: int = 2,
        score_function: str = "softmax",
        norm_topk_prob: bool = False,
        capacity_factor: Optional[float] = None,
        drop_policy: str = "probs",
        z_loss_coeff: float = 0.0,
        num_groups: Optional[int] = None,
        group_topk: Optional[int] = None,
        group_score: str = "top2",
        balancer: Union[str, BalancerConfig] = "none",
        balancer_name: Optional[str] = None,
        **options: Any,
    ) -> None:
        self.num_experts = num_experts
        self.top_k = top_k
        self.score_function = score_function
        self.norm_topk_prob = norm_topk_prob
        self.capacity_factor = capacity_factor
        self.drop_policy = drop_policy
        self.z_loss_coeff = z_loss_coeff
        self.num_groups = num_groups
        self.group_topk = group_topk
        self.group_score = group_score
        if isinstance(balancer, str):
            if balancer not in BALANCERS:
                raise ValueError(f"unknown balancer {balancer!r}; known: {sorted(BALANCERS)}")
            balancer_name, balancer = balancer, BALANCERS[balancer].Config.from_flat(
                self._flat_for(balancer, options, strict=True))
        elif isinstance(balancer, BalancerConfig):
            if options:
                raise TypeError(
                    f"flat options {sorted(options)} come with a typed balancer config; set "
                    f"them on {type(balancer).__qualname__} instead"
                )
            balancer_name = balancer_name or type(balancer).name
            if balancer_name not in BALANCERS:
                raise ValueError(
                    f"{type(balancer).__qualname__} belongs to no registered balancer; "
                    f"known: {sorted(BALANCERS)}"
                )
        else:
            raise TypeError(
                f"balancer must be a registered name or a balancer Config, got "
                f"{type(balancer).__name__}"
            )
        self.balancer = balancer
        self.balancer_name = balancer_name
        self.validate()

    @staticmethod
    def _flat_for(name: str, options: dict[str, Any], strict: bool) -> dict[str, Any]:
        """The flat options balancer ``name`` reads, out of ``options``; every option is
        validated, and one it does not read is a ValueError (``strict``) or left out."""
        owners = flat_option_owners()
        unknown = sorted(set(options) - set(owners))
        if unknown:
            raise TypeError(
                f"unknown router option(s) {unknown}; known: {router_option_names()}"
            )
        reads = set(BALANCERS[name].Config.flat_names.values())
        mine = {}
        for flat, value in options.items():
            _check_flat(flat, value, owners[flat])
            if flat in reads:
                mine[flat] = value
            elif strict:
                readers = sorted({b for b, _ in owners[flat]})
                raise ValueError(
                    f"balancer {name!r} does not read {flat}={value!r} (read by "
                    f"{', '.join(readers)}); leave it out or choose that balancer"
                )
        return mine

    @classmethod
    def from_options(
        cls, num_experts: int, balancer: str = "none", *, strict: bool = True, **options: Any
    ) -> "RouterConfig":
        """A RouterConfig from flat names: router fields plus the chosen balancer's options.

        ``RouterConfig.from_options(num_experts=16, balancer="bip", bip_iters=4)`` is
        ``RouterConfig(num_experts=16, balancer=BIPBalancer.Config(iters=4))``. Every flat
        option is validated; one the balancer does not read is a ValueError naming it, or,
        with ``strict=False``, left out (the form of options shared by several balancers,
        as ``ModelConfig.router_options`` and ``moebal compare``). An unknown name is a
        TypeError.
        """
        if not isinstance(balancer, str):
            raise TypeError(f"balancer must be a name (str), got {type(balancer).__name__}")
        if balancer not in BALANCERS:
            raise ValueError(f"unknown balancer {balancer!r}; known: {sorted(BALANCERS)}")
        router = {k: options.pop(k) for k in ROUTER_FIELDS if k in options}
        flat = cls._flat_for(balancer, options, strict)
        return cls(num_experts=num_experts, balancer=BALANCERS[balancer].Config.from_flat(flat),
                   balancer_name=balancer, **router)

    def validate(self) -> None:
        check_int("num_experts", self.num_experts, minimum=1)
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or not (
            1 <= self.top_k <= self.num_experts
        ):
            raise ValueError(
                f"top_k must be in 1..num_experts={self.num_experts}, got {self.top_k!r}"
            )
        check_choice("score_function", self.score_function, SCORE_FUNCTIONS)
        check_bool("norm_topk_prob", self.norm_topk_prob)
        if self.capacity_factor is not None:
            check_number("capacity_factor (None = dropless)", self.capacity_factor, low=0.0,
                         low_open=True)
        check_choice("drop_policy", self.drop_policy, DROP_POLICIES)
        check_number("z_loss_coeff", self.z_loss_coeff, low=0.0)
        check_groups(self.num_experts, self.top_k, self.num_groups, self.group_topk,
                     self.group_score)
        if self.balancer_name not in BALANCERS:
            raise ValueError(
                f"unknown balancer {self.balancer_name!r}; known: {sorted(BALANCERS)}"
            )
        self.balancer.validate()

    def options(self) -> dict[str, Any]:
        """The balancer's options under their flat names (``{"bip_iters": 2, ...}``)."""
        return self.balancer.flat()


def routing_settings(config: RouterConfig) -> dict[str, Any]:
    """Everything that changes how ``config`` routes, flat name -> value.

    The balancer's name and every option it reads (BIP's warm-up and pinning included),
    then the router's own knobs (the group limit's only when it is on). Options a balancer
    does not read never appear, so two configs route alike exactly when their settings
    are equal.
    """
    settings: dict[str, Any] = {"balancer": config.balancer_name, **config.options()}
    for name in ROUTER_FIELDS:
        if config.num_groups is not None or name not in GROUP_FIELDS:
            settings[name] = getattr(config, name)
    return settings


def router_defaults() -> dict[str, Any]:
    """The router-level knobs' defaults (those :class:`RouterConfig` takes when omitted)."""
    params = inspect.signature(RouterConfig.__init__).parameters
    return {name: params[name].default for name in ROUTER_FIELDS if name != "num_experts"}


__all__ = [
    "DROP_POLICIES",
    "GROUP_FIELDS",
    "ROUTER_FIELDS",
    "RouterConfig",
    "SCORE_FUNCTIONS",
    "balancer_defaults",
    "flat_option_owners",
    "routing_settings",
    "router_defaults",
    "router_option_names",
]
