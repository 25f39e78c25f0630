"""The comparison report: results.json checks, the papers' claims, report files."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from moebal.report import SCHEMA, check_claims, load_results, summarize, validate_results
from moebal.report.claims import NOT_SUPPORTED, NOT_TESTED, SUPPORTED, WITHIN_NOISE
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


def _claims(runs):
    return {c.key: c for c in check_claims(summarize(_results(runs)))}


# ---------------------------------------------------------------- the papers' claims


def test_bip_balanced_needs_first_step_and_every_step():
    balanced = _claims([_run("bip", 0, 10, first=0.05, sup=0.08), _run("none", 0, 11)])
    assert balanced["bip_balanced"].verdict == SUPPORTED
    late = _claims([_run("bip", 0, 10, first=0.9, sup=0.9, avg=0.05)])
    assert late["bip_balanced"].verdict == NOT_SUPPORTED
    assert "first step" in late["bip_balanced"].evidence
    spikes = _claims([_run("bip", 0, 10, first=0.02, sup=0.6)])
    assert spikes["bip_balanced"].verdict == NOT_SUPPORTED
    assert "not at every step" in spikes["bip_balanced"].evidence


def test_bip_balanced_checks_every_layer_in_the_first_snapshot():
    skewed = [{"step": 1, "loads_LE": [[10, 10, 10, 10], [30, 10, 0, 0]]}]
    c = _claims([_run("bip", 0, 10, first=0.05, sup=0.05, load_snapshots=skewed)])
    assert c["bip_balanced"].verdict == NOT_SUPPORTED
    assert "worst single layer" in c["bip_balanced"].evidence


def test_lowest_ppl_one_seed_follows_the_ordering():
    c = _claims([_run("bip", 0, 9.9), _run("aux_loss", 0, 10.0), _run("loss_free", 0, 10.2)])
    assert c["lowest_ppl"].verdict == SUPPORTED
    assert "noise is unknown" in c["lowest_ppl"].evidence
    c = _claims([_run("bip", 0, 10.3), _run("aux_loss", 0, 10.0)])
    assert c["lowest_ppl"].verdict == NOT_SUPPORTED
    assert "Aux loss is lowest" in c["lowest_ppl"].evidence


def test_lowest_ppl_gap_must_exceed_seed_std():
    noisy = [_run("bip", s, p) for s, p in enumerate([9.0, 10.0, 11.0])]
    noisy += [_run("aux_loss", s, p) for s, p in enumerate([10.1, 10.2, 10.3])]
    assert _claims(noisy)["lowest_ppl"].verdict == WITHIN_NOISE
    clear = [_run("bip", s, p) for s, p in enumerate([9.0, 9.1, 9.2])]
    clear += [_run("aux_loss", s, p) for s, p in enumerate([10.1, 10.2, 10.3])]
    assert _claims(clear)["lowest_ppl"].verdict == SUPPORTED
    worse = [_run("bip", s, p) for s, p in enumerate([11.0, 11.1, 11.2])]
    worse += [_run("aux_loss", s, p) for s, p in enumerate([10.1, 10.2, 10.3])]
    assert _claims(worse)["lowest_ppl"].verdict == NOT_SUPPORTED


def test_loss_free_claim_needs_better_ppl_and_far_lower_maxvio_global():
    ok = _claims([_run("loss_free", 0, 9.50, mvg=0.04), _run("aux_loss", 0, 9.56, mvg=0.72)])
    assert ok["loss_free"].verdict == SUPPORTED
    worse_ppl = _claims([_run("loss_free", 0, 9.60, mvg=0.04), _run("aux_loss", 0, 9.56, mvg=0.72)])
    assert worse_ppl["loss_free"].verdict == NOT_SUPPORTED
    assert "perplexity is not better" in worse_ppl["loss_free"].evidence
    not_far = _claims([_run("loss_free", 0, 9.50, mvg=0.5), _run("aux_loss", 0, 9.56, mvg=0.72)])
    assert not_far["loss_free"].verdict == NOT_SUPPORTED
    assert "not far lower" in not_far["loss_free"].evidence


def test_claims_not_tested_without_the_methods_or_when_they_failed():
    failed = _run("bip", 0, None, status="failed", failure={"step": 3, "reason": "loss is NaN"})
    c = _claims([failed, _run("none", 0, 10.0)])
    assert all(v.verdict == NOT_TESTED for v in c.values())


def test_bip_time_claim_uses_wall_time_ratio():
    c = _claims([_run("bip", 0, 10, time_s=8.0), _run("aux_loss", 0, 10, time_s=10.0)])
    assert c["bip_time"].verdict == SUPPORTED
    c = _claims([_run("bip", 0, 10, time_s=9.5), _run("aux_loss", 0, 10, time_s=10.0)])
    assert c["bip_time"].verdict == NOT_SUPPORTED


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
    verdicts = [c.verdict for c in check_claims(summarize(results))]
    assert len(verdicts) == 4 and all(f"**{v}**" in claims for v in verdicts)
    assert NOT_TESTED not in verdicts  # the fixture has every method the claims need
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


def test_time_claim_is_within_noise_on_a_busy_machine_with_one_seed():
    summaries = summarize(_results([_run("bip", 0, 10, time_s=8.0), _run("aux_loss", 0, 10, time_s=10.0)]))
    quiet = {c.key: c for c in check_claims(summaries, {"cpu_count": 2, "load_average_at_start": 1.0})}
    assert quiet["bip_time"].verdict == SUPPORTED
    busy = {c.key: c for c in check_claims(summaries, {"cpu_count": 2, "load_average_at_start": 7.5})}
    assert busy["bip_time"].verdict == WITHIN_NOISE
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
