"""A decoder-only Mixture-of-Experts transformer, readable top to bottom.

tokens_BS -> embedding -> n_layers x Block -> RMSNorm -> tied output layer -> logits_BSV

Block:  x = x + Attention(RMSNorm(x));  x = x + FFN(RMSNorm(x))
        Attention: rotary positions, causal scaled_dot_product_attention.
        FFN: a dense SwiGLU in the first ``dense_layers`` blocks, else an MoELayer:
             gate Linear(D->E) -> moebal Router -> GroupedExperts (+ shared experts).

Each forward hands one RoutingLog down the blocks: every MoE layer adds its Routing, and
the balancer updates they stage are committed once the whole forward has succeeded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from moebal.model.config import ModelConfig
from moebal.model.experts import GroupedExperts
from moebal.routing import Router, RouterTimer, Routing, RoutingLog


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rotary_table(seq_len: int, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """cos and sin of the rotary angles, ``[2, seq_len, head_dim]`` (halves repeated)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles_SH = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    angles_SH = torch.cat([angles_SH, angles_SH], dim=-1)
    return torch.stack([angles_SH.cos(), angles_SH.sin()])


def apply_rotary(x_BHSd: torch.Tensor, cos_Sd: torch.Tensor, sin_Sd: torch.Tensor) -> torch.Tensor:
    """Rotate each (first-half, second-half) pair of the head dims by its position's angle."""
    x1, x2 = x_BHSd.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x_BHSd * cos_Sd + rotated * sin_Sd


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x_BSD: torch.Tensor, rotary: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        H = self.n_heads
        q, k, v = self.qkv(x_BSD).view(B, S, 3, H, D // H).permute(2, 0, 3, 1, 4)  # [B,H,S,d]
        cos, sin = rotary[0, :S].to(q.dtype), rotary[1, :S].to(q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y_BHSd = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y_BHSd.transpose(1, 2).reshape(B, S, D))


class SwiGLU(nn.Module):
    """Dense SwiGLU FFN: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoELayer(nn.Module):
    """Gate, router, routed experts and optional shared experts on a flat ``[T, D]`` batch.

    ``forward(x_TD, seq_len=None, log=None) = experts(x_TD, routing) (+ shared(x_TD))`` with
    ``routing = router.route(x_TD, gate.weight, ...)`` (the gate in float32). The routing is
    appended to ``log`` (a :class:`~moebal.routing.RoutingLog`), whose ``commit()`` applies
    the balancer update; without a log the router applies it before returning.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        D, E, Fh = config.d_model, config.num_experts, config.expert_hidden
        self.gate = nn.Linear(D, E, bias=False)
        self.router = Router(config.router_config())
        self.experts = GroupedExperts(E, D, Fh)
        self.shared: Optional[SwiGLU] = (
            SwiGLU(D, config.num_shared_experts * Fh) if config.num_shared_experts else None
        )

    def route(
        self, x_TD: torch.Tensor, seq_len: Optional[int] = None, log: Optional[RoutingLog] = None
    ) -> Routing:
        return self.router.route(x_TD, self.gate.weight, seq_len=seq_len, log=log)[1]

    def forward(
        self, x_TD: torch.Tensor, seq_len: Optional[int] = None, log: Optional[RoutingLog] = None
    ) -> torch.Tensor:
        routing = self.route(x_TD, seq_len, log)
        y_TD = self.experts(x_TD, routing)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        return y_TD


class Block(nn.Module):
    def __init__(self, config: ModelConfig, moe: bool):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model)
        self.attn = Attention(config)
        self.ffn_norm = RMSNorm(config.d_model)
        self.ffn: Union[MoELayer, SwiGLU] = (
            MoELayer(config) if moe else SwiGLU(config.d_model, config.ffn_dense_hidden)
        )

    def forward(
        self, x_BSD: torch.Tensor, rotary: torch.Tensor, log: Optional[RoutingLog] = None
    ) -> torch.Tensor:
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), rotary)
        h_BSD = self.ffn_norm(x_BSD)
        if isinstance(self.ffn, MoELayer):
            B, S, D = h_BSD.shape
            return x_BSD + self.ffn(h_BSD.reshape(B * S, D), seq_len=S, log=log).view(B, S, D)
        return x_BSD + self.ffn(h_BSD)


@dataclass
class ModelOutput:
    """What one forward computed.

    logits          [B, S, V].
    loss            lm_loss + router_loss when targets were given, else None.
    router_loss     the sum of each MoE layer's ``routing.loss``.
    loads_LE        int64 [L, E]: token-slots each expert of each MoE layer computed.
    dropped_L       int64 [L]: token-slots capacity dropped per MoE layer (0 dropless).
    routed_slots    T*K, the token-slots each MoE layer routed (kept or dropped).
    routings        the :class:`Routing` of each MoE layer, in model order.
    router_timer    the time of the layers' gates and routers (``time_routers=True``), a
                    :class:`~moebal.routing.RouterTimer`: read ``router_seconds`` (on CUDA
                    that waits for the timed kernels) once the step is done.
    """

    logits: torch.Tensor
    loss: Optional[torch.Tensor]
    lm_loss: Optional[torch.Tensor]
    router_loss: torch.Tensor
    loads_LE: torch.Tensor
    dropped_L: Optional[torch.Tensor] = None
    routed_slots: int = 0
    routings: list[Routing] = field(default_factory=list)
    router_timer: RouterTimer = field(default_factory=RouterTimer)

    @property
    def router_seconds(self) -> float:
        """Seconds in the layers' gates and routers (0 unless timed)."""
        return self.router_timer.seconds


class MoEModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"MoEModel takes a ModelConfig, got {type(config).__name__}")
        config.validate()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(
            Block(config, moe=i >= config.dense_layers) for i in range(config.n_layers)
        )
        self.norm = RMSNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.embed.weight  # tied
        self.time_routers = False  # forward's default for time_routers
        head_dim = config.d_model // config.n_heads
        self.register_buffer("rotary", rotary_table(config.seq_len, head_dim), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, init_std), residual output projections scaled by
        1/sqrt(2 * n_layers); norms at 1."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, GroupedExperts):
                module.reset_parameters(std, out_std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, std=out_std)
            ffn = block.ffn
            for swiglu in (ffn, getattr(ffn, "shared", None)):
                if isinstance(swiglu, SwiGLU):
                    nn.init.normal_(swiglu.w2.weight, std=out_std)

    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoELayer)]

    def routers(self) -> list[Router]:
        return [layer.router for layer in self.moe_layers()]

    @torch.no_grad()
    def step_routers(self) -> None:
        """``router.step()`` for every router; call once per optimizer step."""
        for router in self.routers():
            router.step()

    def set_auto_step(self, auto_step: bool) -> None:
        """``router.auto_step`` for every router: False when the training loop calls
        ``step_routers()`` once per optimizer step (see :class:`~moebal.routing.Router`)."""
        for router in self.routers():
            router.auto_step = bool(auto_step)

    def num_params(self, active: bool = False) -> int:
        """Parameters (the tied embedding counted once); ``active=True`` counts only the
        top_k routed experts a token uses in each MoE layer."""
        total = sum(p.numel() for p in self.parameters())
        if active:
            c = self.config
            per_expert = 3 * c.d_model * c.expert_hidden
            total -= len(self.moe_layers()) * (c.num_experts - c.top_k) * per_expert
        return total

    def _check_tokens(self, name: str, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2 or t.dtype != torch.long:
            raise ValueError(
                f"{name} must be an int64 tensor [batch, seq], got shape {tuple(t.shape)} "
                f"dtype {t.dtype}"
            )

    def forward(
        self, tokens_BS: torch.Tensor, targets_BS: Optional[torch.Tensor] = None,
        *, time_routers: Optional[bool] = None,
    ) -> ModelOutput:
        """Logits (and losses, with targets) of ``tokens_BS``; see :class:`ModelOutput`.

        The balancers' updates of this forward are applied at its end, all or none: a
        forward that raises (e.g. :class:`~moebal.routing.NonFiniteLogits`) changes none.
        ``time_routers``: measure the gates and routers into ``router_seconds`` (None: the
        model's ``time_routers`` attribute, False unless set).
        """
        if time_routers is None:
            time_routers = self.time_routers
        self._check_tokens("tokens", tokens_BS)
        B, S = tokens_BS.shape
        if not 1 <= S <= self.config.seq_len:
            raise ValueError(
                f"sequence length {S} is not in 1..seq_len={self.config.seq_len}"
            )
        if targets_BS is not None:
            self._check_tokens("targets", targets_BS)
            if targets_BS.shape != tokens_BS.shape:
                raise ValueError(
                    f"targets shape {tuple(targets_BS.shape)} != tokens shape {(B, S)}"
                )

        # every MoE layer adds its routing to the log; their balancer updates wait there
        # and are committed only once the whole forward has succeeded
        log = RoutingLog(timed=time_routers)
        x_BSD = self.embed(tokens_BS)
        for block in self.blocks:
            x_BSD = block(x_BSD, self.rotary, log)
        logits_BSV = self.lm_head(self.norm(x_BSD))

        routings = log.routings
        if routings:
            router_loss = sum(r.loss for r in routings)
            loads_LE = torch.stack([r.loads_E for r in routings])
        else:
            router_loss = logits_BSV.new_zeros((), dtype=torch.float32)
            loads_LE = torch.zeros(0, self.config.num_experts, dtype=torch.int64,
                                   device=tokens_BS.device)
        routed_slots = B * S * self.config.top_k
        lm_loss = loss = None
        if targets_BS is not None:
            lm_loss = F.cross_entropy(
                logits_BSV.float().reshape(B * S, -1), targets_BS.reshape(-1), ignore_index=-1
            )
            loss = lm_loss + router_loss
        log.commit()
        return ModelOutput(logits_BSV, loss, lm_loss, router_loss, loads_LE,
                           dropped_L=routed_slots - loads_LE.sum(dim=1), routed_slots=routed_slots,
                           routings=routings, router_timer=log.timer)
