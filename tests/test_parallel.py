"""Expert parallelism on torch.distributed (gloo, CPU, several processes).

The distributed tests run the worker functions of tests/parallel_workers.py on 4
processes through ``moebal.parallel.spawn``; each rank returns what it saw and the
assertions run here.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from moebal.parallel import (
    STAT_FIELDS,
    ParallelLayout,
    Planner,
    check_sizes,
    spawn,
    summarize_rank_stats,
)
from moebal.parallel.plan import check_plan, static_targets
from parallel_workers import (
    MODEL,
    OVERLAP,
    STANDARD,
    SpreadPlanner,
    all_to_all_worker,
    bad_input_worker,
    ep_worker,
    failing_worker,
    model_config,
    reference,
    train_worker,
)

# --- layout and plans: pure, no processes -------------------------------------------------

@pytest.mark.parametrize(
    "sizes, needle",
    [((6, 4, 8), "world size 6 is not a multiple of the EP size 4"),
     ((6, 3, 8), "num_experts=8 does not divide over the 3 ranks"),
     ((8, 2, 8, 3), "scheduling group size 3"),
     ((0, 1, 8), "world_size must be a positive int, got 0")],
)
def test_sizes_that_do_not_fit_are_refused(sizes, needle):
    with pytest.raises(ValueError, match=needle):
        check_sizes(*sizes)


def test_layout_groups_of_a_standard_placement():
    layout = ParallelLayout.from_placement(4, 2, 8, STANDARD)
    assert layout.ep_groups() == [(0, 1), (2, 3)]
    assert layout.sched_groups() == [(0, 1, 2, 3)]
    assert layout.replica_set(4) == (0, 2) and layout.replica_set(5) == (1, 3)
    assert layout.replica_sets() == [(0, 2), (1, 3)]
    assert layout.is_standard()
    overlap = ParallelLayout.from_placement(4, 2, 8, OVERLAP)
    assert overlap.replica_sets() == [(0, 2), (0, 3), (1, 2), (1, 3)]


def test_layout_tiles_a_placement_over_scheduling_groups():
    layout = ParallelLayout.from_placement(8, 2, 4, [[0, 1], [2, 3], [0, 2], [1, 3]], sched_size=4)
    assert layout.sched_groups() == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert layout.local_experts(6) == (0, 2)
    assert layout.replica_set(0) == (0, 2, 4, 6)


@pytest.mark.parametrize(
    "placement, needle",
    [([[0, 2, 4, 6], [1, 3, 5, 7]], "covers 2 GPUs"),
     ([[0, 2, 4], [1, 3, 5, 7], [0, 2, 4, 6], [1, 3, 5, 7]], "GPU 0 of the placement holds 3"),
     ([[0, 0, 4, 6], [1, 3, 5, 7], [0, 2, 4, 6], [1, 3, 5, 7]], "holds an expert twice"),
     ([[0, 2, 4, 9], [1, 3, 5, 7], [0, 2, 4, 6], [1, 3, 5, 7]], "expert 9"),
     ([[0, 2, 4, 1], [1, 3, 5, 7], [0, 2, 4, 1], [1, 3, 5, 7]], r"experts \[6\] have no replica")],
)
def test_bad_placements_are_named(placement, needle):
    with pytest.raises(ValueError, match=needle):
        ParallelLayout.from_placement(4, 2, 8, placement)


def test_none_schedule_stays_in_the_own_ep_group():
    layout = ParallelLayout.from_placement(4, 2, 8, OVERLAP)
    target = static_targets(layout)
    holds = layout.holds_GE()
    for g in range(4):
        group = layout.ep_group(g)
        for e in range(8):
            assert holds[target[g, e], e]
            assert target[g, e] in group
            if holds[g, e]:
                assert target[g, e] == g
    loads = np.random.default_rng(0).integers(0, 20, size=(4, 8))
    planner = Planner(layout, "none")
    total = np.zeros(4, dtype=np.int64)
    for g in range(4):
        plan = planner.plan(loads, g)
        check_plan(plan, loads, g, holds)
        total[g] = plan.recv_GE.sum()
        assert plan.makespan == plan.makespan_unscheduled
    assert total.sum() == loads.sum()
    assert np.array_equal(total, planner.plan(loads, 0).computed_G)


def test_spread_planner_is_a_valid_plan():
    layout = ParallelLayout.from_placement(4, 2, 8, OVERLAP)
    loads = np.random.default_rng(1).integers(0, 9, size=(4, 8))
    planner = SpreadPlanner(layout)
    for g in range(4):
        check_plan(planner.plan(loads, g), loads, g, layout.holds_GE())


# --- collectives ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def workers():
    """Start the worker process server once (it imports torch), and make this process
    import what the first model step imports, outside any test's time."""
    spawn(_noop, 1, timeout_s=120)
    reference(model_config(), steps=1)


