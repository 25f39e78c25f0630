"""The plan of a balancer comparison: which balancers, seeds and settings, checked up front.

:func:`make_plan` validates every input (balancer names, their options, the preset and its
overrides, the data settings) before anything is trained; :func:`experiment_config` is the
``config`` block of results.json, and :func:`config_differences` / :func:`run_fingerprint`
say whether an existing comparison or run is this one.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
from typing import Any, Iterable, Optional, Sequence, Union

from moebal.data import DataConfig
from moebal.fileio import json_clean
from moebal.report.variants import (
    DEFAULT_VARIANTS,
    Variant,
    get_variant,
    parse_sweep,
    sweep_variants,
    variant_record,
)
from moebal.routing import balancer_defaults, router_option_names
from moebal.train import RESUME_FREE_FIELDS, apply_overrides, get_preset
from moebal.train.context import resolve_device
from moebal.train.presets import parse_value

DEFAULT_BALANCERS = DEFAULT_VARIANTS
DEFAULT_PRESET = "tiny"
DEFAULT_OUT = "runs/compare"

# Each variant's options and why it is compared at them: moebal.report.variants.VARIANTS.
# The other options a balancer reads keep its config's defaults
# (moebal.routing.balancer_defaults) and are recorded too.

# CPU threads per training run unless --set threads=N says otherwise. On the shared 2-core
# machine the tiny preset ran 19x slower per step with two threads than with one (15 steps:
# 176 s vs 9.2 s, load average 12; two threads with OMP_WAIT_POLICY=PASSIVE: 17.9 s): two
# OpenMP threads contending with other work stall each other. One thread is the robust
# default; --set threads=0 leaves torch's own choice.
CPU_THREADS = 1


# --------------------------------------------------------------------------- the plan
def parse_balancers(spec: Union[str, Sequence[str]]) -> list[str]:
    """Variant names from "a,b,c" (or a list); ValueError for unknown or repeated names."""
    names = [n.strip() for n in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"no balancer named in {spec!r}")
    for n in names:
        get_variant(n)  # ValueError naming an unknown one
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"balancer(s) named twice: {', '.join(repeated)}")
    return names


def parse_balancer_options(items: Iterable[str], balancers: Sequence[str],
                           router_options: Optional[dict] = None) -> dict[str, dict]:
    """Each variant's options: {variant: {option: value}}.

    Precedence: ``VARIANT.OPTION=VALUE`` strings (``items``), then the options every run
    shares (``router_options``, from the preset and ``--set router.X=...``), then the
    variant's own (:data:`moebal.report.variants.VARIANTS`), then the defaults of the
    options the balancer reads (its typed config's, ``moebal.routing.balancer_defaults``).
    """
    known = set(router_option_names()) - {"num_experts", "top_k"}
    options = {}
    for m in balancers:
        variant = get_variant(m)
        options[m] = {**balancer_defaults(variant.balancer), **variant.options}
        for name in options[m]:
            if router_options and name in router_options:
                options[m][name] = router_options[name]
    for item in items:
        key, sep, raw = item.partition("=")
        method, dot, option = key.strip().partition(".")
        if not sep or not dot:
            raise ValueError(f"balancer option {item!r} is not of the form METHOD.OPTION=VALUE")
        if method not in options:
            raise ValueError(
                f"balancer option {item!r} names {method!r}, which is not compared "
                f"(balancers: {', '.join(balancers)})"
            )
        if option not in known:
            raise ValueError(f"unknown router option {option!r} in {item!r}; known: {sorted(known)}")
        options[method][option] = parse_value(raw)
    return options


@dataclasses.dataclass
class Plan:
    """Everything one comparison trains: per method a ModelConfig, per seed a TrainConfig."""

    preset: str
    balancers: list[str]  # variant names, in report order
    seeds: list[int]
    model: Any  # ModelConfig, balancer "none", before vocabulary resolution
    train: Any  # TrainConfig, seed 0
    balancer_options: dict[str, dict]
    data: Any  # DataConfig
    device: str  # resolved: "cpu" or "cuda"
    command: str
    sweeps: dict[str, tuple[str, list[Any]]] = dataclasses.field(default_factory=dict)

    def variant(self, name: str) -> Variant:
        return get_variant(name)

    def model_config(self, method: str):
        opts = {**self.model.router_options, **self.balancer_options.get(method, {})}
        return dataclasses.replace(self.model, balancer=self.variant(method).balancer,
                                   router_options=opts)

    def train_config(self, seed: int):
        return dataclasses.replace(self.train, seed=seed, device=self.device)

    def runs(self) -> list[tuple[str, int]]:
        """Seed-major order: every method on seed 0 first, so a partial run compares; the
        points of ``--sweep`` after all the others."""
        swept = {n for n in self.balancers if self.variant(n).setting == "sweep"}
        main = [m for m in self.balancers if m not in swept]
        return ([(m, s) for s in self.seeds for m in main]
                + [(m, s) for s in self.seeds for m in self.balancers if m in swept])


def make_plan(
    *,
    balancers: Union[str, Sequence[str]] = DEFAULT_BALANCERS,
    seeds: int = 1,
    preset: str = DEFAULT_PRESET,
    steps: Optional[int] = None,
    overrides: Sequence[str] = (),
    balancer_options: Sequence[str] = (),
    sweep: Sequence[str] = (),
    data: Optional[str] = None,
    tokenizer: Optional[str] = None,
    text_field: str = "text",
    vocab_size: Optional[int] = None,
    cache_dir: Optional[str] = None,
    device: str = "auto",
    command: str = "",
) -> Plan:
    """Check every input and build the plan; ValueError before anything is trained."""
    names = parse_balancers(balancers)
    sweeps = parse_sweep(sweep)
    for base, (option, values) in sweeps.items():
        if base not in names:
            raise ValueError(f"--sweep {base!r}: {base!r} is not among the compared balancers "
                             f"({', '.join(names)})")
        if option not in router_option_names():
            raise ValueError(f"--sweep {base!r}: unknown router option {option!r}")
        names += [n for n in sweep_variants(get_variant(base), option, values) if n not in names]
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise ValueError(f"seeds must be a positive int, got {seeds!r}")
    model_cfg, train_cfg = get_preset(preset)
    model_cfg, train_cfg = apply_overrides(model_cfg, train_cfg, list(overrides))
    if model_cfg.balancer != "none":
        raise ValueError("the balancer is what compare varies: use --balancers, not --set balancer=...")
    if steps is not None:
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        train_cfg = dataclasses.replace(train_cfg, steps=steps, warmup=min(train_cfg.warmup, steps))
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    resolved = resolve_device(device).type
    user = {o.split("=", 1)[0].strip().replace("-", "_") for o in overrides}  # set by --set
    if resolved == "cpu" and "threads" not in user:
        train_cfg = dataclasses.replace(train_cfg, threads=CPU_THREADS)
    # every run records what the report's gap-to-optimal and cluster columns are made of,
    # unless --set says otherwise
    extra = {k: True for k in ("trace", "optimal_gap") if k not in user}
    if "trace" in extra and train_cfg.global_batch % train_cfg.trace_shards:
        extra["trace_shards"] = math.gcd(train_cfg.global_batch, train_cfg.trace_shards)
    train_cfg = dataclasses.replace(train_cfg, **extra)
    options = parse_balancer_options(balancer_options, names, model_cfg.router_options)
    # building every method's config validates its router options now, not mid-comparison
    plan = Plan(preset, names, list(range(seeds)), model_cfg, train_cfg, options,
                DataConfig(path=data, tokenizer=tokenizer, text_field=text_field,
                           vocab_size=vocab_size if vocab_size is not None else model_cfg.vocab_size,
                           cache_dir=cache_dir),
                resolved, command, sweeps)
    for m in names:
        plan.model_config(m).validate()
    plan.train_config(0).validate()
    plan.data.validate()
    return plan


# --------------------------------------------------------------------------- identity
def experiment_config(plan: Plan, corpus) -> dict[str, Any]:
    """The ``config`` block of results.json."""
    model = plan.model.to_dict()  # what every method shares; their options are separate
    model["vocab_size"] = corpus.vocab_size
    model.pop("balancer")
    train = plan.train_config(0).to_dict()
    train.pop("seed")
    cfg = plan.train_config(0)
    return {
        "preset": plan.preset,
        "steps": cfg.steps,
        "seeds": list(plan.seeds),
        "balancers": list(plan.balancers),
        "balancer_options": copy.deepcopy(plan.balancer_options),
        "variants": {m: variant_record(plan.variant(m), plan.balancer_options[m])
                     for m in plan.balancers},
        "sweep": {base: {"option": option, "values": list(values), "paper": base,
                         "variants": sweep_variants(get_variant(base), option, values)}
                  for base, (option, values) in plan.sweeps.items()},
        "model": model,
        "train": train,
        "device": plan.device,
        "data": describe_data(plan, corpus),
        "data_identity": corpus.identity(),
        "tokens_per_step": cfg.global_batch * plan.model.seq_len,
        "world_size": 1,  # every run trains on one device
    }


def describe_data(plan: Plan, corpus) -> str:
    src = plan.data.path or "the default corpus (complete Shakespeare + Wikipedia summaries)"
    return (
        f"{src}; {len(corpus.train):,} training and {len(corpus.val):,} validation tokens, "
        f"vocabulary {corpus.vocab_size:,}"
    )


# Fields that may differ between an interrupted comparison and the one resuming it: of the
# config block, these keys; of its training config, those a resumed run may change.
FREE_KEYS = ("seeds", "balancers", "balancer_options", "variants", "sweep", "data",
             "params_total", "params_active", "world_size")
FREE_TRAIN = RESUME_FREE_FIELDS


def config_differences(old: dict, new: dict) -> list[str]:
    """What makes ``new`` another experiment than ``old`` (empty: the same one).

    Seeds and balancers may differ (a resumed comparison may add some); the options of a
    balancer present in both may not; neither may the model, training, data or device.
    """
    problems = []
    for key in sorted(set(old) | set(new)):
        if key in FREE_KEYS or key == "train":
            continue
        if old.get(key) != new.get(key):
            problems.append(f"{key}: {old.get(key)!r} != {new.get(key)!r}")
    old_t, new_t = old.get("train", {}), new.get("train", {})
    for key in sorted(set(old_t) | set(new_t)):
        if key not in FREE_TRAIN and old_t.get(key) != new_t.get(key):
            problems.append(f"train.{key}: {old_t.get(key)!r} != {new_t.get(key)!r}")
    for m in set(old.get("balancer_options", {})) & set(new.get("balancer_options", {})):
        if old["balancer_options"][m] != new["balancer_options"][m]:
            problems.append(
                f"{m} options: {old['balancer_options'][m]!r} != {new['balancer_options'][m]!r}"
            )
    return problems


def run_fingerprint(config: dict, method: str) -> str:
    """What a finished run must share with the comparison that reuses it: everything in
    ``config`` that :func:`config_differences` compares, and this method's options."""
    key = {k: v for k, v in config.items() if k not in FREE_KEYS and k != "train"}
    key["train"] = {k: v for k, v in config.get("train", {}).items() if k not in FREE_TRAIN}
    key["options"] = config.get("balancer_options", {}).get(method, {})
    variant = config.get("variants", {}).get(method)
    if variant is not None:
        key["balancer"] = variant["balancer"]
    text = json.dumps(json_clean(key), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
