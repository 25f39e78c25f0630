"""The papers' claims, checked against the numbers of one comparison run.

Each check states the claim, names the variants it compares, gives one of four verdicts
and the numbers behind it (paired differences over the shared seeds, their 95% interval,
the number of pairs and the minimum detectable effect, :mod:`moebal.report.stats`):

- ``supported``: the interval of the paired difference lies on the claim's side of zero
  (for "every layer at every step": every seed stays balanced);
- ``contradicted``: it lies on the other side (a seed left balance);
- ``inconclusive``: one seed (the seed noise is unknown), or the interval spans zero;
- ``not testable here``: the paper's effect is smaller than the effect this run could
  detect (its MDE), the claim needs hardware this run did not have (the time claim on one
  device, or timings taken while other processes shared the GPU or the CPUs), or the run
  lacks a method or a number the claim needs.

With one seed no claim is ever supported or contradicted. An interval that excludes zero
decides even when the paper's effect is below the MDE: the run then saw a larger effect
than the paper's, which it can tell from noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from moebal.metrics import max_violation_per_layer
from moebal.report.results import MethodSummary
from moebal.report.stats import Paired, format_paired, paired_difference, scaled_difference

SUPPORTED = "supported"
CONTRADICTED = "contradicted"
INCONCLUSIVE = "inconclusive"
NOT_TESTABLE = "not testable here"
VERDICTS = (SUPPORTED, CONTRADICTED, INCONCLUSIVE, NOT_TESTABLE)

# A batch counts as balanced when no expert gets more than 10% above its ideal load.
BALANCED_MAXVIO = 0.1
# "Far lower" MaxVio_global: at most half of the other method's.
FAR_LOWER_RATIO = 0.5
# The BIP paper's time claim: at least 13% less pre-training time than Loss-Controlled.
BIP_TIME_SAVING = 0.13
# The Loss-Free paper's 1B model (Loss-Free, aux loss at alpha 1e-3).
LOSS_FREE_PAPER_PPL = (9.50, 9.56)
LOSS_FREE_PAPER_MAXVIO_GLOBAL = (0.04, 0.72)
LOSS_FREE_PAPER_ALPHA = 1e-3


@dataclass
class ClaimCheck:
    key: str
    source: str  # which paper makes the claim
    claim: str
    verdict: str
    evidence: str
    variants: tuple[str, ...] = ()  # the methods (variant names) the check compares
    paired: tuple[Paired, ...] = field(default=(), repr=False)


def _fmt(x: Optional[float], digits: int = 4) -> str:
    """A number in ``digits`` significant digits (3 below 1), thousands as integers."""
    if x is None or not math.isfinite(x):
        return "n/a"
    if abs(x) >= 10 ** digits:
        return f"{x:,.0f}"
    return f"{x:.{digits if abs(x) >= 1 else 3}g}"


def _by_method(summaries: list[MethodSummary]) -> dict[str, MethodSummary]:
    return {s.method: s for s in summaries if s.ok_runs}


def pick(by: dict[str, MethodSummary], *names: str) -> Optional[MethodSummary]:
    """The first of ``names`` that has ok runs, else None."""
    return next((by[n] for n in names if n in by), None)


def _uses(*summaries: MethodSummary) -> str:
    return "Compares " + ", ".join(f"`{s.method}` ({s.setting} setting)" for s in summaries) + "."


def judge_lower(p: Paired, paper_effect: Optional[float] = None) -> tuple[str, str]:
    """Verdict and reason for the claim "the true paired difference is below zero".

    ``paper_effect``: the size (> 0, in the difference's units) of the effect the paper
    reports, compared with the run's MDE when the interval spans zero.
    """
    if p.n == 0:
        return NOT_TESTABLE, "No seed finished under both methods."
    if not p.known:
        return INCONCLUSIVE, "One seed: its noise is unknown, so it decides nothing."
    if p.ci_high < 0:
        return SUPPORTED, "The interval lies below zero."
    if p.ci_low > 0:
        return CONTRADICTED, "The interval lies above zero: the opposite holds here."
    if paper_effect is not None and math.isfinite(p.mde) and paper_effect < p.mde:
        return NOT_TESTABLE, (f"The interval spans zero, and the paper's effect "
                              f"({_fmt(paper_effect)}) is below this run's minimum detectable "
                              f"effect ({_fmt(p.mde)}): it could not have shown it.")
    return INCONCLUSIVE, "The interval spans zero."


def _seed_noise_note(p: Paired, scale: float, what: str) -> str:
    if not p.known or not math.isfinite(scale) or scale == 0:
        return ""
    return f" The MDE is {_fmt(100 * p.mde / scale, 2)}% of {what}."


# ------------------------------------------------------------------ Loss-Free paper
def _setting_notes(lf: MethodSummary, aux: MethodSummary) -> str:
    """Where this run's Loss-Free or aux loss differs from the paper's setting."""
    text = ""
    alpha = aux.options.get("aux_loss_coeff")
    if alpha is not None and not math.isclose(float(alpha), LOSS_FREE_PAPER_ALPHA):
        text += (f" This run's aux loss has α = {alpha:g}, not the paper's baseline α = "
                 f"{LOSS_FREE_PAPER_ALPHA:g}.")
    score = lf.options.get("score_function")
    if score is not None and score != "sigmoid":
        text += f" This run's Loss-Free uses {score} scores; the paper's used sigmoid."
    return text


def check_loss_free_ppl(summaries: list[MethodSummary]) -> ClaimCheck:
    lf_paper, aux_paper = LOSS_FREE_PAPER_PPL
    rel = (aux_paper - lf_paper) / aux_paper
    claim = (f"Loss-Free balancing reaches a lower perplexity than the auxiliary loss at "
             f"α = 1e-3 (paper, 1B model: {lf_paper:.2f} vs {aux_paper:.2f}, "
             f"{100 * rel:.1f}% lower).")
    by = _by_method(summaries)
    lf, aux = pick(by, "loss_free"), pick(by, "aux_loss")
    if lf is None or aux is None:
        return ClaimCheck("loss_free_ppl", "Loss-Free paper", claim, NOT_TESTABLE,
                          "Loss-Free and aux loss must both finish.")
    p = paired_difference(lf.by_seed("val_ppl"), aux.by_seed("val_ppl"))
    verdict, why = judge_lower(p, rel * p.mean_b if p.n else None)
    evidence = (f"{_uses(lf, aux)} Val PPL Loss-Free {_fmt(p.mean_a)} vs aux loss "
                f"{_fmt(p.mean_b)}; paired "
                f"difference Loss-Free − aux loss: {format_paired(p)}. The paper's "
                f"{100 * rel:.1f}% would be {_fmt(rel * p.mean_b)} here."
                + _seed_noise_note(p, p.mean_b, "the aux loss's PPL") + " " + why
                + _setting_notes(lf, aux))
    return ClaimCheck("loss_free_ppl", "Loss-Free paper", claim, verdict, evidence,
                      (lf.method, aux.method), (p,))


def check_loss_free_balance(summaries: list[MethodSummary]) -> ClaimCheck:
    lf_paper, aux_paper = LOSS_FREE_PAPER_MAXVIO_GLOBAL
    claim = (f"Loss-Free balancing holds a far lower MaxVio_global (held-out balance) than the "
             f"auxiliary loss at α = 1e-3 (paper, 1B model: {lf_paper} vs {aux_paper}); here "
             f"'far lower' means at most {FAR_LOWER_RATIO:g}× the aux loss's.")
    by = _by_method(summaries)
    lf, aux = pick(by, "loss_free"), pick(by, "aux_loss")
    if lf is None or aux is None:
        return ClaimCheck("loss_free_balance", "Loss-Free paper", claim, NOT_TESTABLE,
                          "Loss-Free and aux loss must both finish.")
    a, b = lf.by_seed("max_vio_global"), aux.by_seed("max_vio_global")
    p = scaled_difference(a, b, FAR_LOWER_RATIO)
    # the paper's margin on the same scale: (0.04 - 0.5 * 0.72) / 0.72 of the aux value
    paper_margin = (FAR_LOWER_RATIO * aux_paper - lf_paper) / aux_paper
    verdict, why = judge_lower(p, paper_margin * p.mean_b if p.n else None)
    ratio = p.mean_a / p.mean_b if p.n and p.mean_b > 0 else float("nan")
    evidence = (f"{_uses(lf, aux)} MaxVio_global Loss-Free {_fmt(p.mean_a)} vs aux loss "
                f"{_fmt(p.mean_b)} "
                f"(ratio {_fmt(ratio)}); paired Loss-Free − {FAR_LOWER_RATIO:g}×aux loss: "
                f"{format_paired(p)}.")
    lf_layers, aux_layers = lf.stat("max_vio_global_layers"), aux.stat("max_vio_global_layers")
    if lf_layers.ok and aux_layers.ok:
        evidence += (f" Worst layer: {_fmt(lf_layers.mean)} vs {_fmt(aux_layers.mean)}.")
    evidence += " " + why + _setting_notes(lf, aux)
    return ClaimCheck("loss_free_balance", "Loss-Free paper", claim, verdict, evidence,
                      (lf.method, aux.method), (p,))


# ------------------------------------------------------------------ BIP paper
def _bip(by: dict[str, MethodSummary]) -> Optional[MethodSummary]:
    return pick(by, "bip_paper", "bip")


def _in_batch_note(bip: MethodSummary, summaries: list[MethodSummary]) -> str:
    if not bip.in_batch:
        return ""
    held = [s for s in summaries if s.ok_runs and s.stat("max_vio_global").ok
            and s.setting != "sweep"]
    held.sort(key=lambda s: s.stat("max_vio_global").mean)
    rank = next((i + 1 for i, s in enumerate(held) if s is bip), None)
    text = (f" `{bip.method}` routes each batch with prices computed from that same batch "
            "(in-batch), so its training MaxVio_batch is an in-batch optimisation; on "
            f"held-out text its MaxVio_global is {_fmt(bip.stat('max_vio_global').mean)}")
    if rank is not None:
        text += f", rank {rank} of {len(held)} methods"
    return text + "."


def _layer_lower_bound(run: dict) -> Optional[float]:
    """A lower bound on a run's worst per-layer MaxVio_batch when it was not recorded:
    the layer-averaged SupMaxVio and the worst layer of its load snapshots."""
    values = [run["sup_max_vio"]] if run.get("sup_max_vio") is not None else []
    for snap in run.get("load_snapshots") or []:
        loads = np.asarray(snap["loads_LE"], dtype=float)
        values.append(float(np.max(max_violation_per_layer(loads))))
    return max(values) if values else None


def check_bip_balanced(summaries: list[MethodSummary]) -> ClaimCheck:
    claim = ("BIP keeps every expert balanced in every MoE layer from the first training step "
             f"to the last (here: MaxVio ≤ {BALANCED_MAXVIO} in every layer at every step).")
    by = _by_method(summaries)
    bip = _bip(by)
    if bip is None:
        return ClaimCheck("bip_balanced", "BIP paper", claim, NOT_TESTABLE,
                          "BIP was not run (or all its runs failed).")
    worst = {r["seed"]: r.get("sup_max_vio_layers") for r in bip.ok_runs
             if r.get("sup_max_vio_layers") is not None}
    others = [s for s in by.values() if s.balancer == "bip" and s is not bip
              and s.stat("sup_max_vio_layers").ok]
    evidence = f"Checks `{bip.method}` ({bip.setting} setting). "
    if worst:
        top = max(worst.values())
        evidence += (f"Worst per-layer MaxVio_batch over all steps and layers: {_fmt(top)} "
                     f"(max over {len(worst)} seed{'s' if len(worst) > 1 else ''}; per seed "
                     + ", ".join(f"{_fmt(v)}" for _, v in sorted(worst.items())) + ").")
        if len(worst) < 2:
            verdict = INCONCLUSIVE
            evidence += " One seed decides nothing."
        elif top <= BALANCED_MAXVIO:
            verdict = SUPPORTED
        else:
            verdict = CONTRADICTED
    else:
        bounds = [b for b in (_layer_lower_bound(r) for r in bip.ok_runs) if b is not None]
        bound = max(bounds) if bounds else None
        evidence += ("This run did not record the per-layer MaxVio at every step; its "
                     f"lower bound (layer-averaged SupMaxVio, worst layer of the load snapshots) "
                     f"is {_fmt(bound)}.")
        if bound is not None and bound > BALANCED_MAXVIO and len(bounds) >= 2:
            verdict = CONTRADICTED
        elif bound is not None and bound > BALANCED_MAXVIO:
            verdict = INCONCLUSIVE
            evidence += " One seed decides nothing."
        else:
            verdict = NOT_TESTABLE
    first = bip.stat("max_vio_batch_first")
    evidence += f" Its MaxVio_batch at the first step: {_fmt(first.mean)}"
    if "none" in by:
        evidence += f" (plain top-k: {_fmt(by['none'].stat('max_vio_batch_first').mean)})"
    evidence += "."
    if others:
        evidence += " Other BIP variants: " + ", ".join(
            f"`{s.method}` {_fmt(max(v for v in s.by_seed('sup_max_vio_layers').values() if v is not None))}"
            for s in others) + "."
    evidence += _in_batch_note(bip, summaries)
    return ClaimCheck("bip_balanced", "BIP paper", claim, verdict, evidence, (bip.method,))


def check_lowest_ppl(summaries: list[MethodSummary]) -> ClaimCheck:
    claim = ("BIP reaches the lowest validation perplexity (against Loss-Controlled and "
             "Loss-Free; here against every other method run at its own setting).")
    by = _by_method(summaries)
    bip = _bip(by)
    rivals = [s for s in by.values() if s.balancer != "bip" and s.setting != "sweep"
              and s.stat("val_ppl").ok]
    if bip is None or not bip.stat("val_ppl").ok or not rivals:
        return ClaimCheck("lowest_ppl", "BIP paper", claim, NOT_TESTABLE,
                          "BIP and at least one other method must finish.")
    pairs = [(r, paired_difference(bip.by_seed("val_ppl"), r.by_seed("val_ppl"))) for r in rivals]
    lines = [f"vs {r.label}: {format_paired(p)}" for r, p in pairs]
    worse = [r.label for r, p in pairs if p.sign > 0]
    undecided = [r.label for r, p in pairs if p.sign == 0]
    if worse:
        verdict, why = CONTRADICTED, f"BIP's perplexity is higher than {', '.join(worse)}'s beyond the interval."
    elif not undecided:
        verdict, why = SUPPORTED, "Every interval lies below zero."
    elif all(not p.known for _, p in pairs):
        verdict, why = INCONCLUSIVE, "One seed: its noise is unknown, so it decides nothing."
    else:
        verdict, why = INCONCLUSIVE, f"The interval spans zero against {', '.join(undecided)}."
    evidence = (f"`{bip.method}` ({bip.setting} setting), val PPL {_fmt(bip.stat('val_ppl').mean)}; "
                f"paired difference BIP − rival: " + "; ".join(lines) + ". " + why)
    return ClaimCheck("lowest_ppl", "BIP paper", claim, verdict, evidence,
                      (bip.method,) + tuple(r.method for r in rivals), tuple(p for _, p in pairs))


def machine_was_busy(environment: Optional[dict]) -> Optional[str]:
    """A sentence when the recorded load average exceeded the CPU count, else None."""
    env = environment or {}
    cpus = env.get("cpu_count")
    loads = [env.get(k) for k in ("load_average_at_start", "load_average_at_last_update")]
    loads = [x for x in loads if isinstance(x, (int, float))]
    if not cpus or not loads or max(loads) <= cpus:
        return None
    return (f"The machine was shared: load average up to {max(loads):g} on {cpus} CPU cores "
            "while this ran, so its wall times are not comparable between methods.")


def timing_withheld(environment: Optional[dict]) -> Optional[str]:
    """Why this run's timings cannot carry a verdict (other GPU processes, a busy CPU), else None."""
    others = (environment or {}).get("gpu_other_processes") or []
    if others:
        return (f"Other processes used the GPU while this ran ({len(others)} found), so every "
                "timing verdict is withheld.")
    return machine_was_busy(environment)


def _sim_note(a: MethodSummary, b: MethodSummary) -> str:
    ep, lp = a.stat("sim_standard_ep_ms"), a.stat("sim_lp_ms")
    if not (ep.ok and b.stat("sim_standard_ep_ms").ok):
        return ""
    text = (f" Replayed in the MicroMoE setting (`moebal simulate`), the MoE layer takes "
            f"{_fmt(ep.mean)} ms vs {_fmt(b.stat('sim_standard_ep_ms').mean)} ms with standard EP")
    if lp.ok and b.stat("sim_lp_ms").ok:
        text += f", {_fmt(lp.mean)} ms vs {_fmt(b.stat('sim_lp_ms').mean)} ms with LP scheduling"
    return text + " (a simulation, not a measured time)."


def check_bip_time(summaries: list[MethodSummary], environment: Optional[dict] = None,
                   world_size: int = 1) -> ClaimCheck:
    claim = (f"BIP needs at least {round(100 * BIP_TIME_SAVING)}% less pre-training time than "
             "Loss-Controlled.")
    by = _by_method(summaries)
    bip, lc = _bip(by), pick(by, "seq_aux_loss", "aux_loss")
    if bip is None or lc is None:
        return ClaimCheck("bip_time", "BIP paper", claim, NOT_TESTABLE,
                          "BIP and an auxiliary loss must both finish.")
    p = scaled_difference(bip.by_seed("train_seconds"), lc.by_seed("train_seconds"),
                          1.0 - BIP_TIME_SAVING)
    saving = 1.0 - p.mean_a / p.mean_b if p.n and p.mean_b > 0 else float("nan")
    less = f"{_fmt(100 * abs(saving), 2)}% {'less' if saving >= 0 else 'more'}"
    evidence = (f"{_uses(bip, lc)} Training time BIP {_fmt(p.mean_a)} s vs Loss-Controlled "
                f"{_fmt(p.mean_b)} s ({less}); paired BIP − "
                f"{1 - BIP_TIME_SAVING:g}×Loss-Controlled: {format_paired(p, unit=' s')}.")
    withheld = timing_withheld(environment)
    if withheld:
        verdict, why = NOT_TESTABLE, withheld
    elif world_size < 2:
        verdict, why = NOT_TESTABLE, (
            "The saving comes from balanced expert loads on several devices, where the most "
            "loaded one sets the pace; this run trained each model on one device, whose "
            "dropless MoE layer computes the same token-slots however they are spread.")
    else:
        verdict, why = judge_lower(p)
    evidence += " " + why + _sim_note(bip, lc)
    return ClaimCheck("bip_time", "BIP paper", claim, verdict, evidence,
                      (bip.method, lc.method), (p,))


def check_claims(summaries: list[MethodSummary], environment: Optional[dict] = None,
                 world_size: int = 1) -> list[ClaimCheck]:
    """Every claim's check. ``environment`` (results.json's) tells whether timings are
    usable; ``world_size`` is the number of devices each run trained on."""
    return [
        check_loss_free_ppl(summaries),
        check_loss_free_balance(summaries),
        check_bip_balanced(summaries),
        check_lowest_ppl(summaries),
        check_bip_time(summaries, environment, world_size),
    ]
