"""What a comparison trains: named variants of the balancers, each at a stated setting.

A *variant* is a balancer with the options it is compared at, a label for the report and
the reason for that setting. ``compare --balancers`` names variants; every balancer is also
a variant of its own name. Settings:

- ``paper``: the setting a paper's claim was made at (or the reference implementation's
  default where the paper gives none), so the claim is checked against what it says;
- ``moebal``: a variant of moebal's own, labelled as such;
- ``baseline``: plain top-k;
- ``sweep``: a point of ``--sweep`` (see :func:`sweep_variants`).

(The report reads variants back from results.json through :mod:`moebal.report.methods`.)

``in_batch`` marks the variants that route a batch with information computed from that
same batch (its later tokens decide its earlier tokens' experts): their training
MaxVio_batch is an in-batch optimisation and only held-out balance compares them fairly.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from moebal.report.methods import Variant, routes_in_batch
from moebal.routing import BALANCERS
from moebal.train.presets import parse_value


def _variant(name: str, balancer: str, options: dict[str, Any], setting: str, label: str,
             why: str) -> Variant:
    return Variant(name, balancer, options, setting, label, why,
                   routes_in_batch(balancer, options))


def variant_record(variant: Variant, options: dict[str, Any]) -> dict[str, Any]:
    """config["variants"][name] of results.json, with the options actually used (which
    decide ``in_batch``: ``--balancer-option`` may change them)."""
    return {"balancer": variant.balancer, "options": dict(options), "setting": variant.setting,
            "label": variant.label, "why": variant.why,
            "in_batch": routes_in_batch(variant.balancer, options)}


_BIP_MOEBAL = {"bip_iters": 4, "bip_warmup_iters": 32, "bip_pin_q": True}
VARIANTS: dict[str, Variant] = {v.name: v for v in (
    _variant("none", "none", {}, "baseline", "None (plain top-k)", "no balancing: the reference"),
    _variant("aux_loss", "aux_loss", {"aux_loss_coeff": 1e-3}, "paper", "Aux loss (α=1e-3)",
            "alpha = 1e-3: the baseline the Loss-Free paper's claim was made against"),
    _variant("seq_aux_loss", "seq_aux_loss", {"aux_loss_coeff": 0.1}, "paper",
            "Seq. aux loss (α=0.1)",
            "alpha = 0.1 per sequence: the BIP paper's Loss-Controlled baseline (MiniMind's "
            "default, from secondary sources)"),
    _variant("global_aux_loss", "global_aux_loss", {"aux_loss_coeff": 1e-3}, "paper",
            "Global aux loss (α=1e-3)", "alpha as aux_loss, f over the whole global batch"),
    _variant("loss_free", "loss_free",
            {"bias_update_rate": 1e-3, "bias_update": "sign", "score_function": "sigmoid",
             "norm_topk_prob": True}, "paper", "Loss-Free",
            "the paper's setting: sigmoid gates, top-K weights normalised, u = 1e-3, sign "
            "update (Megatron-core refuses an expert bias on softmax scores)"),
    _variant("loss_free_softmax", "loss_free",
            {"bias_update_rate": 1e-3, "bias_update": "sign", "score_function": "softmax",
             "norm_topk_prob": False}, "moebal", "Loss-Free (softmax)",
            "the bias on softmax probabilities, unnormalised weights: outside the paper's "
            "method, kept to show what that costs"),
    _variant("bip", "bip", {**_BIP_MOEBAL, "bip_order": "paper"}, "moebal",
            "BIP (moebal: warm-up 32, pinned)",
            "T_iter = 4 per batch (the paper gives none), 32 iterations on the first batch, "
            "duals pinned to min q = 0; prices from the batch being routed"),
    _variant("bip_paper", "bip",
            {"bip_iters": 4, "bip_warmup_iters": 4, "bip_pin_q": False, "bip_order": "paper"},
            "paper", "BIP (paper)",
            "the algorithm as the paper writes it: T_iter = 4 on every batch, the first "
            "included, no pinning; prices from the batch being routed"),
    _variant("bip_causal", "bip", {**_BIP_MOEBAL, "bip_order": "causal"}, "moebal",
            "BIP (causal)",
            "as bip, but each batch is routed with the prices of the batches before it, "
            "then they are updated: no token's expert depends on later tokens"),
    _variant("quantile", "quantile", {"quantile_ema": 0.0}, "paper", "Quantile",
            "one quantile step per micro-batch, no EMA: Megatron-LM's default"),
    _variant("sinkhorn", "sinkhorn", {}, "moebal", "Sinkhorn", "the balancer's defaults"),
    _variant("optimal", "optimal", {}, "moebal", "Optimal (exact)",
            "the exact balanced optimum of each batch: a reference, not a method"),
)}

DEFAULT_VARIANTS = ("none", "aux_loss", "seq_aux_loss", "loss_free", "bip", "bip_paper",
                    "bip_causal", "quantile")

# --sweep VARIANT: the option swept and its grid (the variant's own value is part of it)
SWEEP_GRIDS: dict[str, tuple[str, tuple[Any, ...]]] = {
    "aux_loss": ("aux_loss_coeff", (1e-4, 1e-3, 1e-2)),
    "seq_aux_loss": ("aux_loss_coeff", (1e-3, 1e-2, 0.1)),
    "global_aux_loss": ("aux_loss_coeff", (1e-4, 1e-3, 1e-2)),
    "loss_free": ("bias_update_rate", (1e-4, 1e-3, 1e-2)),
    "loss_free_softmax": ("bias_update_rate", (1e-4, 1e-3, 1e-2)),
    "bip": ("bip_iters", (2, 4, 8)),
    "bip_paper": ("bip_iters", (2, 4, 8)),
    "bip_causal": ("bip_iters", (2, 4, 8)),
    "quantile": ("quantile_ema", (0.0, 0.9)),
}


def get_variant(name: str) -> Variant:
    """The variant called ``name``: a registered one, a sweep point, or a bare balancer."""
    if name in VARIANTS:
        return VARIANTS[name]
    base, at, point = name.partition("@")
    if at:
        option, eq, raw = point.partition("=")
        if not eq:
            raise ValueError(f"sweep point {name!r} is not of the form VARIANT@OPTION=VALUE")
        return sweep_point(get_variant(base), option, parse_value(raw))
    if name in BALANCERS:
        return _variant(name, name, {}, "moebal", name, "the balancer's defaults")
    known = sorted(set(VARIANTS) | set(BALANCERS))
    raise ValueError(f"unknown balancer or variant {name!r}; known: {', '.join(known)}")


def sweep_point(base: Variant, option: str, value: Any) -> Variant:
    text = format_value(value)
    return _variant(f"{base.name}@{option}={text}", base.balancer, {**base.options, option: value},
                   "sweep", f"{base.label.split(' (')[0]} ({option}={text})",
                   f"a --sweep point of {base.name}")


def format_value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def parse_sweep(items: Iterable[str]) -> dict[str, tuple[str, list[Any]]]:
    """``--sweep`` items, ``VARIANT`` (its grid, :data:`SWEEP_GRIDS`) or
    ``VARIANT.OPTION=V1,V2,...``, as {variant: (option, values)}; ValueError when bad."""
    sweeps: dict[str, tuple[str, list[Any]]] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        base, dot, option = key.strip().partition(".")
        variant = get_variant(base)
        if eq:
            if not dot or not option:
                raise ValueError(f"--sweep {item!r} is not VARIANT or VARIANT.OPTION=V1,V2,...")
            values = [parse_value(v.strip()) for v in raw.split(",") if v.strip()]
            if not values:
                raise ValueError(f"--sweep {item!r} names no values")
        elif dot:
            raise ValueError(f"--sweep {item!r} names an option but no values (OPTION=V1,V2)")
        elif variant.name in SWEEP_GRIDS:
            option, grid = SWEEP_GRIDS[variant.name]
            values = list(grid)
        else:
            raise ValueError(f"--sweep {item!r}: {variant.name!r} has no default grid; name one "
                             f"as {variant.name}.OPTION=V1,V2,... (grids: {', '.join(SWEEP_GRIDS)})")
        if variant.name in sweeps:
            raise ValueError(f"--sweep names {variant.name!r} twice")
        sweeps[variant.name] = (option, values)
    return sweeps


def sweep_variants(base: Variant, option: str, values: Sequence[Any]) -> list[str]:
    """The variant names of a sweep: ``base`` itself for its own value, a point otherwise."""
    names = []
    for v in values:
        same = option in base.options and base.options[option] == v
        names.append(base.name if same else sweep_point(base, option, v).name)
    return list(dict.fromkeys(names))
