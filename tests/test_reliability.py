"""No run lost, no number that lies, errors a person can read (docs/reliability.md).

The run-folder tests drive the real command line in a subprocess (micro preset, a few
dozen steps), stop it with real signals, resume it, and compare the losses with an
uninterrupted run: on CPU they are equal exactly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from moebal.data import DataConfig, load_corpus
from moebal.train import (
    CheckpointError,
    RunDir,
    load_checkpoint,
    read_metrics,
    save_checkpoint,
)

WORDS = ("to be or not that is the question whether tis nobler in mind suffer slings and "
         "arrows of outrageous fortune take arms against a sea troubles by opposing end them "
         "die sleep no more say we heart ache thousand natural shocks flesh heir").split()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A text file and a corpus cache holding its tokenisation (built once)."""
    root = tmp_path_factory.mktemp("reliability")
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, size=12)) for _ in range(3000)]
    text = root / "text.txt"
    text.write_text("\n".join(lines) + "\n")
    cache = root / "cache"
    load_corpus(DataConfig(path=str(text), vocab_size=512, cache_dir=str(cache)), progress=False)
    return {"text": str(text), "cache": str(cache)}


def cli(data, *args: str) -> list[str]:
    return [sys.executable, "-m", "moebal.cli", "train", "--preset", "micro", "--quiet",
            "--data", data["text"], "--cache-dir", data["cache"], *args]


def run_cli(data, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cli(data, *args), capture_output=True, text=True, timeout=timeout)


def run_main(capsys, data, *args: str) -> tuple[int, str, str]:
    """The same command in this process: (exit code, stdout, stderr)."""
    from moebal.cli import main

    capsys.readouterr()
    rc = main(cli(data, *args)[3:])
    out, err = capsys.readouterr()
    return rc, out, err


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["type"] == "train"]


def steps_logged(run_dir: Path) -> int:
    file = run_dir / "metrics.jsonl"
    return RunDir(run_dir).last_logged_step() if file.is_file() else 0


