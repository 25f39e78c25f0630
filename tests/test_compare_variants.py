"""What `moebal compare` trains: variants at stated settings, sweeps, parallel runs, and
the per-run measurements the report's balance, optimal-gap and cluster columns need."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moebal.metrics import optimal_score_gap
from moebal.report import load_results
from moebal.report.compare import make_plan, run_comparison
from moebal.report.simcolumn import simulate_run
from moebal.report.variants import (
    DEFAULT_VARIANTS,
    VARIANTS,
    get_variant,
    parse_sweep,
    routes_in_batch,
    sweep_variants,
)
from moebal.routing import Router, RouterConfig
from moebal.trace import RoutingTrace, save_trace
from tests.test_compare import corpus_cache, text_file  # noqa: F401  (fixtures)


def _plan(text_file, balancers, **kw):
    return make_plan(balancers=balancers, preset="micro", steps=kw.pop("steps", 6),
                     data=text_file, overrides=["eval_every=3", "eval_batches=1"],
                     device="cpu", command="test", **kw)


# --------------------------------------------------------------------------- settings
def test_each_claim_is_checked_at_its_papers_setting():
    assert VARIANTS["aux_loss"].options["aux_loss_coeff"] == 1e-3  # Loss-Free's baseline
    assert VARIANTS["seq_aux_loss"].options["aux_loss_coeff"] == 0.1  # BIP's Loss-Controlled
    lf = VARIANTS["loss_free"].options
    assert (lf["score_function"], lf["norm_topk_prob"], lf["bias_update_rate"]) == (
        "sigmoid", True, 1e-3)
    paper = VARIANTS["bip_paper"].options
    assert paper["bip_warmup_iters"] == paper["bip_iters"] and paper["bip_pin_q"] is False
    assert VARIANTS["bip_causal"].options["bip_order"] == "causal"
    assert {"bip", "bip_paper", "bip_causal", "loss_free"} <= set(DEFAULT_VARIANTS)


def test_in_batch_marks_the_methods_that_route_a_batch_with_its_own_prices():
    assert routes_in_batch("bip", {"bip_order": "paper"})
    assert not routes_in_batch("bip", {"bip_order": "causal"})
    assert routes_in_batch("sinkhorn", {}) and routes_in_batch("optimal", {})
    assert not any(routes_in_batch(b, {}) for b in ("none", "aux_loss", "loss_free", "quantile"))


def test_the_plan_builds_each_variant_with_its_balancer_and_options(text_file):
    plan = _plan(text_file, "loss_free,bip_causal")
    lf = plan.model_config("loss_free")
    assert lf.balancer == "loss_free"
    assert lf.router_options["score_function"] == "sigmoid"
    assert plan.model_config("bip_causal").balancer == "bip"
    assert plan.model_config("bip_causal").router_options["bip_order"] == "causal"
    assert plan.train.trace and plan.train.optimal_gap


# --------------------------------------------------------------------------- sweeps
def test_a_sweep_adds_its_points_and_reuses_the_paper_setting(text_file):
    plan = _plan(text_file, "none,aux_loss", sweep=["aux_loss.aux_loss_coeff=0.001,0.01"])
    assert plan.balancers == ["none", "aux_loss", "aux_loss@aux_loss_coeff=0.01"]
    assert plan.balancer_options["aux_loss@aux_loss_coeff=0.01"]["aux_loss_coeff"] == 0.01
    # sweep points train after every other run, so a partial comparison still compares
    assert plan.runs()[-1] == ("aux_loss@aux_loss_coeff=0.01", 0)
    assert parse_sweep(["loss_free"]) == {"loss_free": ("bias_update_rate", [1e-4, 1e-3, 1e-2])}
    assert sweep_variants(VARIANTS["bip"], "bip_iters", [2, 4]) == ["bip@bip_iters=2", "bip"]
    assert get_variant("bip@bip_iters=2").options["bip_iters"] == 2


@pytest.mark.parametrize("items, match", [
    (["nope"], "unknown balancer or variant 'nope'"),
    (["none"], "has no default grid"),
    (["aux_loss.aux_loss_coeff="], "names no values"),
    (["aux_loss.aux_loss_coeff"], "names an option but no values"),
    (["aux_loss", "aux_loss"], "twice"),
])
def test_bad_sweeps_are_refused_naming_the_value(items, match):
    with pytest.raises(ValueError, match=match):
        parse_sweep(items)


def test_a_sweep_of_a_variant_not_compared_is_refused(text_file):
    with pytest.raises(ValueError, match="'loss_free' is not among the compared"):
        _plan(text_file, "none", sweep=["loss_free"])


# --------------------------------------------------------------------------- jobs
def test_parallel_runs_give_the_numbers_of_one_at_a_time(tmp_path, text_file):
    plan = _plan(text_file, "none,bip_paper")
    one = run_comparison(plan, tmp_path / "one", progress=False, report=False)
    two = run_comparison(plan, tmp_path / "two", progress=False, report=False, jobs=2)
    key = ("method", "seed", "val_loss", "max_vio_global", "sup_max_vio_layers", "optimal_gap")
    assert [[r[k] for k in key] for r in one["runs"]] == [[r[k] for k in key] for r in two["runs"]]
    assert load_results(tmp_path / "two")["config"]["variants"]["bip_paper"]["in_batch"]
    with pytest.raises(ValueError, match="jobs must be a positive int, got 0"):
        run_comparison(plan, tmp_path / "three", jobs=0)


def test_each_run_records_held_out_per_layer_balance_the_optimal_gap_and_the_cluster(
        tmp_path, text_file):
    results = run_comparison(_plan(text_file, "none"), tmp_path / "c", progress=False,
                             report=False)
    row = results["runs"][0]
    assert row["balancer"] == "none"
    assert row["sup_max_vio_layers"] >= row["sup_max_vio"]  # max over layers >= their mean
    assert row["max_vio_global_layers"] >= row["max_vio_global"]
    assert row["optimal_gap_samples"] == 3 * 2  # steps 1, 3, 6 x 2 layers
    assert row["optimal_gap"] <= 1e-6  # plain top-k takes at least the balanced optimum
    assert row["sim"]["gpus"] == 32 and row["sim"]["lp_ms"] > 0


# --------------------------------------------------------------------------- the gap
def test_the_gap_is_zero_for_the_optimum_and_negative_for_unbalanced_top_k():
    torch.manual_seed(0)
    logits = torch.randn(64, 4) * 2 + torch.tensor([2.0, 0.0, 0.0, 0.0])
    opt = Router(RouterConfig(num_experts=4, top_k=2, balancer="optimal")).train()(logits)
    top = Router(RouterConfig(num_experts=4, top_k=2)).train()(logits)
    g_opt = optimal_score_gap(opt.scores_TE, opt.indices_TK)
    g_top = optimal_score_gap(top.scores_TE, top.indices_TK)
    assert g_opt["gap"] == pytest.approx(0.0, abs=1e-6)
    assert g_top["gap"] < 0 and g_top["score"] == pytest.approx(g_top["topk"])
    assert g_top["price_of_balance"] == pytest.approx((g_top["topk"] - g_top["optimal"])
                                                      / g_top["topk"])
    # any balanced routing scores at most the optimum: a gap >= 0
    balanced_TK = torch.arange(128).view(64, 2) % 4
    assert optimal_score_gap(top.scores_TE, balanced_TK)["gap"] >= 0


# --------------------------------------------------------------------------- the cluster
def test_the_cluster_column_replays_a_trace_with_standard_ep_and_lp_scheduling(tmp_path):
    rng = np.random.default_rng(0)
    p = np.array([0.4, 0.2, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05])
    counts = rng.multinomial(256, p, size=(40, 2, 8)).astype(np.int32)  # [P, L, R, E]
    save_trace(tmp_path / "trace.npz", RoutingTrace(counts, top_k=2))
    sim = simulate_run(tmp_path / "trace.npz", steps=40)
    assert (sim["gpus"], sim["ep"], sim["sched_group"]) == (32, 4, 8)
    assert sim["micro_batches"] == 40 * 8 // 32
    assert sim["lp_ms"] < sim["standard_ep_ms"]  # skewed loads: scheduling helps
    assert sim["lp_speedup"] == pytest.approx(sim["standard_ep_ms"] / sim["lp_ms"])
    assert simulate_run(tmp_path / "missing.npz") is None
    json.dumps(sim)


def test_the_cluster_column_is_deterministic_and_report_simulate_recomputes_it(
        tmp_path, text_file, capsys):
    from moebal.cli import main

    out = tmp_path / "c"
    first = run_comparison(_plan(text_file, "none"), out, progress=False, report=False)
    assert simulate_run(out / first["runs"][0]["run_dir"] / "trace.npz") == first["runs"][0]["sim"]
    saved = json.loads((out / "results.json").read_text())
    saved["runs"][0]["sim"] = None
    (out / "results.json").write_text(json.dumps(saved))
    assert main(["report", str(out), "--simulate"]) == 0
    assert "simulated 1 runs' traces" in capsys.readouterr().out
    assert load_results(out)["runs"][0]["sim"] == first["runs"][0]["sim"]
    (out / first["runs"][0]["run_dir"] / "trace.npz").unlink()
    assert main(["report", str(out), "--simulate"]) == 2
    assert "has a routing trace" in capsys.readouterr().err
