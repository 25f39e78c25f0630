"""The papers' claims, checked against the numbers of one comparison run.

Each check states the claim, gives a verdict and the numbers behind it. Verdicts:

- ``supported``: the numbers agree with the claim (and, with several seeds, the gap that
  decides it is larger than the seeds' standard deviations);
- ``not supported``: the numbers contradict the claim, beyond seed noise when known;
- ``within noise``: the ordering points one way but the gap is not larger than the seeds'
  standard deviation (or, for times with one seed, the machine was busy), so this run
  cannot tell;
- ``not tested``: a method the claim needs was not run or all its runs failed.

With a single seed the standard deviation is unknown; verdicts then follow the ordering and
say that the noise is unknown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from moebal.metrics import max_violation_per_layer
from moebal.report.results import MethodSummary, Stat

SUPPORTED = "supported"
NOT_SUPPORTED = "not supported"
WITHIN_NOISE = "within noise"
NOT_TESTED = "not tested"

# A batch counts as balanced when no expert gets more than 10% above its ideal load.
BALANCED_MAXVIO = 0.1
# "Far lower" MaxVio_global: at most half of the other method's.
FAR_LOWER_RATIO = 0.5
# The BIP paper's time claim: at least 13% less pre-training time than Loss-Controlled.
BIP_TIME_SAVING = 0.13


@dataclass
class ClaimCheck:
    key: str
    source: str  # which paper makes the claim
    claim: str
    verdict: str
    evidence: str


def _fmt(x: float, digits: int = 3) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:.{digits}g}" if abs(x) < 1e-2 else f"{x:.{digits}f}".rstrip("0").rstrip(".")


def _ppl(s: Stat) -> str:
    if not s.ok:
        return "n/a"
    if s.n > 1 and math.isfinite(s.std):
        return f"{s.mean:.2f} ± {s.std:.2f}"
    return f"{s.mean:.2f}"


def gap_beyond_noise(a: Stat, b: Stat) -> Optional[bool]:
    """Is |mean a - mean b| larger than both seed standard deviations? None: unknown (1 seed)."""
    if a.n < 2 or b.n < 2:
        return None
    return abs(a.mean - b.mean) > max(a.std, b.std)


def _by_method(summaries: list[MethodSummary]) -> dict[str, MethodSummary]:
    return {s.method: s for s in summaries if s.ok_runs}


def _first_step_layer_vio(summary: MethodSummary) -> Optional[float]:
    """Worst per-layer MaxVio at the earliest load snapshot (over the ok seeds)."""
    worst = None
    for run in summary.ok_runs:
        snaps = run.get("load_snapshots") or []
        if not snaps:
            continue
        first = min(snaps, key=lambda s: s["step"])
        vio = float(np.max(max_violation_per_layer(np.asarray(first["loads_LE"], float))))
        worst = vio if worst is None else max(worst, vio)
    return worst


def check_bip_balanced(summaries: list[MethodSummary]) -> ClaimCheck:
    claim = "BIP keeps every layer balanced from the first training step to the last."
    by = _by_method(summaries)
    if "bip" not in by:
        return ClaimCheck("bip_balanced", "BIP paper", claim, NOT_TESTED, "BIP was not run (or all its runs failed).")
    bip = by["bip"]
    first = bip.stat("max_vio_batch_first")
    sup_over_seeds = max(r["sup_max_vio"] for r in bip.ok_runs if r.get("sup_max_vio") is not None) \
        if any(r.get("sup_max_vio") is not None for r in bip.ok_runs) else float("nan")
    avg = bip.stat("avg_max_vio")
    parts = [
        f"BIP's MaxVio_batch at the first step is {_fmt(first.mean)}",
        f"its SupMaxVio (worst step) is {_fmt(sup_over_seeds)} and AvgMaxVio {_fmt(avg.mean)}",
    ]
    if "none" in by:
        parts.append(
            f"plain top-k starts at {_fmt(by['none'].stat('max_vio_batch_first').mean)}"
        )
    layer_first = _first_step_layer_vio(bip)
    if layer_first is not None:
        parts.append(f"the worst single layer at the first snapshot has MaxVio {_fmt(layer_first)}")
    evidence = "; ".join(parts) + f" (balanced: MaxVio ≤ {BALANCED_MAXVIO})."
    balanced_first = first.mean <= BALANCED_MAXVIO and (
        layer_first is None or layer_first <= BALANCED_MAXVIO
    )
    balanced_always = math.isfinite(sup_over_seeds) and sup_over_seeds <= BALANCED_MAXVIO
    if balanced_first and balanced_always:
        verdict = SUPPORTED
    else:
        verdict = NOT_SUPPORTED
        if balanced_first:
            evidence += " Balanced at the first step, but not at every step."
        elif balanced_always:
            evidence += " Balanced on average over layers, but not in every layer at the start."
        else:
            evidence += " Not balanced at the first step."
    return ClaimCheck("bip_balanced", "BIP paper", claim, verdict, evidence)


def check_lowest_ppl(summaries: list[MethodSummary], method: str = "bip") -> ClaimCheck:
    claim = (
        "BIP reaches the lowest validation perplexity (against Loss-Controlled and "
        "Loss-Free; here against every method run)."
    )
    by = _by_method(summaries)
    ranked = sorted(
        (s for s in by.values() if s.stat("val_ppl").ok),
        key=lambda s: s.stat("val_ppl").mean,
    )
    if method not in by or len(ranked) < 2:
        return ClaimCheck("lowest_ppl", "BIP paper", claim, NOT_TESTED, "BIP and at least one other method must finish.")
    ranking = ", ".join(f"{s.label} {_ppl(s.stat('val_ppl'))}" for s in ranked)
    target = by[method].stat("val_ppl")
    best = ranked[0]
    if best.method == method:
        rival = ranked[1]
        gap = rival.stat("val_ppl").mean - target.mean
        beyond = gap_beyond_noise(target, rival.stat("val_ppl"))
        evidence = f"Ranking (val PPL): {ranking}. BIP is lowest, {gap:.2f} below {rival.label}"
        verdict = SUPPORTED if beyond in (True, None) else WITHIN_NOISE
    else:
        gap = target.mean - best.stat("val_ppl").mean
        beyond = gap_beyond_noise(target, best.stat("val_ppl"))
        evidence = f"Ranking (val PPL): {ranking}. {best.label} is lowest; BIP is {gap:.2f} above it"
        verdict = NOT_SUPPORTED if beyond in (True, None) else WITHIN_NOISE
    if beyond is None:
        evidence += "; one seed, so the seed noise is unknown."
    elif beyond:
        evidence += "; the gap is larger than the seeds' standard deviations."
    else:
        evidence += "; the gap is not larger than the seeds' standard deviations."
    return ClaimCheck("lowest_ppl", "BIP paper", claim, verdict, evidence)


def check_loss_free(summaries: list[MethodSummary]) -> ClaimCheck:
    claim = (
        "Loss-Free balancing reaches a better perplexity than the auxiliary loss at a far "
        "lower MaxVio_global (paper, 1B model: PPL 9.50 vs 9.56, MaxVio_global 0.04 vs 0.72)."
    )
    by = _by_method(summaries)
    if "loss_free" not in by or "aux_loss" not in by:
        return ClaimCheck("loss_free", "Loss-Free paper", claim, NOT_TESTED, "Loss-Free and aux loss must both finish.")
    lf, aux = by["loss_free"], by["aux_loss"]
    p_lf, p_aux = lf.stat("val_ppl"), aux.stat("val_ppl")
    g_lf, g_aux = lf.stat("max_vio_global"), aux.stat("max_vio_global")
    better_ppl = p_lf.mean < p_aux.mean
    beyond = gap_beyond_noise(p_lf, p_aux)
    far_lower = g_lf.mean <= FAR_LOWER_RATIO * g_aux.mean
    evidence = (
        f"Val PPL: Loss-Free {_ppl(p_lf)} vs aux loss {_ppl(p_aux)}; MaxVio_global: "
        f"Loss-Free {_fmt(g_lf.mean)} vs aux loss {_fmt(g_aux.mean)} "
        f"(ratio {_fmt(g_lf.mean / g_aux.mean if g_aux.mean > 0 else float('inf'))}; "
        f"'far lower' means ≤ {FAR_LOWER_RATIO})."
    )
    noise = {None: " One seed: the PPL noise is unknown.",
             True: " The PPL gap is larger than the seeds' standard deviations.",
             False: " The PPL gap is not larger than the seeds' standard deviations."}[beyond]
    evidence += noise
    if not far_lower:
        verdict = NOT_SUPPORTED
        evidence += " Here MaxVio_global is not far lower"
        evidence += ("." if beyond is False else
                     (", and the perplexity is not better." if not better_ppl else
                      ", though the perplexity is better."))
    elif beyond is False:
        verdict = WITHIN_NOISE
        evidence += " MaxVio_global is far lower, but the perplexities are indistinguishable."
    elif better_ppl:
        verdict = SUPPORTED
    else:
        verdict = NOT_SUPPORTED
        evidence += " Here MaxVio_global is far lower, but the perplexity is not better."
    return ClaimCheck("loss_free", "Loss-Free paper", claim, verdict, evidence)


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


def check_bip_time(summaries: list[MethodSummary], environment: Optional[dict] = None) -> ClaimCheck:
    claim = "BIP needs at least 13% less pre-training time than Loss-Controlled (aux loss)."
    by = _by_method(summaries)
    if "bip" not in by or "aux_loss" not in by:
        return ClaimCheck("bip_time", "BIP paper", claim, NOT_TESTED, "BIP and aux loss must both finish.")
    t_bip, t_aux = by["bip"].stat("train_seconds"), by["aux_loss"].stat("train_seconds")
    saving = 1.0 - t_bip.mean / t_aux.mean
    beyond = gap_beyond_noise(t_bip, t_aux)
    evidence = (
        f"Same number of steps: BIP {t_bip.mean:.1f} s vs aux loss {t_aux.mean:.1f} s of "
        f"training ({saving * 100:+.1f}% saved)"
    )
    evidence += {None: "; one seed, so the timing noise is unknown.",
                 True: "; the gap is larger than the seeds' standard deviations.",
                 False: "; the gap is not larger than the seeds' standard deviations."}[beyond]
    evidence += (
        " On one device the time measures mostly the router's own cost; the paper's saving "
        "comes from balanced experts on its hardware, which a dropless single-device run "
        "rewards little. Timings taken on a shared machine are noisy."
    )
    busy = machine_was_busy(environment)
    if beyond is False or (busy and beyond is None):
        verdict = WITHIN_NOISE
    else:
        verdict = SUPPORTED if saving >= BIP_TIME_SAVING else NOT_SUPPORTED
    if busy:
        evidence += " " + busy
    return ClaimCheck("bip_time", "BIP paper", claim, verdict, evidence)


def check_claims(summaries: list[MethodSummary], environment: Optional[dict] = None) -> list[ClaimCheck]:
    """Every claim's check; ``environment`` (results.json's) tells whether timings are usable."""
    return [
        check_bip_balanced(summaries),
        check_lowest_ppl(summaries),
        check_loss_free(summaries),
        check_bip_time(summaries, environment),
    ]