def start_and_signal(data, out: Path, sig: int, at_step: int, *args: str):
    """Start a run, send ``sig`` once ``at_step`` is in metrics.jsonl; (returncode, stderr)."""
    proc = subprocess.Popen(cli(data, "--out", str(out), *args), stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 120
    while steps_logged(out) < at_step and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


STEPS = ["--steps", "60", "--set", "eval_every=20"]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("ref") / "run"
    done = run_cli(data, "--out", str(out), *STEPS)
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_checkpoints_and_resume_continues_exactly(data, reference, tmp_path, sig, code):
    out = tmp_path / "run"
    rc, err = start_and_signal(data, out, sig, 10, *STEPS)
    assert rc == code, err
    stopped = steps_logged(out)
    assert 10 <= stopped < 60  # really stopped early, after a whole step
    assert f"after step {stopped}" in err and str(out / "checkpoint.pt") in err
    assert "--resume" in err and "Traceback" not in err
    assert load_checkpoint(out / "checkpoint.pt")["step"] == stopped
    assert not list(out.glob(".*.tmp"))
    done = run_cli(data, "--out", str(out), *STEPS, "--resume")
    assert done.returncode == 0, done.stderr
    assert losses(out) == losses(reference)  # exactly
    ref = json.loads((reference / "result.json").read_text())
    got = json.loads((out / "result.json").read_text())
    assert got["val_loss"] == ref["val_loss"] and got["series"] == ref["series"]


@pytest.mark.slow
def test_checkpoints_on_the_clock(data, tmp_path):
    out = tmp_path / "run"
    rc, err = start_and_signal(data, out, signal.SIGKILL, 5, "--steps", "60",
                               "--set", "checkpoint_interval_s=1e-9")
    assert rc == -signal.SIGKILL
    # every step is checkpointed: the checkpoint is at most one step behind the log
    assert load_checkpoint(out / "checkpoint.pt")["step"] >= steps_logged(out) - 1


@pytest.mark.slow
def test_resume_without_a_checkpoint_refuses_and_deletes_nothing(data, tmp_path):
    out = tmp_path / "run"
    rc, _ = start_and_signal(data, out, signal.SIGKILL, 5, "--steps", "60",
                             "--set", "checkpoint_interval_s=0")
    assert rc == -signal.SIGKILL and not (out / "checkpoint.pt").exists()
    (out / ".checkpoint.pt.x1y2.tmp").write_bytes(b"half a checkpoint")  # as a killed write
    before = (out / "metrics.jsonl").read_bytes()
    done = run_cli(data, "--out", str(out), "--steps", "60", "--resume")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "cannot resume" in done.stderr
    assert "no checkpoint.pt" in done.stderr and "Traceback" not in done.stderr
    assert (out / "metrics.jsonl").read_bytes() == before
    assert not (out / ".checkpoint.pt.x1y2.tmp").exists()  # stale temp file cleaned up


def test_a_damaged_or_truncated_checkpoint_is_one_line_naming_it(data, tmp_path, capsys):
    out = tmp_path / "run"
    rc, _, err = run_main(capsys, data, "--out", str(out), "--steps", "4", "--set", "eval_every=0")
    assert rc == 0, err
    ckpt = out / "checkpoint.pt"
    good = ckpt.read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x01
    for bad, word in ((bytes(flipped), "damaged"), (good[: len(good) // 2], "truncated"),
                      (good[:10], "not a moebal checkpoint")):
        ckpt.write_bytes(bad)
        rc, _, err = run_main(capsys, data, "--out", str(out), "--steps", "6",
                              "--set", "eval_every=0", "--resume")
        assert rc == 2 and word in err and str(ckpt) in err and err.count("\n") == 1
        assert ckpt.read_bytes() == bad  # nothing deleted or rewritten


def test_checkpoint_integrity_of_any_file(tmp_path):
    """The check every checkpoint goes through (per-rank ones of --nproc included)."""
    path = tmp_path / "checkpoint.rank1.pt"
    save_checkpoint(path, {"step": 3, "x": np.arange(5)})
    assert load_checkpoint(path)["step"] == 3
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


@pytest.mark.slow
def test_a_run_folder_in_use_is_refused_and_a_stale_lock_taken_over(data, tmp_path):
    out = tmp_path / "run"
    with RunDir(out).locked():
        done = run_cli(data, "--out", str(out), "--steps", "3")
        assert done.returncode == 2
        assert f"in use by pid {os.getpid()}" in done.stderr and "Traceback" not in done.stderr
        assert not (out / "metrics.jsonl").exists()
    # a process that dies holding the lock leaves a stale lock file behind
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from moebal.train import RunDir; d = RunDir(sys.argv[1]);"
        "held = d.locked(); held.__enter__(); print('locked', flush=True); time.sleep(60)"), str(out)],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait()
    assert str(holder.pid) in (out / ".moebal.lock").read_text()
    done = run_cli(data, "--out", str(out), "--steps", "3", "--set", "eval_every=0")
    assert done.returncode == 0, done.stderr
    assert len(losses(out)) == 3  # every step once


def test_non_text_data_and_a_small_vocabulary_are_told(data, tmp_path, capsys):
    png = tmp_path / "picture.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + np.random.default_rng(0).bytes(20000))
    rc, _, err = run_main(capsys, data, "--out", str(tmp_path / "a"), "--steps", "2",
                          "--data", str(png))
    assert rc == 2 and "is not text" in err and str(png) in err and err.count("\n") == 1
    small = tmp_path / "small.txt"
    small.write_text("a tiny text\n" * 400)
    out = tmp_path / "b"
    rc, stdout, err = run_main(capsys, data, "--out", str(out), "--steps", "2",
                               "--set", "eval_every=0", "--data", str(small),
                               "--vocab-size", "100000", "--set", "seq_len=8")
    assert rc == 0, err
    config = json.loads((out / "config.json").read_text())
    got = config["data"]["vocab_size"]
    assert got < 100000 and config["data"]["vocab_size_asked"] == 100000
    assert f"vocabulary       {got:,} tokens (asked for 100,000" in stdout


def test_bad_input_is_one_line_and_exit_2(data, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    bad_tok = tmp_path / "tok.json"
    bad_tok.write_text('{"truncated": ')
    cases = [
        (["--out", str(a_file)], f"run folder {str(a_file)!r} exists and is not a folder"),
        (["--out", "/dev/null/run"], "is not writable"),
        (["--out", str(tmp_path / "c"), "--tokenizer", str(bad_tok)],
         "is not a tokenizers JSON file"),
        (["--out", str(tmp_path / "d"), "--set", "router.capacity_factor=abc"],
         "--set router.capacity_factor=abc"),
    ]
    for args, message in cases:
        rc, _, err = run_main(capsys, data, "--steps", "2", *args)
        assert rc == 2 and message in err and err.count("\n") == 1, (args, err)


def test_a_damaged_corpus_cache_is_one_line(data, tmp_path, capsys):
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(data["cache"], cache)
    folder = load_corpus(DataConfig(path=data["text"], vocab_size=512, cache_dir=str(cache)),
                         progress=False).directory
    for name in ("train.bin", "tokenizer.json"):
        original = (folder / name).read_bytes()
        (folder / name).write_bytes(original[: len(original) // 2])
        rc, _, err = run_main(capsys, {**data, "cache": str(cache)}, "--steps", "2",
                              "--out", str(tmp_path / name))
        assert rc == 2 and "is damaged" in err and str(folder) in err and err.count("\n") == 1
        (folder / name).write_bytes(original)


@pytest.mark.slow
def test_a_damaged_rank_checkpoint_of_a_parallel_run_is_refused(data, tmp_path):
    out = tmp_path / "run"
    base = cli(data, "--nproc", "2", "--set", "eval_every=0", "--out", str(out))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(base + ["--steps", "2"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    ckpt = out / "checkpoint.rank1.pt"
    flipped = bytearray(ckpt.read_bytes())
    flipped[len(flipped) // 2] ^= 0x01
    ckpt.write_bytes(bytes(flipped))
    before = (out / "metrics.jsonl").read_bytes()
    done = subprocess.run(base + ["--steps", "2", "--resume"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode != 0
    assert f"checkpoint {str(ckpt)!r} is damaged" in done.stderr, done.stderr
    assert (out / "metrics.jsonl").read_bytes() == before


def test_train_help_states_the_checkpoint_defaults(capsys):
    from moebal.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "checkpoint_every steps (default 0 = off for micro and tiny" in text
    assert "checkpoint_interval_s seconds of wall time (default 600" in text
    assert "130 (SIGINT) or 143 (SIGTERM)" in text


@pytest.mark.slow
def test_ctrl_c_stops_parallel_compare_runs_with_checkpoints_and_resume_finishes(data, tmp_path):
    out = tmp_path / "cmp"
    cmd = [sys.executable, "-m", "moebal.cli", "compare", "--preset", "micro", "--steps", "400",
           "--balancers", "none,aux_loss", "--jobs", "2", "--no-progress", "--data", data["text"],
           "--cache-dir", data["cache"], "--set", "eval_every=100", "--out", str(out)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            start_new_session=True)  # its own process group, as a terminal's
    runs = [out / "runs" / m / "seed0" for m in ("none", "aux_loss")]
    deadline = time.monotonic() + 120
    while (min(steps_logged(r) for r in runs) < 5 and proc.poll() is None
           and time.monotonic() < deadline):
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "continue with: " in err and err.strip().endswith("--resume")
    assert all((r / "checkpoint.pt").is_file() for r in runs)
    stopped = [steps_logged(r) for r in runs]
    done = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = json.loads((out / "results.json").read_text())["runs"]
    assert [(r["method"], r["status"], r["steps"]) for r in rows] == [
        ("none", "ok", 400), ("aux_loss", "ok", 400)]
    assert all(s < 400 for s in stopped)  # they were stopped, then continued