def _noop(rank, world):
    return rank


@pytest.mark.usefixtures("workers")
def test_all_to_all_moves_rows_and_sends_gradients_back():
    results = spawn(all_to_all_worker, 4, timeout_s=60)
    splits = results[0].value[0]
    for r in results:
        _, y, grad, counts = r.value
        expected = []
        for s in range(4):
            start = int(splits[s, :r.rank].sum())
            expected += [1000.0 * s + start + i for i in range(int(splits[s, r.rank]))]
        assert y[:, 0].tolist() == expected
        dest = torch.repeat_interleave(torch.arange(4), splits[r.rank])
        assert torch.equal(grad[:, 0], (dest + 1).double())
        assert counts.tolist() == [[s, 10 * s] for s in range(4)]


# --- the expert-parallel model against the single-process model -------------------------

def _expected_grad(name, ref_grads, local_experts):
    if ".experts.local." in name:
        return ref_grads[name.replace("experts.local.", "experts.")][list(local_experts)]
    return ref_grads[name]


def _run_ep(placement, schedule="none", steps=1, spread=False, clip=None, **model_overrides):
    config = model_config(**model_overrides)
    pkw = dict(ep_size=2, placement=placement, schedule=schedule)
    results = spawn(ep_worker, 4, (config.to_dict(), pkw, steps, 1e-2, clip, spread),
                    timeout_s=120)
    return config, [r.value for r in results]


@pytest.mark.usefixtures("workers")
@pytest.mark.parametrize(
    "placement, schedule, spread",
    [("standard", "lp", False), ("symmetric", "lp", False), ("standard", "none", False),
     ("symmetric", "none", False), (OVERLAP, "none", True)],
    ids=["standard-lp", "symmetric-lp", "standard-none", "symmetric-none", "overlap-spread"],
)
def test_ep_model_has_the_single_process_loss_and_gradients(placement, schedule, spread):
    config, values = _run_ep(placement, schedule, spread=spread)
    ref_losses, ref_grads, _ = reference(config, steps=1)
    for v in values:
        assert v["losses"][0] == pytest.approx(ref_losses[0], rel=1e-5)
        for name, grad in v["grads"].items():
            expected = _expected_grad(name, ref_grads, v["local_experts"])
            torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.usefixtures("workers")
@pytest.mark.parametrize("placement, spread", [("symmetric", False), (OVERLAP, True)],
                         ids=["symmetric-lp", "overlap-spread"])
def test_replicas_stay_identical_and_training_matches_single_process(placement, spread):
    steps = 4
    config, values = _run_ep(placement, "lp", steps=steps, spread=spread, clip=0.05)
    ref_losses, _, ref_state = reference(config, steps=steps, clip=0.05)
    layout = ParallelLayout.from_placement(4, 2, 8, values[0]["placement"])
    for v in values:
        assert v["losses"] == pytest.approx(ref_losses, rel=1e-4)
        for key, value in ref_state.items():
            torch.testing.assert_close(v["full_state"][key], value, rtol=1e-4, atol=1e-5,
                                       msg=key)
    # every replica of every expert holds the same weights, bit for bit
    for e in range(8):
        reps = layout.replica_set(e)
        for name in values[reps[0]]["local_params"]:
            if ".experts.local." not in name:
                continue
            weights = [values[r]["local_params"][name][values[r]["local_experts"].index(e)]
                       for r in reps]
            for w in weights[1:]:
                assert torch.equal(w, weights[0]), (name, e)
    # dense parameters too
    for name, p in values[0]["local_params"].items():
        if ".experts.local." not in name:
            for v in values[1:]:
                assert torch.equal(v["local_params"][name], p), name


@pytest.mark.usefixtures("workers")
@pytest.mark.parametrize(
    "balancer, same_as_single",
    [("test_synced_bias", True), ("loss_free", True), ("global_aux_loss", True),
     ("quantile", False)],
)
def test_router_state_stays_identical_on_every_rank(balancer, same_as_single):
    """Balancers with state (or a loss) over the whole global batch see loads all-reduced
    over the data-parallel group: their state is the same on every rank and, where the
    method is defined on the global batch, the same as in the single-process model."""
    from moebal.routing import BALANCERS

    if balancer not in BALANCERS:
        pytest.skip(f"balancer {balancer!r} is not in this checkout")
    config, values = _run_ep("symmetric", "lp", steps=3, balancer=balancer)
    router_keys = [k for k in values[0]["full_state"] if ".router." in k]
    for v in values[1:]:
        for key in router_keys:
            assert torch.equal(v["full_state"][key], values[0]["full_state"][key]), key
    if same_as_single:
        ref_losses, _, ref_state = reference(config, steps=3)
        for v in values:
            assert v["losses"] == pytest.approx(ref_losses, rel=1e-4)
            for key in router_keys:
                torch.testing.assert_close(v["full_state"][key], ref_state[key], msg=key)
    if balancer == "test_synced_bias":
        assert any(values[0]["full_state"][k].abs().sum() > 0 for k in router_keys
                   if k.endswith("bias_E"))


