"""``moebal train --nproc N``: bad input is one line from one process, and the defaults give
the scheduler something to do (the real command line, in a subprocess, gloo on CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import numpy as np
import pytest

from moebal.parallel.cli import default_ep_size, idle_schedule_note
from moebal.parallel.layout import ParallelLayout

WORDS = "to be or not that is the question whether tis nobler in the mind to suffer".split()


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-corpus")
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, 12)) for _ in range(400)]
    (root / "doc.txt").write_text("\n".join(lines) + "\n")
    return root


def moebal_train(corpus_dir, *argv, timeout=300):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "moebal", "train", "--preset", "micro", "--data",
           str(corpus_dir), "--cache-dir", str(corpus_dir / "cache"), "--vocab-size", "512",
           "--quiet", "--set", "eval_every=0", "--steps", "1", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def assert_one_error_line(proc, needle):
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("moebal:")]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, proc.stderr


def test_bad_sizes_are_one_line_before_any_process_starts(corpus_dir, tmp_path):
    proc = moebal_train(corpus_dir, "--nproc", "2", "--out", str(tmp_path / "run"),
                        "--ep-size", "3")
    assert_one_error_line(proc, "world size 2 is not a multiple of the EP size 3")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, needle", [
    (["--placement", "asymmetric", "--placement-loads", "missing.npy"], "does not exist"),
    (["--placement", "eplb"], "--placement-loads FILE"),
    (["--placement", "symmetric", "--sched-size", "3"], "scheduling group size 3"),
    (["--set", "batch_size=3"], "does not split over 2 processes"),
    (["--set", "num_experts=3"], "num_experts=3 does not divide"),
    (["--trace"], "--trace records the routing of a single process"),
])
def test_bad_input_is_refused_before_torchrun_starts(monkeypatch, capsys, tmp_path, argv, needle):
    import moebal.parallel.cli as parallel_cli
    from moebal.cli import main

    def no_launch(*args, **kwargs):
        raise AssertionError("torchrun was started")

    monkeypatch.setattr(parallel_cli, "subprocess", types.SimpleNamespace(run=no_launch))
    code = main(["train", "--preset", "micro", "--nproc", "2", "--out", str(tmp_path / "run"),
                 *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.count("moebal:") == 1 and needle in err, err


@pytest.mark.slow
def test_what_only_the_ranks_can_tell_is_one_line_too(corpus_dir, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")  # a run is already there
    proc = moebal_train(corpus_dir, "--nproc", "2", "--out", str(tmp_path / "run"))
    assert_one_error_line(proc, "already holds a run")


def test_the_default_ep_size_gives_two_replicas():
    assert default_ep_size(4, 4) == 2 and default_ep_size(8, 16) == 4
    assert default_ep_size(2, 4) == 2 and default_ep_size(3, 6) == 3  # no choice to give
    assert default_ep_size(1, 4) == 1


def standard(world, ep_size, num_experts=4):
    return ParallelLayout.from_placement(
        world, ep_size, num_experts,
        [[e for e in range(num_experts) if e % ep_size == g % ep_size] for g in range(world)])


def test_idle_scheduling_is_said_plainly():
    note = idle_schedule_note(standard(4, 4), "lp")
    assert "one replica per scheduling group" in note and "--ep-size 2" in note
    assert "computes its own tokens" in idle_schedule_note(standard(4, 1), "lp")
    assert "4 or more processes" in idle_schedule_note(standard(2, 2), "lp")
    assert idle_schedule_note(standard(4, 2), "lp") is None
    assert idle_schedule_note(standard(4, 4), "none") is None


@pytest.mark.slow
def test_two_processes_say_that_scheduling_is_idle(corpus_dir, tmp_path):
    proc = moebal_train(corpus_dir, "--nproc", "2", "--out", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("--schedule lp has nothing to do") == 1, proc.stdout
