"""The papers' claims: the four verdicts, read from the report written for stored results.

Each test builds a small results.json, runs the report generator on it and reads the
verdicts back from report.md, so what is checked is what a reader sees.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from moebal.report import SCHEMA, check_claims, summarize, validate_results, write_report
from moebal.report.claims import (
    CONTRADICTED,
    INCONCLUSIVE,
    NOT_TESTABLE,
    SUPPORTED,
    VERDICTS,
)

CLAIM_KEYS = ("loss_free_ppl", "loss_free_balance", "bip_balanced", "lowest_ppl", "bip_time")

VARIANTS = {
    "none": {"balancer": "none", "options": {}, "setting": "paper", "in_batch": False},
    "aux_loss": {"balancer": "aux_loss", "options": {"aux_loss_coeff": 0.001},
                 "setting": "paper", "in_batch": False},
    "seq_aux_loss": {"balancer": "seq_aux_loss", "options": {"aux_loss_coeff": 0.1},
                     "setting": "paper", "in_batch": False},
    "loss_free": {"balancer": "loss_free", "setting": "paper", "in_batch": False,
                  "options": {"bias_update_rate": 0.001, "score_function": "sigmoid"}},
    "bip": {"balancer": "bip", "setting": "moebal", "in_batch": True,
            "options": {"bip_iters": 4, "bip_warmup_iters": 32, "bip_pin_q": True}},
    "bip_paper": {"balancer": "bip", "setting": "paper", "in_batch": True, "label": "BIP (paper)",
                  "options": {"bip_iters": 4, "bip_warmup_iters": 4, "bip_pin_q": False}},
}


def run(method, seed, ppl=100.0, mvg=0.5, time_s=100.0, layers=0.5, **extra):
    row = dict(method=method, seed=seed, status="ok", failure=None, steps=10, val_ppl=ppl,
               max_vio_global=mvg, avg_max_vio=0.5, sup_max_vio=layers * 0.8,
               max_vio_batch_first=0.5, train_seconds=time_s, tokens_per_s=1000.0,
               router_time_share=0.05, sup_max_vio_layers=layers, series={},
               load_snapshots=[], balancer=VARIANTS.get(method, {}).get("balancer", method))
    row.update(extra)
    return row


def seeds(method, values, key="ppl", **extra):
    """One run per seed, ``values[s]`` as the number ``key``."""
    return [run(method, s, **{key: v}, **extra) for s, v in enumerate(values)]


def results(runs, environment=None, **config):
    methods = list(dict.fromkeys(r["method"] for r in runs))
    cfg = dict(preset="micro", steps=10, balancers=methods,
               seeds=sorted({r["seed"] for r in runs}),
               variants={m: VARIANTS[m] for m in methods if m in VARIANTS})
    cfg.update(config)
    return dict(schema=SCHEMA, command="moebal compare", config=cfg,
                environment=environment or {"device": "cuda", "device_count": 1},
                runs=runs)


def report_verdicts(tmp_path, res) -> dict[str, str]:
    """Write the report of ``res`` into tmp_path; the verdict of each claim in report.md."""
    (tmp_path / "results.json").write_text(json.dumps(res))
    write_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    section = md.split("## What this run says about the papers' claims")[1].split("\n\n")[1]
    found = re.findall(r"^- \*\*.+?\*\* \(.+? paper\) — \*\*(.+?)\*\*\.", section, re.M)
    assert len(found) == len(CLAIM_KEYS), section
    return dict(zip(CLAIM_KEYS, found))


# ------------------------------------------------------------------ Loss-Free: perplexity

def test_loss_free_ppl_supported_when_the_interval_lies_below_zero(tmp_path):
    runs = seeds("loss_free", [9.50, 9.52, 9.49]) + seeds("aux_loss", [9.56, 9.58, 9.57])
    assert report_verdicts(tmp_path, results(runs))["loss_free_ppl"] == SUPPORTED


def test_loss_free_ppl_contradicted_when_the_interval_lies_above_zero(tmp_path):
    runs = seeds("loss_free", [9.70, 9.72, 9.69]) + seeds("aux_loss", [9.56, 9.58, 9.57])
    assert report_verdicts(tmp_path, results(runs))["loss_free_ppl"] == CONTRADICTED


def test_loss_free_ppl_inconclusive_when_the_run_could_see_the_effect_but_did_not(tmp_path):
    # differences [0.1, -0.1, 0.05]: sd 0.10, MDE 0.32 < the paper's 0.63% of 100
    runs = seeds("loss_free", [100.1, 99.9, 100.05]) + seeds("aux_loss", [100.0] * 3)
    res = results(runs)
    assert report_verdicts(tmp_path, res)["loss_free_ppl"] == INCONCLUSIVE
    assert "The interval spans zero." in (tmp_path / "report.md").read_text()


def test_loss_free_ppl_not_testable_when_the_paper_effect_is_below_the_mde(tmp_path):
    # differences [3, -3, 1]: sd 3.1, MDE 9.5 > 0.63 (the paper's 0.6% of PPL 100)
    runs = seeds("loss_free", [103.0, 97.0, 101.0]) + seeds("aux_loss", [100.0] * 3)
    assert report_verdicts(tmp_path, results(runs))["loss_free_ppl"] == NOT_TESTABLE
    assert "below this run's minimum detectable effect" in (tmp_path / "report.md").read_text()


# ------------------------------------------------------------------ Loss-Free: balance

def test_loss_free_balance_tests_at_most_half_the_aux_loss(tmp_path):
    aux = seeds("aux_loss", [0.72, 0.70, 0.74], key="mvg")
    far = seeds("loss_free", [0.04, 0.05, 0.03], key="mvg")
    assert report_verdicts(tmp_path, results(far + aux))["loss_free_balance"] == SUPPORTED
    lower_not_far = seeds("loss_free", [0.60, 0.58, 0.62], key="mvg")  # lower, not half
    assert report_verdicts(tmp_path, results(lower_not_far + aux))["loss_free_balance"] == CONTRADICTED


def test_the_paper_baseline_setting_is_named_when_it_differs(tmp_path):
    runs = seeds("loss_free", [9.5, 9.6]) + seeds("aux_loss", [9.6, 9.5])
    res = results(runs)
    res["config"]["variants"]["aux_loss"] = {"balancer": "aux_loss", "setting": "moebal",
                                             "options": {"aux_loss_coeff": 0.01}}
    report_verdicts(tmp_path, res)
    assert "α = 0.01, not the paper's baseline α = 0.001" in (tmp_path / "report.md").read_text()


# ------------------------------------------------------------------ BIP: balanced

def test_bip_balanced_uses_the_worst_layer_of_every_seed(tmp_path):
    ok = seeds("bip_paper", [0.05, 0.08, 0.1], key="layers")
    assert report_verdicts(tmp_path, results(ok))["bip_balanced"] == SUPPORTED
    # layer-averaged SupMaxVio balanced, but one layer of one seed is not
    spike = seeds("bip_paper", [0.05, 0.08, 0.4], key="layers", sup_max_vio=0.05)
    assert report_verdicts(tmp_path, results(spike))["bip_balanced"] == CONTRADICTED


def test_bip_balanced_prefers_the_paper_variant_and_says_it_routes_in_batch(tmp_path):
    runs = seeds("bip", [0.05, 0.05], key="layers") + seeds("bip_paper", [0.5, 0.6], key="layers")
    assert report_verdicts(tmp_path, results(runs))["bip_balanced"] == CONTRADICTED
    md = (tmp_path / "report.md").read_text()
    assert "Checks `bip_paper` (paper setting)" in md
    assert "`bip_paper` routes each batch with prices computed from that same batch" in md


def test_bip_balanced_without_per_layer_numbers(tmp_path):
    # older results: the layer average is a lower bound on the worst layer
    old = [run("bip", s, sup_max_vio=0.05, sup_max_vio_layers=None) for s in range(2)]
    assert report_verdicts(tmp_path, results(old))["bip_balanced"] == NOT_TESTABLE
    high = [run("bip", s, sup_max_vio=0.3, sup_max_vio_layers=None) for s in range(2)]
    assert report_verdicts(tmp_path, results(high))["bip_balanced"] == CONTRADICTED


# ------------------------------------------------------------------ BIP: perplexity

def test_lowest_ppl_paired_against_each_rival(tmp_path):
    bip = seeds("bip_paper", [99.0, 99.5, 99.2])
    lc = seeds("seq_aux_loss", [100.0, 100.4, 100.3])
    lf = seeds("loss_free", [101.0, 101.2, 101.1])
    assert report_verdicts(tmp_path, results(bip + lc + lf))["lowest_ppl"] == SUPPORTED
    tied = seeds("loss_free", [98.0, 101.0, 99.9])
    assert report_verdicts(tmp_path, results(bip + lc + tied))["lowest_ppl"] == INCONCLUSIVE
    better = seeds("loss_free", [98.0, 98.4, 98.1])
    assert report_verdicts(tmp_path, results(bip + lc + better))["lowest_ppl"] == CONTRADICTED
    assert "higher than Loss-Free's" in (tmp_path / "report.md").read_text()


# ------------------------------------------------------------------ BIP: time

def _timed():
    return seeds("bip_paper", [80.0, 81.0, 79.0], key="time_s") + \
        seeds("seq_aux_loss", [100.0, 100.5, 99.5], key="time_s")


def test_time_claim_not_testable_on_one_device(tmp_path):
    assert report_verdicts(tmp_path, results(_timed()))["bip_time"] == NOT_TESTABLE
    assert "trained each model on one device" in (tmp_path / "report.md").read_text()


def test_time_claim_judged_across_devices_and_withheld_beside_other_gpu_processes(tmp_path):
    assert report_verdicts(tmp_path, results(_timed(), world_size=8))["bip_time"] == SUPPORTED
    slow = seeds("bip_paper", [95.0, 96.0, 94.0], key="time_s") + \
        seeds("seq_aux_loss", [100.0, 100.5, 99.5], key="time_s")
    assert report_verdicts(tmp_path, results(slow, world_size=8))["bip_time"] == CONTRADICTED
    busy = {"device": "cuda", "device_count": 8, "gpu_other_processes": [{"pid": 7, "name": "python"}]}
    assert report_verdicts(tmp_path, results(_timed(), busy, world_size=8))["bip_time"] == NOT_TESTABLE
    md = (tmp_path / "report.md").read_text()
    assert "every timing verdict is withheld" in md and "**Timings withheld**" in md


# ------------------------------------------------------------------ one seed, never a verdict

def test_one_seed_never_supports_or_contradicts(tmp_path):
    # numbers that would decide every claim with several seeds
    runs = [run("none", 0, ppl=120.0, mvg=3.0, layers=5.0),
            run("aux_loss", 0, ppl=9.56, mvg=0.72, time_s=100.0),
            run("seq_aux_loss", 0, ppl=110.0, time_s=100.0),
            run("loss_free", 0, ppl=9.0, mvg=0.01),
            run("bip_paper", 0, ppl=5.0, layers=0.01, time_s=10.0)]
    verdicts = report_verdicts(tmp_path, results(runs, world_size=8))
    assert set(verdicts.values()) <= {INCONCLUSIVE, NOT_TESTABLE}
    assert verdicts["loss_free_ppl"] == verdicts["bip_balanced"] == INCONCLUSIVE
    md = (tmp_path / "report.md").read_text()
    assert "not supported" not in md


def test_one_seed_never_decides_whatever_the_numbers():
    rng = np.random.default_rng(0)
    methods = list(VARIANTS)
    for _ in range(200):
        runs = [run(m, 0, ppl=float(rng.uniform(5, 200)), mvg=float(rng.uniform(0, 3)),
                    layers=float(rng.choice([0.0, 0.05, 0.5, 3.0])),
                    time_s=float(rng.uniform(1, 100))) for m in methods if rng.random() < 0.8]
        if not runs:
            continue
        res = validate_results(results(runs, world_size=int(rng.choice([1, 8]))))
        for c in check_claims(summarize(res), res["environment"], res["config"]["world_size"]):
            assert c.verdict in VERDICTS
            assert c.verdict not in (SUPPORTED, CONTRADICTED), (c.key, c.evidence)


def test_missing_methods_are_not_testable():
    res = validate_results(results([run("none", s) for s in range(3)]))
    assert {c.verdict for c in check_claims(summarize(res), res["environment"])} == {NOT_TESTABLE}


@pytest.mark.parametrize("key", CLAIM_KEYS)
def test_every_check_names_its_variants_and_numbers(key):
    runs = (seeds("aux_loss", [9.56, 9.58, 9.57]) + seeds("loss_free", [9.50, 9.52, 9.49])
            + seeds("seq_aux_loss", [9.6, 9.7, 9.65]) + seeds("bip_paper", [9.4, 9.45, 9.41]))
    res = validate_results(results(runs, world_size=8))
    check = {c.key: c for c in check_claims(summarize(res), res["environment"], 8)}[key]
    assert check.variants and all(v in check.evidence for v in check.variants[:1])
    if key != "bip_balanced":
        assert check.paired and "95% CI" in check.evidence and "n=3" in check.evidence
        assert "MDE" in check.evidence