@pytest.mark.usefixtures("workers")
def test_step_records_count_every_token_once():
    _, values = _run_ep(OVERLAP, steps=2, spread=True)
    _, scheduled = _run_ep("symmetric", "lp", steps=2)
    _, unscheduled = _run_ep("symmetric", "none", steps=2)
    for lp, none in zip(scheduled[0]["records"], unscheduled[0]["records"]):
        assert lp["makespan"] <= lp["makespan_unscheduled"] == none["makespan"]
        assert none["makespan"] == none["makespan_unscheduled"]
    records = values[0]["records"]
    assert all(v["records"] == records for v in values)  # gathered on every rank
    assert {tuple(sorted(r)) for r in records} == {tuple(sorted(("rank", "step") + STAT_FIELDS))}
    tokens_per_rank = 8 // 4 * 12
    moe_layers = MODEL["n_layers"]
    for step in range(2):
        rows = [r for r in records if r["step"] == step]
        assert sorted(r["rank"] for r in rows) == [0, 1, 2, 3]
        computed = sum(r["tokens_computed"] for r in rows)
        assert computed == 4 * tokens_per_rank * MODEL["top_k"] * moe_layers
        assert sum(r["tokens_sent"] for r in rows) == sum(r["tokens_received"] for r in rows)
        assert all(r["tokens_sent"] > 0 for r in rows)  # spread sends to every replica
        assert max(r["tokens_computed"] for r in rows) <= rows[0]["makespan"]
        assert all(r["makespan"] == rows[0]["makespan"] for r in rows)
        assert all(r["t_dispatch"] > 0 and r["t_compute"] > 0 and r["t_combine"] > 0
                   for r in rows)
    summary = summarize_rank_stats(records)
    assert summary["steps"] == 2 and set(summary["per_rank"]) == {0, 1, 2, 3}


# --- failures and bad input ---------------------------------------------------------------

@pytest.mark.usefixtures("workers")
@pytest.mark.parametrize("mode", ["raise", pytest.param("hang", marks=pytest.mark.slow)])
def test_a_failing_rank_raises_a_clear_error_on_every_rank(mode):
    start = time.monotonic()
    results = spawn(failing_worker, 4, (mode,), timeout_s=60, collective_timeout_s=3,
                    raise_on_error=False)
    assert time.monotonic() - start < 45  # no hang
    assert not any(r.ok for r in results)
    if mode == "raise":
        assert "data loader of rank 2 broke" in results[2].error
    for r in results:
        if r.rank == 2 and mode == "raise":
            continue
        assert r.error_type == "CollectiveError", r.error
        assert f"rank {r.rank}: collective" in r.error and "timeout 3 s" in r.error


BAD_INPUTS = [
    (3, 6, [[0, 1]] * 4, "world size 4 is not a multiple of the EP size 3"),
    (4, 6, [[0]] * 4, "num_experts=6 does not divide over the 4 ranks"),
    (2, 8, STANDARD[:2], "covers 2 GPUs but the scheduling group has 4"),
]


@pytest.mark.usefixtures("workers")
def test_bad_input_is_refused_on_every_rank_before_any_collective():
    cases = [case[:3] for case in BAD_INPUTS]
    results = spawn(bad_input_worker, 4, (cases,), timeout_s=60, collective_timeout_s=5)
    for r in results:
        # each rank tried every case; a rank stuck in a collective would time out instead
        for (_, _, _, needle), (etype, message) in zip(BAD_INPUTS, r.value):
            assert etype == "ValueError" and needle in message, message


# --- training runs: the moebal.train loop on several processes --------------------------

WORDS = ("to be or not that is the question whether tis nobler in mind suffer slings and "
         "arrows of outrageous fortune take arms against a sea troubles by opposing").split()


