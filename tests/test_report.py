"""The comparison report: results.json checks, the papers' claims, report files."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from moebal.report import SCHEMA, check_claims, load_results, summarize, validate_results
from moebal.report.claims import NOT_TESTABLE, VERDICTS
from moebal.report.render import Bullets, Heading, Image, Para, Table, to_html, to_markdown

FIXTURE = Path(__file__).parent / "data" / "compare_micro" / "results.json"


def _run(method, seed, ppl, mvg=0.5, first=1.0, sup=1.0, avg=0.5, time_s=10.0, **extra):
    run = dict(
        method=method, seed=seed, status="ok", failure=None, steps=10,
        val_ppl=ppl, val_loss=None, max_vio_global=mvg, avg_max_vio=avg,
        sup_max_vio=sup, max_vio_batch_first=first, max_vio_batch_last=avg,
        train_seconds=time_s, tokens_per_s=1000.0, router_time_share=0.05,
        series={}, load_snapshots=[],
    )
    run.update(extra)
    return run


def _results(runs, balancers=None, seeds=None):
    return validate_results(dict(
        schema=SCHEMA, command="moebal compare", config=dict(
            balancers=balancers or sorted({r["method"] for r in runs}),
            seeds=seeds or sorted({r["seed"] for r in runs}),
        ), runs=runs,
    ))


# ---------------------------------------------------------------- results.json checks


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r.update(schema="other/9"), "schema"),
        (lambda r: r["config"].pop("balancers"), "balancers"),
        (lambda r: r["runs"][0].update(status="maybe"), "status"),
        (lambda r: r["runs"][0].update(status="failed", failure=None), "failure"),
        (lambda r: r["runs"][0].update(val_ppl="low"), "val_ppl"),
        (lambda r: r["runs"].append(copy.deepcopy(r["runs"][0])), "twice"),
        (lambda r: r["runs"][0].update(series={"step": [1, 2], "max_vio_batch": [0.1]}), "max_vio_batch"),
        (lambda r: r["config"].update(variants=["bip"]), "config.variants"),
        (lambda r: r["config"].update(variants={"bip_x": {"options": {}}}), "bip_x"),
        (lambda r: r["config"].update(variants={"b": {"balancer": "bip", "setting": "best"}}), "setting"),
        (lambda r: r["config"].update(sweep={"aux_loss": {"values": [1]}}), "config.sweep.aux_loss"),
        (lambda r: r["runs"][0].update(sim=[1.0]), "sim"),
        (lambda r: r["runs"][0].update(sim={"lp_ms": "fast"}), "sim.lp_ms"),
        (lambda r: r["runs"][0].update(optimal_gap_samples=2.5), "optimal_gap_samples"),
        (lambda r: r["runs"][0].update(sup_max_vio_layers="high"), "sup_max_vio_layers"),
        (lambda r: r.update(environment={"gpu_other_processes": "python"}), "gpu_other_processes"),
    ],
)
def test_bad_results_are_refused_with_the_offending_field(mutate, message):
    good = _results([_run("none", 0, 10.0), _run("bip", 0, 9.0)])
    bad = copy.deepcopy(good)
    mutate(bad)
    with pytest.raises(ValueError, match=message):
        validate_results(bad)


def test_load_results_errors_name_the_path(tmp_path):
    with pytest.raises(ValueError, match="no results.json"):
        load_results(tmp_path)
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_results(tmp_path)


def test_summaries_aggregate_ok_seeds_only():
    runs = [_run("aux_loss", 0, 10.0), _run("aux_loss", 1, 12.0),
            _run("aux_loss", 2, None, status="failed", failure={"step": 5, "reason": "NaN"})]
    (s,) = summarize(_results(runs))
    assert s.stat("val_ppl").n == 2
    assert s.stat("val_ppl").mean == pytest.approx(11.0)
    assert s.stat("val_ppl").std == pytest.approx(2 ** 0.5)
    assert len(s.failed_runs) == 1


# ---------------------------------------------------------------- rendering


def test_markdown_and_html_say_the_same():
    blocks = [
        Heading(1, "Title `x`"),
        Para("a **bold** claim with `code|pipe`"),
        Table(["A", "B"], [["1|2", "**3**"]], "lr"),
        Bullets(["one", "two"]),
        Image("plots/p.png", "a plot", b"\x89PNG fake"),
    ]
    md = to_markdown(blocks)
    assert "| 1\\|2 | **3** |" in md and "|:---|---:|" in md
    assert "![a plot](plots/p.png)" in md
    page = to_html(blocks, "T")
    assert "<strong>bold</strong>" in page and "<code>code|pipe</code>" in page
    assert "data:image/png;base64," in page and "plots/p.png" not in page
    assert "<li>two</li>" in page


# ---------------------------------------------------------------- the stored real run
# tests/data/compare_micro/results.json: `moebal compare --preset micro --balancers
# none,aux_loss,loss_free,bip,quantile --seeds 2` (see tests/data/compare_micro/README.md)


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    shutil.copy(FIXTURE, d / "results.json")
    return d


def test_stored_results_are_a_real_micro_comparison():
    results = load_results(FIXTURE)
    assert results["config"]["preset"] == "micro"
    assert {r["method"] for r in results["runs"]} == {"none", "aux_loss", "loss_free", "bip", "quantile"}
    assert all(r["status"] == "ok" and r["steps"] == results["config"]["steps"] for r in results["runs"])


def test_report_from_stored_results(run_dir, capsys):
    from moebal.cli import main
    from moebal.report.document import build_document

    assert main(["report", str(run_dir)]) == 0
    assert "report.md" in capsys.readouterr().out
    plots = {p.name: p.read_bytes() for p in (run_dir / "plots").iterdir()}
    assert sorted(plots) == ["load_heatmaps.png", "max_vio_batch.png", "router_overhead.png", "val_ppl.png"]
    assert all(png.startswith(b"\x89PNG") for png in plots.values())
    md = (run_dir / "report.md").read_text()
    results = load_results(run_dir)
    for s in summarize(results):
        row = next(line for line in md.splitlines() if line.startswith(f"| {s.label} |"))
        ppl = s.stat("val_ppl")
        assert f"{ppl.mean:.2f} ± {ppl.std:.2f}" in row  # mean ± std over the two seeds
    claims = md.split("## What this run says about the papers' claims")[1].split("## Plots")[0]
    checks = check_claims(summarize(results), results.get("environment"))
    assert len(checks) == 5 and all(c.verdict in VERDICTS for c in checks)
    assert all(f"— **{c.verdict}**. {c.evidence}" in claims for c in checks)
    # the fixture has every method the claims need, on one device: the time claim is not
    # testable, and no check misses a method
    assert next(c for c in checks if c.key == "bip_time").verdict == NOT_TESTABLE
    assert not any("must" in c.evidence and "finish" in c.evidence for c in checks)
    for name in plots:
        assert f"(plots/{name})" in md
    html = (run_dir / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and "<table>" in html
    # regenerating gives the same Markdown: the report depends on results.json only
    assert to_markdown(build_document(results, plots)) == md


def test_report_command_refuses_a_folder_without_results(tmp_path, capsys):
    from moebal.cli import main

    assert main(["report", str(tmp_path)]) == 2
    assert "no results.json" in capsys.readouterr().err
    assert not (tmp_path / "report.md").exists()


def test_time_claim_is_withheld_on_a_busy_machine():
    runs = [_run("bip", s, 10, time_s=8.0) for s in range(3)] + \
        [_run("aux_loss", s, 10, time_s=10.0 + s / 10) for s in range(3)]
    summaries = summarize(_results(runs))
    quiet = {c.key: c for c in check_claims(summaries, {"cpu_count": 2, "load_average_at_start": 1.0}, 2)}
    assert quiet["bip_time"].verdict == "supported"
    busy = {c.key: c for c in check_claims(summaries, {"cpu_count": 2, "load_average_at_start": 7.5}, 2)}
    assert busy["bip_time"].verdict == NOT_TESTABLE
    assert "load average up to 7.5 on 2" in busy["bip_time"].evidence


def test_dropped_slots_are_shown_when_a_capacity_drops_tokens():
    from moebal.report.document import results_table

    dropless = summarize(_results([_run("none", 0, 10, dropped_frac=0.0)]))
    assert "Dropped slots" not in results_table(dropless).header
    capped = summarize(_results([_run("none", 0, 10, dropped_frac=0.125),
                                 _run("bip", 0, 11, dropped_frac=0.0)]))
    table = results_table(capped)
    assert table.header[-1] == "Dropped slots"
    assert {row[0]: row[-1] for row in table.rows} == {"None (plain top-k)": "12.5%",
                                                       "BIP": "0.0%"}


def test_results_of_schema_1_are_read_under_the_current_names():
    old = json.loads(FIXTURE.read_text())
    assert old["schema"] == "moebal.compare.results/1" and "final_val_ppl" in old["runs"][0]
    new = validate_results(old)
    assert new["schema"] == SCHEMA
    assert new["runs"][0]["val_ppl"] == old["runs"][0]["final_val_ppl"]
    assert new["runs"][0]["train_seconds"] == old["runs"][0]["train_time_s"]


# ---------------------------------------------------------------- old results, variants, sweep

OLD_RESULTS = [FIXTURE] + [Path(__file__).parents[1] / "docs" / "results" / name / "results.json"
                           for name in ("tiny", "small")]


@pytest.mark.parametrize("path", OLD_RESULTS, ids=["micro", "docs-tiny", "docs-small"])
def test_results_without_variants_render_each_method_as_its_own_variant(path, tmp_path):
    from moebal.report import write_report

    shutil.copy(path, tmp_path / "results.json")
    write_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    results = load_results(tmp_path)
    for s in summarize(results):
        if not results["config"].get("variants"):
            assert s.variant.balancer == s.method and s.setting == "moebal"
            assert s.in_batch == (s.method in ("bip", "sinkhorn", "optimal")
                                  and s.options.get("bip_order", "paper") == "paper")
        row = next(line for line in md.splitlines() if line.startswith(f"| {s.label} |"))
        assert f"| {'yes' if s.in_batch else 'no'} |" in row
    for word in ("not supported", "within noise", "not tested"):
        assert word not in md


def test_in_batch_follows_the_balancer_and_its_order():
    from moebal.report.results import routes_in_batch

    assert routes_in_batch("bip", {}) and routes_in_batch("bip", {"bip_order": "paper"})
    assert not routes_in_batch("bip", {"bip_order": "causal"})
    assert routes_in_batch("sinkhorn", {}) and routes_in_batch("optimal", {})
    assert not any(routes_in_batch(b, {}) for b in ("none", "aux_loss", "loss_free", "quantile"))


def _variant_results():
    variants = {
        "aux_loss": {"balancer": "aux_loss", "options": {"aux_loss_coeff": 0.001},
                     "setting": "paper", "label": "Aux loss", "why": "the Loss-Free paper's baseline",
                     "in_batch": False},
        "bip": {"balancer": "bip", "options": {"bip_iters": 4, "bip_warmup_iters": 32,
                                               "bip_pin_q": True, "bip_order": "paper"},
                "setting": "moebal", "label": "BIP (moebal)", "why": "warm start", "in_batch": True},
        "bip_causal": {"balancer": "bip", "options": {"bip_iters": 4, "bip_order": "causal"},
                       "setting": "moebal", "label": "BIP (causal)", "why": "", "in_batch": False},
    }
    runs = []
    for s in range(3):
        sim = {"gpus": 32, "ep": 4, "sched_group": 8, "standard_ep_ms": 9.0 + s,
               "lp_ms": 6.0, "lp_speedup": (9.0 + s) / 6.0}
        runs += [_run("aux_loss", s, 100.0 + s, optimal_gap=0.02, sim=sim, balancer="aux_loss"),
                 _run("bip", s, 99.0 + s, optimal_gap=-0.01, sim=sim, max_vio_global_layers=0.9,
                      sup_max_vio_layers=0.3, balancer="bip"),
                 _run("bip_causal", s, 101.0 + s, balancer="bip")]
        for alpha, ppl in ((0.01, 98.0), (0.1, 103.0)):
            name = f"aux_loss@aux_loss_coeff={alpha}"
            variants[name] = {"balancer": "aux_loss", "options": {"aux_loss_coeff": alpha},
                              "setting": "sweep", "label": f"Aux loss α={alpha}", "in_batch": False}
            runs.append(_run(name, s, ppl + s + 0.1 * s * s, balancer="aux_loss"))
    results = _results(runs, balancers=["aux_loss", "bip"])
    results["config"].update(variants=variants, sweep={"aux_loss": {
        "option": "aux_loss_coeff", "values": [0.01, 0.1], "paper": "aux_loss"}})
    return validate_results(results)


def test_report_of_variants_with_a_sweep(tmp_path):
    from moebal.report import write_report

    written = write_report(tmp_path, _variant_results())
    md = written["report.md"].read_text()
    results_part = md.split("## Results")[1].split("### Cost")[0]
    # held-out balance leads, in-batch marked, every routing option in the settings column
    header = next(line for line in results_part.splitlines() if line.startswith("| Method |"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert cells[:5] == ["Method", "Settings", "In-batch", "MaxVio_global", "MaxVio_global worst layer"]
    assert "SupMaxVio worst layer" in cells and "Optimal gap" in cells
    bip_row = next(line for line in results_part.splitlines() if line.startswith("| BIP (moebal) |"))
    assert "T_iter=4, warm-up=32, pin q=True, order=paper | yes |" in bip_row
    assert "| -1.00 ± 0.00% |" in bip_row  # optimal gap
    assert "| BIP (causal) | T_iter=4, order=causal | no |" in results_part
    assert "Aux loss α=0.01" not in results_part  # sweep points have their own section
    assert results_part.strip().split("\n")[0].startswith("Best held-out balance")
    cost = md.split("### Cost")[1].split("## What this run")[0]
    assert "Sim. MoE layer, standard EP" in cost and "10.00 ± 1.00 ms" in cost
    assert "32 GPUs, EP 4, scheduling group 8" in cost
    sweep = md.split("## Sweep: best by validation vs the paper's setting")[1].split("## Plots")[0]
    assert "| `aux_loss` | aux_loss_coeff=0.01 | best |" in sweep
    assert "| `aux_loss` | aux_loss_coeff=0.001 | paper |" in sweep
    # best (alpha 0.01) - paper (alpha 1e-3): differences -2, -1.9, -1.6 over seeds 0..2
    assert "paired best − paper: -1.83 (95% CI" in sweep and "n=3" in sweep
    methods = md.split("## Methods and their settings")[1]
    assert "the Loss-Free paper's baseline" in methods and "`aux_loss@aux_loss_coeff=0.1`" in methods


def test_variant_colours_are_shades_of_their_balancer():
    from moebal.report.plots import method_color

    assert method_color("bip") == method_color("bip", "bip") == "#2ca02c"
    shade = method_color("bip_causal", "bip")
    assert shade != "#2ca02c" and shade == method_color("bip_causal", "bip")
    assert len(shade) == 7 and int(shade[1:], 16) >= 0
