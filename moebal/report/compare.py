"""Train the same MoE model under each balancer and compare them with the papers' metrics.

Same model, data, seeds and number of steps for every method; only the balancer changes.
Writes a run folder (--out, default runs/compare):

    results.json            every number of the comparison (see moebal.report.results)
    report.md, report.html  the papers' table, their claims checked, the plots
    plots/*.png
    runs/<method>/seed<k>/  one training run each: config.json, metrics.jsonl,
                            result.json, run.json (its row in results.json), and
                            checkpoint.pt while it trains (kept with --keep-checkpoints)

An interrupted comparison continues with --resume: finished runs are read back, an
unfinished one continues from its last checkpoint, the others start. A run whose loss
stops being finite is stopped and marked failed with its step; the others go on.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as _dt
import math
import os
import platform
import shlex
import sys
import traceback
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

from moebal.fileio import atomic_write_json, json_clean
from moebal.report.results import RESULTS_FILE, SCHEMA, load_results

DEFAULT_BALANCERS = ("none", "aux_loss", "seq_aux_loss", "loss_free", "bip", "quantile")
DEFAULT_PRESET = "tiny"
DEFAULT_OUT = "runs/compare"

# The coefficients each balancer is compared with (flat option names); the other options
# the balancer reads keep its config's defaults (moebal.routing.balancer_defaults) and are
# recorded too.
#  aux_loss      alpha = 1e-2: Switch Transformer's value and Megatron-core's usual setting.
#  seq_aux_loss  alpha = 1e-2 as well, so that it differs from aux_loss only in scope (f and
#                P per sequence instead of per batch). DeepSeek-V3's 1e-4 is the strength of
#                a complement to its bias balancer, too weak to balance on its own.
#  global_aux_loss  as aux_loss.
#  loss_free     u = 1e-3 with the sign update: the Loss-Free paper's best rate.
#  bip           4 dual iterations per batch (the paper does not give T_iter), prices from
#                the batch being routed, as the paper describes.
#  quantile      one quantile step per batch, no EMA (Megatron-LM's default).
BALANCER_DEFAULTS: dict[str, dict[str, Any]] = {
    "aux_loss": {"aux_loss_coeff": 1e-2},
    "seq_aux_loss": {"aux_loss_coeff": 1e-2},
    "global_aux_loss": {"aux_loss_coeff": 1e-2},
    "loss_free": {"bias_update_rate": 1e-3, "bias_update": "sign"},
    "bip": {"bip_iters": 4, "bip_order": "paper"},
    "quantile": {"quantile_ema": 0.0},
}

# CPU threads per training run unless --set threads=N says otherwise. On the shared 2-core
# machine the tiny preset ran 19x slower per step with two threads than with one (15 steps:
# 176 s vs 9.2 s, load average 12; two threads with OMP_WAIT_POLICY=PASSIVE: 17.9 s): two
# OpenMP threads contending with other work stall each other. One thread is the robust
# default; --set threads=0 leaves torch's own choice.
CPU_THREADS = 1

RUN_RECORD = "run.json"
MAX_SERIES_POINTS = 4000  # per-step series longer than this are thinned (every k-th step)
SNAPSHOT_FRACTIONS = (0.0, 0.1, 0.5, 1.0)  # load snapshots: first step, 10%, half, last


# --------------------------------------------------------------------------- the plan
def parse_balancers(spec: Union[str, Sequence[str]]) -> list[str]:
    """Balancer names from "a,b,c" (or a list); ValueError for unknown or repeated names."""
    from moebal.routing import BALANCERS

    names = [n.strip() for n in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"no balancer named in {spec!r}")
    unknown = [n for n in names if n not in BALANCERS]
    if unknown:
        raise ValueError(
            f"unknown balancer(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(BALANCERS))}"
        )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"balancer(s) named twice: {', '.join(repeated)}")
    return names


def parse_balancer_options(items: Iterable[str], balancers: Sequence[str],
                           router_options: Optional[dict] = None) -> dict[str, dict]:
    """Each balancer's options: {method: {option: value}}.

    Precedence: ``METHOD.OPTION=VALUE`` strings (``items``), then the options every run
    shares (``router_options``, from the preset and ``--set router.X=...``), then
    :data:`BALANCER_DEFAULTS`, then the defaults of the options the balancer reads (its
    typed config's, ``moebal.routing.balancer_defaults``).
    """
    from moebal.routing import balancer_defaults, router_option_names
    from moebal.train.presets import _parse_value

    known = set(router_option_names()) - {"num_experts", "top_k"}
    options = {}
    for m in balancers:
        options[m] = {**balancer_defaults(m), **BALANCER_DEFAULTS.get(m, {})}
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
        options[method][option] = _parse_value(raw)
    return options


@dataclasses.dataclass
class Plan:
    """Everything one comparison trains: per method a ModelConfig, per seed a TrainConfig."""

    preset: str
    balancers: list[str]
    seeds: list[int]
    model: Any  # ModelConfig, balancer "none", before vocabulary resolution
    train: Any  # TrainConfig, seed 0
    balancer_options: dict[str, dict]
    data: Any  # DataConfig
    device: str  # resolved: "cpu" or "cuda"
    command: str

    def model_config(self, method: str):
        opts = {**self.model.router_options, **self.balancer_options.get(method, {})}
        return dataclasses.replace(self.model, balancer=method, router_options=opts)

    def train_config(self, seed: int):
        return dataclasses.replace(self.train, seed=seed, device=self.device)

    def runs(self) -> list[tuple[str, int]]:
        """Seed-major order: every method on seed 0 first, so a partial run compares."""
        return [(m, s) for s in self.seeds for m in self.balancers]


def make_plan(
    *,
    balancers: Union[str, Sequence[str]] = DEFAULT_BALANCERS,
    seeds: int = 1,
    preset: str = DEFAULT_PRESET,
    steps: Optional[int] = None,
    overrides: Sequence[str] = (),
    balancer_options: Sequence[str] = (),
    data: Optional[str] = None,
    tokenizer: Optional[str] = None,
    text_field: str = "text",
    vocab_size: Optional[int] = None,
    cache_dir: Optional[str] = None,
    device: str = "auto",
    command: str = "",
) -> Plan:
    """Check every input and build the plan; ValueError before anything is trained."""
    from moebal.data import DataConfig
    from moebal.train import apply_overrides, get_preset
    from moebal.train.trainer import resolve_device

    names = parse_balancers(balancers)
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
    user_threads = any(o.split("=", 1)[0].strip().replace("-", "_") == "threads" for o in overrides)
    if resolved == "cpu" and not user_threads:
        train_cfg = dataclasses.replace(train_cfg, threads=CPU_THREADS)
    options = parse_balancer_options(balancer_options, names, model_cfg.router_options)
    # building every method's config validates its router options now, not mid-comparison
    plan = Plan(preset, names, list(range(seeds)), model_cfg, train_cfg, options,
                DataConfig(path=data, tokenizer=tokenizer, text_field=text_field,
                           vocab_size=vocab_size if vocab_size is not None else model_cfg.vocab_size,
                           cache_dir=cache_dir),
                resolved, command)
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
        "model": model,
        "train": train,
        "device": plan.device,
        "data": describe_data(plan, corpus),
        "data_identity": {
            "key": corpus.key,
            "vocab_size": corpus.vocab_size,
            "train_tokens": int(len(corpus.train)),
            "val_tokens": int(len(corpus.val)),
        },
        "tokens_per_step": cfg.global_batch * plan.model.seq_len,
    }


def describe_data(plan: Plan, corpus) -> str:
    src = plan.data.path or "the default corpus (complete Shakespeare + Wikipedia summaries)"
    return (
        f"{src}; {len(corpus.train):,} training and {len(corpus.val):,} validation tokens, "
        f"vocabulary {corpus.vocab_size:,}"
    )


# Fields that may differ between an interrupted comparison and the one resuming it.
_FREE_KEYS = ("seeds", "balancers", "balancer_options", "data", "params_total", "params_active")
_FREE_TRAIN = ("log_every", "checkpoint_every", "router_timing", "threads")


def config_differences(old: dict, new: dict) -> list[str]:
    """What makes ``new`` another experiment than ``old`` (empty: the same one).

    Seeds and balancers may differ (a resumed comparison may add some); the options of a
    balancer present in both may not; neither may the model, training, data or device.
    """
    problems = []
    for key in sorted(set(old) | set(new)):
        if key in _FREE_KEYS or key == "train":
            continue
        if old.get(key) != new.get(key):
            problems.append(f"{key}: {old.get(key)!r} != {new.get(key)!r}")
    old_t, new_t = old.get("train", {}), new.get("train", {})
    for key in sorted(set(old_t) | set(new_t)):
        if key not in _FREE_TRAIN and old_t.get(key) != new_t.get(key):
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
    import hashlib
    import json

    key = {k: v for k, v in config.items() if k not in _FREE_KEYS and k != "train"}
    key["train"] = {k: v for k, v in config.get("train", {}).items() if k not in _FREE_TRAIN}
    key["options"] = config.get("balancer_options", {}).get(method, {})
    text = json.dumps(json_clean(key), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_out_dir(out: Path, config: dict, resume: bool, force: bool) -> Optional[dict]:
    """Decide what to do with an existing output folder; returns its results to resume from.

    A folder with another experiment's results is refused unless ``force``; one with this
    experiment's results needs ``resume`` (continue) or ``force`` (start over).
    """
    if resume and force:
        raise ValueError("--resume and --force contradict each other: pick one")
    file = out / RESULTS_FILE
    if not file.exists():
        if (out / "runs").is_dir() and any((out / "runs").iterdir()) and not (resume or force):
            raise ValueError(
                f"{str(out)!r} holds training runs but no {RESULTS_FILE}; pass --resume to "
                "reuse them or --force to start over"
            )
        return None
    try:
        old = load_results(out)
    except ValueError as exc:
        if force:
            return None
        raise ValueError(f"{str(out)!r} holds an unreadable {RESULTS_FILE} ({exc}); pass --force "
                         "to overwrite it or choose another --out") from None
    if force:
        return None
    problems = config_differences(old["config"], config)
    if problems:
        raise ValueError(
            f"{str(out)!r} holds another experiment's results ({'; '.join(problems)}); "
            "choose another --out, or pass --force to overwrite them"
        )
    if not resume:
        raise ValueError(
            f"{str(out)!r} already holds this comparison ({len(old['runs'])} runs recorded); "
            "pass --resume to continue it or --force to start over"
        )
    return old


# --------------------------------------------------------------------------- one run
def _finite(x: Any) -> Optional[float]:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _thin(n: int, limit: int = MAX_SERIES_POINTS) -> list[int]:
    """Indices of at most ``limit`` of n points: every k-th, always the first and last."""
    if n <= limit:
        return list(range(n))
    k = math.ceil(n / limit)
    idx = list(range(0, n, k))
    if idx[-1] != n - 1:
        idx.append(n - 1)
    return idx


def run_record(method: str, seed: int, run_dir: Path, out: Path, result=None,
               failure: Optional[dict] = None) -> dict[str, Any]:
    """One row of results.json from a run folder's metrics.jsonl (and its TrainResult)."""
    from moebal.train import read_metrics

    metrics_file = run_dir / "metrics.jsonl"
    records = read_metrics(metrics_file) if metrics_file.is_file() else []
    train_recs = [r for r in records if r.get("type") == "train"]
    eval_recs = [r for r in records if r.get("type") == "eval"]
    idx = _thin(len(train_recs))
    series = {
        "step": [int(train_recs[i]["step"]) for i in idx],
        "loss": [_finite(train_recs[i].get("loss")) for i in idx],
        "max_vio_batch": [_finite(train_recs[i].get("max_vio_batch")) for i in idx],
        "eval_step": [int(r["step"]) for r in eval_recs],
        "val_ppl": [_finite(r.get("val_ppl")) for r in eval_recs],
        "eval_max_vio_global": [_finite(r.get("max_vio_global")) for r in eval_recs],
    }
    with_loads = [r for r in train_recs if r.get("loads")]
    snapshots = []
    if with_loads:
        picks = sorted({min(len(with_loads) - 1, round(f * (len(with_loads) - 1)))
                        for f in SNAPSHOT_FRACTIONS})
        snapshots = [{"step": int(with_loads[i]["step"]), "loads_LE": with_loads[i]["loads"]}
                     for i in picks]

    row: dict[str, Any] = {
        "method": method,
        "seed": seed,
        "status": "failed" if failure else "ok",
        "failure": failure,
        "run_dir": os.path.relpath(run_dir, out),
    }
    if result is not None:
        row.update(
            steps=int(result.steps),
            tokens=int(result.tokens),
            final_val_loss=_finite(result.val_loss),
            final_val_ppl=_finite(result.val_ppl),
            max_vio_global=_finite(result.max_vio_global),
            avg_max_vio=_finite(result.avg_max_vio),
            sup_max_vio=_finite(result.sup_max_vio),
            max_vio_batch_first=_finite(result.max_vio_batch_first),
            max_vio_batch_last=_finite(result.max_vio_batch_last),
            train_time_s=_finite(result.train_seconds),
            wall_time_s=_finite(result.wall_seconds),
            tokens_per_s=_finite(result.tokens_per_s),
            router_time_share=_finite(result.router_time_share),
            params=int(result.params),
            active_params=int(result.active_params),
        )
    else:  # the run stopped with an error: what its log holds
        vio = [r["max_vio_batch"] for r in train_recs if _finite(r.get("max_vio_batch")) is not None]
        row.update(
            steps=int(train_recs[-1]["step"]) if train_recs else 0,
            tokens=int(train_recs[-1].get("tokens", 0)) if train_recs else 0,
            final_val_loss=_finite(eval_recs[-1].get("val_loss")) if eval_recs else None,
            final_val_ppl=_finite(eval_recs[-1].get("val_ppl")) if eval_recs else None,
            max_vio_global=_finite(eval_recs[-1].get("max_vio_global")) if eval_recs else None,
            avg_max_vio=sum(vio) / len(vio) if vio else None,
            sup_max_vio=max(vio) if vio else None,
            max_vio_batch_first=vio[0] if vio else None,
            max_vio_batch_last=vio[-1] if vio else None,
        )
    row["series"] = series
    row["load_snapshots"] = snapshots
    return json_clean(row)


def _last_logged_step(run_dir: Path) -> int:
    from moebal.train import read_metrics

    file = run_dir / "metrics.jsonl"
    if not file.is_file():
        return 0
    steps = [int(r["step"]) for r in read_metrics(file) if r.get("type") == "train"]
    return max(steps, default=0)


def _divergence_reason(run_dir: Path) -> str:
    from moebal.train import read_metrics

    file = run_dir / "metrics.jsonl"
    records = read_metrics(file) if file.is_file() else []
    diverged = [r for r in records if r.get("type") == "diverged"]
    loss = diverged[-1].get("loss") if diverged else None
    return f"training loss is {loss if loss is not None else 'NaN or infinite'} (diverged)"


def train_one(plan: Plan, method: str, seed: int, corpus, out: Path, *, resume: bool,
              keep_checkpoints: bool, progress: bool, fingerprint: str = "") -> dict[str, Any]:
    """Train (or continue) one method x seed and return its results.json row.

    A non-finite loss (the trainer stops there) or an error raised while training marks
    the run failed, with the step, instead of stopping the comparison.
    """
    from moebal.train import train

    run_dir = out / "runs" / method / f"seed{seed}"
    record_file = run_dir / RUN_RECORD
    failure = None
    result = None
    try:
        result = train(
            plan.model_config(method), plan.train_config(seed), run_dir, data=corpus,
            preset=plan.preset, resume=resume, force=not resume, progress=progress,
        )
    except (ValueError, RuntimeError, FloatingPointError, ArithmeticError) as exc:
        step = _last_logged_step(run_dir) + 1
        failure = {"step": step, "reason": f"{type(exc).__name__}: {exc}"}
        print(f"moebal compare: {method} seed {seed} failed at step {step}: {exc}",
              file=sys.stderr)
        traceback.print_exc(limit=3, file=sys.stderr)
    if result is not None and result.diverged_step is not None:
        failure = {"step": int(result.diverged_step), "reason": _divergence_reason(run_dir)}
        print(f"moebal compare: {method} seed {seed} diverged at step {result.diverged_step}; "
              "going on with the others", file=sys.stderr)
    row = run_record(method, seed, run_dir, out, result, failure)
    atomic_write_json(record_file, {**row, "fingerprint": fingerprint})
    if not keep_checkpoints:
        (run_dir / "checkpoint.pt").unlink(missing_ok=True)
    return row


def _recorded(run_dir: Path) -> Optional[dict]:
    """The row a finished run wrote to its run.json (with its fingerprint), else None."""
    import json

    file = run_dir / RUN_RECORD
    if not file.is_file():
        return None
    try:
        row = json.loads(file.read_text())
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None


# --------------------------------------------------------------------------- the comparison
def environment(device: str, threads: int = 0) -> dict[str, Any]:
    import torch

    env = {
        "moebal": __import__("moebal").__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "device": device,
        "torch_threads": threads or torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    if device == "cuda" and torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name(0)
    if hasattr(os, "getloadavg"):  # other work on the machine makes timings noisy
        env["load_average_at_start"] = round(os.getloadavg()[0], 2)
    return env


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def run_comparison(
    plan: Plan,
    out: Union[str, Path],
    *,
    resume: bool = False,
    force: bool = False,
    keep_checkpoints: bool = False,
    progress: bool = True,
    report: bool = True,
) -> dict[str, Any]:
    """Train every method x seed of ``plan`` into ``out`` and return the results dict.

    results.json is rewritten after every run, so an interruption loses at most the run in
    progress; the report is written at the end (and, for what finished, on interruption).
    """
    from moebal.train import resolve_corpus

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a folder")
    corpus = resolve_corpus(plan.data, progress=progress)
    config = experiment_config(plan, corpus)
    previous = check_out_dir(out, config, resume, force)
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "schema": SCHEMA,
        "command": plan.command,
        "created_at": previous.get("created_at") if previous else _now(),
        "updated_at": _now(),
        "config": config,
        "environment": environment(plan.device, plan.train.threads),
        "runs": [],
    }

    def save() -> None:
        results["updated_at"] = _now()
        if hasattr(os, "getloadavg"):
            results["environment"]["load_average_at_last_update"] = round(os.getloadavg()[0], 2)
        order = {key: i for i, key in enumerate(plan.runs())}
        results["runs"].sort(key=lambda r: order.get((r["method"], r["seed"]), len(order)))
        atomic_write_json(out / RESULTS_FILE, results)

    save()  # the experiment's config is on disk before the first step: --resume can check it
    todo = plan.runs()
    try:
        for i, (method, seed) in enumerate(todo, 1):
            run_dir = out / "runs" / method / f"seed{seed}"
            fingerprint = run_fingerprint(config, method)
            recorded = _recorded(run_dir)
            mine = recorded is not None and (
                recorded.get("method"), recorded.get("seed"), recorded.get("fingerprint")
            ) == (method, seed, fingerprint)
            row = None
            if resume and mine:
                row = {k: v for k, v in recorded.items() if k != "fingerprint"}
            if row is not None:
                if progress:
                    print(f"[{i}/{len(todo)}] {method} seed {seed}: finished earlier "
                          f"({row['status']}), reused", file=sys.stderr)
            else:
                if progress:
                    opts = plan.balancer_options[method]
                    print(f"[{i}/{len(todo)}] {method} seed {seed}"
                          + (f" ({', '.join(f'{k}={v}' for k, v in opts.items())})" if opts else ""),
                          file=sys.stderr)
                # a folder finished by another experiment (left by --force) starts afresh;
                # one without a record is this experiment's interrupted run: continue it
                row = train_one(plan, method, seed, corpus, out,
                                resume=resume and recorded is None,
                                keep_checkpoints=keep_checkpoints, progress=progress,
                                fingerprint=fingerprint)
            if "params" in row:
                config.setdefault("params_total", row["params"])
                config.setdefault("params_active", row["active_params"])
            results["runs"].append(row)
            save()
    finally:
        if report and results["runs"]:
            from moebal.report import write_report

            save()
            write_report(out, results)
    return results


# --------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--balancers", default=",".join(DEFAULT_BALANCERS),
                        help="comma-separated balancers to compare (default: %(default)s; "
                             "also global_aux_loss, sinkhorn, optimal)")
    parser.add_argument("--seeds", type=int, default=1, metavar="N",
                        help="train each balancer with seeds 0..N-1 (default: %(default)s)")
    parser.add_argument("--preset", default=DEFAULT_PRESET,
                        help="model + training preset: micro, tiny, small, paper-16e, "
                             "paper-64e (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=None, metavar="N",
                        help="optimizer steps per run (default: the preset's)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="run folder (default: %(default)s)")
    parser.add_argument("--data", default=None,
                        help="training text: a file, a folder of .txt files or a .jsonl "
                             "(default: the built-in corpus)")
    parser.add_argument("--tokenizer", default=None,
                        help="a tokenizer.json to use instead of training BPE")
    parser.add_argument("--text-field", default="text", help="JSONL text field (default: text)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="BPE vocabulary to train (default: the preset's)")
    parser.add_argument("--cache-dir", default=None,
                        help="tokenized-corpus cache (default: $MOEBAL_CACHE or ~/.cache/moebal)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: cuda when available (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="change a model/training setting of the preset for every run, "
                             "e.g. --set batch_size=8 --set router.score_function=sigmoid")
    parser.add_argument("--balancer-option", dest="balancer_options", action="append",
                        default=[], metavar="METHOD.OPTION=VALUE",
                        help="change one balancer's coefficient, e.g. "
                             "--balancer-option aux_loss.aux_loss_coeff=0.001")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted comparison in --out")
    parser.add_argument("--force", action="store_true",
                        help="start over in --out, replacing its results")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep each finished run's checkpoint.pt (default: deleted once "
                             "the run is recorded)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def command_line(args: argparse.Namespace) -> str:
    """The full command that reproduces this comparison (every setting spelled out)."""
    parts = ["moebal", "compare", "--preset", args.preset, "--balancers", args.balancers,
             "--seeds", str(args.seeds)]
    if args.steps is not None:
        parts += ["--steps", str(args.steps)]
    parts += ["--device", args.device, "--out", args.out]
    for flag, value in (("--data", args.data), ("--tokenizer", args.tokenizer)):
        if value is not None:
            parts += [flag, value]
    if args.text_field != "text":
        parts += ["--text-field", args.text_field]
    if args.vocab_size is not None:
        parts += ["--vocab-size", str(args.vocab_size)]
    for item in args.overrides:
        parts += ["--set", item]
    for item in args.balancer_options:
        parts += ["--balancer-option", item]
    if args.keep_checkpoints:
        parts.append("--keep-checkpoints")
    return shlex.join(parts)


def run(args: argparse.Namespace) -> int:
    args.balancers = ",".join(parse_balancers(args.balancers))
    plan = make_plan(
        balancers=args.balancers,
        seeds=args.seeds,
        preset=args.preset,
        steps=args.steps,
        overrides=args.overrides,
        balancer_options=args.balancer_options,
        data=args.data,
        tokenizer=args.tokenizer,
        text_field=args.text_field,
        vocab_size=args.vocab_size,
        cache_dir=args.cache_dir,
        device=args.device,
        command=command_line(args),
    )
    results = run_comparison(
        plan, args.out, resume=args.resume, force=args.force,
        keep_checkpoints=args.keep_checkpoints, progress=not args.no_progress,
    )
    failed = [r for r in results["runs"] if r["status"] == "failed"]
    out = Path(args.out)
    print(f"report: {out / 'report.md'} and {out / 'report.html'}")
    for r in failed:
        print(f"failed: {r['method']} seed {r['seed']} at step {r['failure']['step']}: "
              f"{r['failure']['reason']}")
    return 0
