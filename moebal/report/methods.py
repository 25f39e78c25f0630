"""The methods of a comparison: which balancer each runs, at which setting, and how.

A comparison runs named *variants*: a balancer at one setting (``config.variants`` of
``results.json``, see :mod:`moebal.report.results`). Results written before variants
existed name balancers only; each is then its own variant.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["IN_BATCH_BALANCERS", "METHOD_LABELS", "METHOD_ORDER", "SETTINGS", "Variant",
           "method_label", "ordered_methods", "routes_in_batch", "validate_variants",
           "variants_of"]

SETTINGS = ("paper", "moebal", "baseline", "sweep")
# balancers that route a batch with information computed from that same batch
IN_BATCH_BALANCERS = ("sinkhorn", "optimal")

# canonical order and names of the methods, for tables and plot colours
METHOD_ORDER = (
    "none",
    "aux_loss",
    "seq_aux_loss",
    "global_aux_loss",
    "loss_free",
    "bip",
    "quantile",
    "sinkhorn",
    "optimal",
)
METHOD_LABELS = {
    "none": "None (plain top-k)",
    "aux_loss": "Aux loss",
    "seq_aux_loss": "Seq. aux loss",
    "global_aux_loss": "Global aux loss",
    "loss_free": "Loss-Free",
    "bip": "BIP",
    "quantile": "Quantile",
    "sinkhorn": "Sinkhorn",
    "optimal": "Optimal (exact)",
}


def method_label(method: str) -> str:
    """The display name of a balancer (or of any other method name: the name itself)."""
    return METHOD_LABELS.get(method, method)


def validate_variants(config: dict) -> None:
    """Check the optional ``config.variants`` and ``config.sweep``; raise ValueError."""
    variants = config.get("variants")
    if variants is not None:
        if not isinstance(variants, dict):
            raise ValueError(f"results config.variants must be an object, got {variants!r}")
        for name, v in variants.items():
            if not isinstance(v, dict) or not isinstance(v.get("balancer"), str):
                raise ValueError(f"results config.variants.{name} must be an object with a "
                                 f"'balancer' name, got {v!r}")
            if not isinstance(v.get("options", {}), dict):
                raise ValueError(f"results config.variants.{name}.options must be an object, "
                                 f"got {v.get('options')!r}")
            if v.get("setting", "moebal") not in SETTINGS:
                raise ValueError(f"results config.variants.{name}.setting must be one of "
                                 f"{SETTINGS}, got {v.get('setting')!r}")
    sweep = config.get("sweep")
    if sweep is not None:
        if not isinstance(sweep, dict):
            raise ValueError(f"results config.sweep must be an object, got {sweep!r}")
        for balancer, grid in sweep.items():
            if not isinstance(grid, dict) or not isinstance(grid.get("option"), str) \
                    or not isinstance(grid.get("values"), list):
                raise ValueError(f"results config.sweep.{balancer} must be an object with "
                                 f"'option' and 'values', got {grid!r}")


@dataclass(frozen=True)
class Variant:
    """One method of a comparison: a balancer at a given setting (``config.variants``)."""

    name: str
    balancer: str
    options: dict
    setting: str = "moebal"  # "paper", "moebal", "baseline" or "sweep"
    label: str = ""
    why: str = ""
    in_batch: bool = False


def routes_in_batch(balancer: str, options: dict) -> bool:
    """Does this balancer route a batch with information computed from that same batch?

    BIP in the paper's order (``bip_order`` "paper" or unset), Sinkhorn and the exact
    optimum do; the others route with state from earlier batches only.
    """
    if balancer == "bip":
        return options.get("bip_order", "paper") == "paper"
    return balancer in IN_BATCH_BALANCERS


def variants_of(results: dict) -> dict[str, Variant]:
    """Every method of ``results`` as a :class:`Variant`, by name, in report order.

    Methods that ``config.variants`` does not describe (results written before variants
    existed) are their own variant: the balancer of that name, its ``balancer_options``,
    setting "moebal".
    """
    cfg = results["config"]
    described = cfg.get("variants") or {}
    options = cfg.get("balancer_options") or {}
    out: dict[str, Variant] = {}
    for name in ordered_methods(results):
        v = described.get(name)
        if v is None:
            balancer = next((r.get("balancer") for r in results["runs"]
                             if r["method"] == name and r.get("balancer")), name)
            opts = dict(options.get(name, {}))
            out[name] = Variant(name, balancer, opts, "moebal", method_label(name), "",
                                routes_in_batch(balancer, opts))
            continue
        opts = dict(v.get("options") or {})
        in_batch = v.get("in_batch")
        out[name] = Variant(
            name, v["balancer"], opts, v.get("setting", "moebal"),
            v.get("label") or (method_label(name) if name in METHOD_LABELS else name),
            v.get("why", ""),
            routes_in_batch(v["balancer"], opts) if in_batch is None else bool(in_batch),
        )
    return out


def ordered_methods(results: dict) -> list[str]:
    """Methods in the order of ``config.variants`` (else ``config.balancers``), then any
    others that have runs."""
    cfg = results["config"]
    methods = list(dict.fromkeys(list(cfg.get("variants") or {}) or cfg["balancers"]))
    for run in results["runs"]:
        if run["method"] not in methods:
            methods.append(run["method"])
    return methods


