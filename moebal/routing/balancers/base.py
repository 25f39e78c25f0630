"""The balancer interface and the registry of balancers by name."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    import torch.distributed as dist

    from moebal.routing.config import RouterConfig


@dataclass
class RoutingContext:
    """What a balancer may need besides the scores of one batch.

    ``seq_len``: tokens per sequence when the batch is a stack of whole sequences (the
    sequence-wise aux loss needs it). ``group``: the data-parallel process group over which
    loads are all-reduced, or None. ``counts_E``: tokens per expert as chosen, before any
    capacity drop (set by the router after ``select``, so ``loss`` may use it).
    ``updates``: new values of the balancer's buffers that ``select`` or ``loss`` computed
    in training mode (buffer name -> tensor); the router applies them with
    :meth:`Balancer.commit` once the forward has succeeded. ``allowed_TE``: with
    group-limited routing, bool ``[T, E]``, True for the experts each token may choose
    (its chosen groups); every ``select`` chooses only among them. None: all.
    """

    logits_TE: torch.Tensor
    seq_len: Optional[int] = None
    group: Optional["dist.ProcessGroup"] = None
    counts_E: Optional[torch.Tensor] = None
    updates: dict[str, torch.Tensor] = field(default_factory=dict)
    allowed_TE: Optional[torch.Tensor] = None


@dataclass(kw_only=True)
class BalancerConfig:
    """The typed options of one balancer; each balancer nests its own as ``Balancer.Config``.

    Fields are the balancer's knobs with their defaults; ``validate()`` (run on
    construction) raises ValueError naming a bad value. ``flat_names`` maps each field to
    its flat, Megatron-style option name (``iters`` -> ``bip_iters``), the spelling of
    ``RouterConfig.from_options``, ``ModelConfig.router_options`` and ``--set router.X``.
    ``name`` is the registered balancer name (set by :func:`register_balancer`);
    ``build(router_config)`` makes the balancer.
    """

    name: ClassVar[str] = ""
    flat_names: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        pass

    def build(self, router_config: "RouterConfig") -> "Balancer":
        return BALANCERS[router_config.balancer_name](router_config)

    def flat(self) -> dict[str, Any]:
        """The options under their flat names: ``{"bip_iters": 2, ...}``."""
        return {self.flat_names.get(f.name, f.name): getattr(self, f.name)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_flat(cls, options: dict[str, Any]) -> "BalancerConfig":
        """The config from flat names (each must be one of ``flat_names``' values)."""
        field_of = {flat: name for name, flat in cls.flat_names.items()}
        return cls(**{field_of[k]: v for k, v in options.items()})


class Balancer(nn.Module):
    """One balancing method: how experts are chosen, and what loss or state it keeps.

    The router computes ``scores_TE`` (softmax or sigmoid of the logits) and calls, in order:

    1. ``select(scores_TE, top_k, ctx) -> indices_TK``: which experts each token goes to.
       The default picks the top-k of ``selection_scores(scores_TE, ctx)``; balancers that
       bias the choice (expert bias, dual prices) override ``selection_scores``; balancers
       that choose differently (Sinkhorn, the exact optimum) override ``select``.
       Gate weights never come from here: the router always takes them from the unbiased
       ``scores_TE``.
       With group-limited routing the router first scores the groups on
       ``choice_scores(scores_TE, ctx)`` and sets ``ctx.allowed_TE``; ``select`` then
       chooses only among the allowed experts.
    2. ``loss(scores_TE, indices_TK, ctx) -> scalar``: the auxiliary loss, zero by default.
    3. ``observe(loads_E, ctx)`` with the tokens per expert actually routed (training mode
       only), called when the forward is committed (see below).

    ``step()`` is called once per optimizer step; balancers with state update it there.

    A forward is committed all or nothing: ``select`` and ``loss`` never write a buffer;
    a new value they compute goes to ``ctx.updates[name]`` (training mode only), and the
    router, once the whole forward has succeeded, calls ``commit(ctx.updates)`` (which
    copies them in) and then ``observe``, which may write buffers directly.
    All state lives in registered buffers so ``state_dict`` round-trips exactly. A balancer
    is a submodule of the router, so ``self.training`` tells it whether it may update state:
    in ``eval()`` none does.

    A balancer that keeps the default ``select`` and ``selection_scores`` chooses by the
    plain top-k of the scores; the router then takes the gate weights straight from
    ``torch.topk`` and never calls ``select``.

    Its options are a nested ``Config`` dataclass (a :class:`BalancerConfig`); it is built
    with the whole :class:`~moebal.routing.RouterConfig` (``self.config``, for E, K and
    the score function) and reads its own options as ``self.options`` (that config's
    ``balancer``).
    """

    name: str = ""
    Config: ClassVar[type[BalancerConfig]] = BalancerConfig
    # True for a balancer whose selection reads the scores on the host (an LP, a
    # convergence test): the router then checks finiteness before routing, never deferred
    reads_on_host: ClassVar[bool] = False

    def __init__(self, config: "RouterConfig") -> None:
        super().__init__()
        self.config = config
        self.options = config.balancer

    def selection_scores(self, scores_TE: torch.Tensor, ctx: RoutingContext) -> torch.Tensor:
        return scores_TE

    def choice_scores(self, scores_TE: torch.Tensor, ctx: RoutingContext) -> torch.Tensor:
        """What this balancer ranks experts by for the batch, with the state it routes with
        (bias, prices): group-limited routing scores the groups on it. Default:
        ``selection_scores``."""
        return self.selection_scores(scores_TE, ctx)

    def select(self, scores_TE: torch.Tensor, top_k: int, ctx: RoutingContext) -> torch.Tensor:
        biased_TE = self.selection_scores(scores_TE, ctx)
        if ctx.allowed_TE is not None:
            biased_TE = biased_TE.masked_fill(~ctx.allowed_TE, float("-inf"))
        return torch.topk(biased_TE, top_k, dim=-1, sorted=False).indices

    def loss(
        self, scores_TE: torch.Tensor, indices_TK: torch.Tensor, ctx: RoutingContext
    ) -> torch.Tensor:
        return scores_TE.new_zeros(())

    def commit(self, updates: dict[str, torch.Tensor]) -> None:
        """Copy the new buffer values of one committed forward into the buffers."""
        for name, value in updates.items():
            self._buffers[name].copy_(value)

    def observe(self, loads_E: torch.Tensor, ctx: RoutingContext) -> None:
        pass

    def step(self, group: Optional["dist.ProcessGroup"] = None) -> None:
        pass


BALANCERS: dict[str, type[Balancer]] = {}


def register_balancer(name: str) -> Callable[[type[Balancer]], type[Balancer]]:
    """Class decorator: make a balancer available to ``RouterConfig(balancer=name)``."""

    def wrap(cls: type[Balancer]) -> type[Balancer]:
        if name in BALANCERS:
            raise ValueError(f"balancer {name!r} is registered twice")
        if "Config" not in cls.__dict__:  # no options of its own: an empty config named for it
            cls.Config = dataclass(kw_only=True)(type("Config", (cls.Config,), {
                "__qualname__": f"{cls.__qualname__}.Config", "__module__": cls.__module__}))
        cls.name = name
        cls.Config.name = name
        BALANCERS[name] = cls
        return cls

    return wrap


@register_balancer("none")
class NoBalancer(Balancer):
    """Plain top-k of the scores: no loss, no state."""