@pytest.fixture(scope="module")
def corpus_cfg(tmp_path_factory):
    """A small corpus, tokenised once (the workers find it in the cache)."""
    from moebal.data import DataConfig, load_corpus

    root = tmp_path_factory.mktemp("parallel-corpus")
    rng = np.random.default_rng(0)
    for d in range(4):
        lines = [" ".join(rng.choice(WORDS, 12)) for _ in range(300)]
        (root / f"doc{d}.txt").write_text("\n".join(lines) + "\n")
    cfg = DataConfig(path=str(root), vocab_size=512, cache_dir=str(root / "cache"))
    load_corpus(cfg, progress=False)
    return cfg


def _micro(**changes):
    import dataclasses

    from moebal.train import get_preset

    model_cfg, train_cfg = get_preset("micro")  # 4 experts, batch 8
    return model_cfg, dataclasses.replace(train_cfg, **changes)


def _losses(run_dir):
    from moebal.train import read_metrics

    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["type"] == "train"]


@pytest.mark.usefixtures("workers")
def test_training_on_4_processes_matches_the_single_process_run(corpus_cfg, tmp_path):
    from moebal.parallel import ParallelConfig
    from moebal.train import read_metrics, train

    model_cfg, train_cfg = _micro(steps=4, eval_every=2, threads=1)
    single = train(model_cfg, train_cfg, tmp_path / "single", data=corpus_cfg, progress=False)
    parallel = ParallelConfig(ep_size=2, placement="symmetric", schedule="lp")
    results = spawn(train_worker, 4, (model_cfg, train_cfg, tmp_path / "ep", parallel,
                                      corpus_cfg, None), timeout_s=120)
    result = results[0].value
    assert all(r.value is None for r in results[1:])  # rank 0 reports
    assert _losses(tmp_path / "ep") == pytest.approx(_losses(tmp_path / "single"), rel=1e-5)
    assert result["val_loss"] == pytest.approx(single.val_loss, rel=1e-5)
    assert (result["params"], result["active_params"]) == (single.params, single.active_params)
    records = [r for r in read_metrics(tmp_path / "ep" / "metrics.jsonl")
               if r["type"] == "parallel"]
    assert sorted((r["step"], r["rank"]) for r in records) == [
        (s, r) for s in range(1, 5) for r in range(4)]
    summary = json.loads((tmp_path / "ep" / "parallel.json").read_text())
    assert summary["steps"] == 4 and summary["makespan_ratio"] <= 1.0
    assert sorted(p.name for p in (tmp_path / "ep").glob("checkpoint.rank*.pt")) == [
        f"checkpoint.rank{r}.pt" for r in range(4)]


@pytest.mark.usefixtures("workers")
@pytest.mark.slow
def test_an_interrupted_parallel_run_resumes_exactly(corpus_cfg, tmp_path):
    from moebal.parallel import ParallelConfig

    model_cfg, train_cfg = _micro(steps=5, eval_every=0, checkpoint_every=2, threads=1)
    parallel = ParallelConfig(ep_size=2, placement="standard", schedule="lp")
    for name, interrupt_at in (("full", None), ("cut", 3)):
        spawn(train_worker, 4, (model_cfg, train_cfg, tmp_path / name, parallel, corpus_cfg,
                                interrupt_at), timeout_s=120)
    assert len(_losses(tmp_path / "full")) == 5
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "full")  # exactly


def test_parallel_flags_without_processes_are_refused(capsys):
    from moebal.cli import main

    assert main(["train", "--ep-size", "2", "--schedule", "none"]) == 2
    assert "--ep-size, --schedule take effect with --nproc N" in capsys.readouterr().err


@pytest.mark.slow
def test_moebal_train_nproc_runs_under_torchrun(corpus_cfg, tmp_path):
    import os
    import subprocess
    import sys

    from moebal.train import read_metrics

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    base = [sys.executable, "-m", "moebal", "train", "--nproc", "2", "--preset", "micro",
            "--data", corpus_cfg.path, "--cache-dir", corpus_cfg.cache_dir, "--vocab-size",
            "512", "--quiet", "--set", "eval_every=0"]
    bad = subprocess.run(base + ["--steps", "2", "--ep-size", "3", "--out",
                                 str(tmp_path / "bad")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2  # refused before any process starts: one line
    assert bad.stderr.count("world size 2 is not a multiple of the EP size 3") == 1
    good = subprocess.run(base + ["--steps", "2", "--ep-size", "2", "--schedule", "lp",
                                  "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert good.returncode == 0, good.stderr
    assert "scheduled / unscheduled makespan" in good.stdout
    assert good.stdout.count("val perplexity") == 1  # rank 0 reports
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl")
               if r["type"] == "parallel"]
    assert sorted((r["step"], r["rank"]) for r in records) == [(1, 0), (1, 1), (2, 0), (2, 1)]
