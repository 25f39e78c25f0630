"""Running a comparison's plan: every method x seed trained into one folder, resumably.

The folder (``--out``) holds results.json (rewritten after every run), the report, and
``runs/<method>/seed<k>/`` — one :class:`moebal.train.RunDir` each, plus its ``run.json``
(its row of results.json and the fingerprint of the experiment it belongs to). The folder
is locked while a comparison runs in it.

On ``--resume``: a run with a row of this experiment that finished (``ok``) or diverged
is reused; any other run is trained — continuing from its checkpoint when it has one, and
from the start when its checkpoint is unreadable or missing (a failure of the folder, not a
result of the method); a run that stopped with an error is tried again.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import sys
from pathlib import Path
from typing import Any, Optional, Union

import moebal.train as train_pkg
from moebal.data import resolve_corpus
from moebal.fileio import atomic_write_json, json_clean, remove_stale_temp_files
from moebal.report.plan import Plan, config_differences, experiment_config, run_fingerprint
from moebal.report.simcolumn import simulate_run
from moebal.report.results import RESULTS_FILE, SCHEMA, load_results
from moebal.train import ResumeError, RunDir, RunInterrupted, TrainResult
from moebal.train.device_info import device_count, merge_processes, other_gpu_processes
from moebal.train.results import finite_or_none

RUN_RECORD = "run.json"
DIVERGED, ERROR = "diverged", "error"  # failure kinds: for good, and worth another try


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
def run_record(method: str, seed: int, run_dir: Path, out: Path,
               result: Optional[TrainResult] = None,
               failure: Optional[dict] = None, balancer: Optional[str] = None,
               sim: Optional[dict] = None) -> dict[str, Any]:
    """One row of results.json from a run's TrainResult (None: it stopped with an error);
    ``sim``: its trace replayed on a cluster (:mod:`moebal.report.simcolumn`)."""
    row: dict[str, Any] = {
        "method": method,
        "balancer": balancer or method,
        "seed": seed,
        "status": "failed" if failure else "ok",
        "failure": failure,
        "run_dir": os.path.relpath(run_dir, out),
    }
    f = finite_or_none
    if result is not None:
        row.update(
            steps=int(result.steps),
            tokens=int(result.tokens),
            val_loss=f(result.val_loss),
            val_ppl=f(result.val_ppl),
            max_vio_global=f(result.max_vio_global),
            avg_max_vio=f(result.avg_max_vio),
            sup_max_vio=f(result.sup_max_vio),
            max_vio_batch_first=f(result.max_vio_batch_first),
            max_vio_batch_last=f(result.max_vio_batch_last),
            train_seconds=f(result.train_seconds),
            wall_seconds=f(result.wall_seconds),
            tokens_per_s=f(result.tokens_per_s),
            router_time_share=f(result.router_time_share),
            dropped_frac=f(result.dropped_frac),
            sup_max_vio_layers=f(result.sup_max_vio_layers),
            max_vio_global_layers=f(result.max_vio_global_layers),
            optimal_gap=f(result.optimal_gap),
            price_of_balance=f(result.price_of_balance),
            optimal_gap_samples=int(result.optimal_gap_samples),
            params=int(result.params),
            active_params=int(result.active_params),
        )
    else:
        row.update(steps=(failure or {}).get("step", 1) - 1, tokens=0)
    row["sim"] = sim
    row["series"] = result.series if result is not None else {}
    row["load_snapshots"] = result.load_snapshots if result is not None else []
    return json_clean(row)


def train_one(plan: Plan, method: str, seed: int, corpus, out: Path, *, resume: bool,
              keep_checkpoints: bool, progress: bool, fingerprint: str = "") -> dict[str, Any]:
    """Train (or continue) one method x seed and return its results.json row.

    A diverged run (``TrainResult.diverged_step``) or an error raised while training marks
    the run failed, with the step, instead of stopping the comparison. A run whose
    checkpoint cannot be used is trained again from the start.
    """
    run_dir = out / "runs" / method / f"seed{seed}"
    failure = None
    result = None

    def train(resume: bool) -> TrainResult:
        return train_pkg.train(
            plan.model_config(method), plan.train_config(seed), run_dir, data=corpus,
            preset=plan.preset, resume=resume, force=not resume, progress=progress,
        )

    try:
        try:
            result = train(resume)
        except ResumeError as exc:
            print(f"moebal compare: {method} seed {seed}: {exc}; training it again from the "
                  "start", file=sys.stderr)
            result = train(False)
    except (ValueError, RuntimeError, ArithmeticError) as exc:
        step = RunDir(run_dir).last_logged_step() + 1
        failure = {"step": step, "reason": f"{type(exc).__name__}: {exc}", "kind": ERROR}
        print(f"moebal compare: {method} seed {seed} failed at step {step}: {exc}",
              file=sys.stderr)
    if result is not None and result.diverged_step is not None:
        failure = {"step": int(result.diverged_step), "reason": result.divergence,
                   "kind": DIVERGED}
        print(f"moebal compare: {method} seed {seed} diverged at step {result.diverged_step}; "
              "going on with the others", file=sys.stderr)
    sim = None
    if failure is None and result is not None:
        try:
            sim = simulate_run(run_dir / "trace.npz")
        except (ValueError, RuntimeError) as exc:  # a column of the report, not the run
            print(f"moebal compare: {method} seed {seed}: trace not simulated ({exc})",
                  file=sys.stderr)
    row = run_record(method, seed, run_dir, out, result, failure,
                     balancer=plan.variant(method).balancer, sim=sim)
    atomic_write_json(run_dir / RUN_RECORD, {**row, "fingerprint": fingerprint})
    if not keep_checkpoints and (failure is None or failure["kind"] == DIVERGED):
        RunDir(run_dir).checkpoint().unlink(missing_ok=True)
    return row


def recorded_row(run_dir: Path) -> Optional[dict]:
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


def reusable(row: Optional[dict], method: str, seed: int, fingerprint: str) -> bool:
    """Whether a recorded row is this experiment's final word on the run: finished, or
    diverged (a failure for good); a run that stopped with an error is tried again."""
    if row is None or (row.get("method"), row.get("seed"), row.get("fingerprint")) != (
            method, seed, fingerprint):
        return False
    return row.get("status") == "ok" or (row.get("failure") or {}).get("kind") == DIVERGED


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
    env["device_count"], env["gpu_other_processes"] = device_count(), other_gpu_processes(device)
    return env


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()


def run_comparison(
    plan: Plan,
    out: Union[str, Path],
    *,
    resume: bool = False,
    force: bool = False,
    keep_checkpoints: bool = False,
    progress: bool = True,
    report: bool = True,
    jobs: int = 1,
) -> dict[str, Any]:
    """Train every method x seed of ``plan`` into ``out`` and return the results dict.

    ``jobs`` > 1 trains that many runs at a time, each in a process of its own (spawned;
    results are the same as one at a time: every run is seeded and single-process).

    results.json is rewritten after every run, so an interruption loses at most the run in
    progress (and that one continues from its checkpoint); the report is written at the
    end (and, for what finished, on interruption).
    """
    out = Path(out)
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ValueError(f"jobs must be a positive int, got {jobs!r}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a folder")
    with RunDir(out).locked():
        remove_stale_temp_files(out / RESULTS_FILE)
        corpus = resolve_corpus(plan.data, progress=progress)
        config = experiment_config(plan, corpus)
        previous = check_out_dir(out, config, resume, force)
        return _run_plan(plan, out, corpus, config, previous, resume=resume,
                         keep_checkpoints=keep_checkpoints, progress=progress, report=report,
                         jobs=jobs)


def _add_row(results: dict, config: dict, row: dict) -> None:
    if "params" in row:
        config.setdefault("params_total", row["params"])
        config.setdefault("params_active", row["active_params"])
    results["runs"].append(row)


def _train_task(plan: Plan, method: str, seed: int, corpus, out: Path, resume: bool,
                keep_checkpoints: bool, fingerprint: str) -> tuple[str, Any]:
    """One run in a worker process: ("row", row) or ("interrupted", message)."""
    try:
        return "row", train_one(plan, method, seed, corpus, out, resume=resume,
                                keep_checkpoints=keep_checkpoints, progress=False,
                                fingerprint=fingerprint)
    except RunInterrupted as exc:  # its constructor's arguments do not pickle: send text
        return "interrupted", f"{method} seed {seed}: {exc}"


def _train_parallel(plan: Plan, corpus, out: Path, tasks: list, jobs: int,
                    keep_checkpoints: bool, total: int, progress: bool):
    """Yield the rows of ``tasks`` as their runs finish, ``jobs`` at a time.

    A signal reaches every worker (one process group): each checkpoints its run and stops;
    then the comparison stops with KeyboardInterrupt and ``--resume`` continues them all.
    """
    import concurrent.futures as cf
    import multiprocessing

    pool = cf.ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))
    interrupted = []
    if progress:
        print(f"training {len(tasks)} of {total} runs, {jobs} at a time (one process each)",
              file=sys.stderr)
    futures: dict = {}
    try:
        for i, method, seed, again, fingerprint in tasks:
            futures[pool.submit(_train_task, plan, method, seed, corpus, out, again,
                                keep_checkpoints, fingerprint)] = (method, seed)
        for done, future in enumerate(cf.as_completed(futures), 1):
            kind, value = future.result()
            method, seed = futures[future]
            if kind == "interrupted":
                interrupted.append(value)
                continue
            if progress:
                print(f"[done {done}/{len(tasks)}] {method} seed {seed}: {value['status']}"
                      + (f", val PPL {value['val_ppl']:.2f}" if value.get("val_ppl") else ""),
                      file=sys.stderr)
            yield value
    except KeyboardInterrupt:
        pool.shutdown(wait=True, cancel_futures=True)  # the workers checkpoint first
        for future in futures:
            if future.done() and not future.cancelled() and future.exception() is None:
                kind, value = future.result()
                if kind == "interrupted":
                    interrupted.append(value)
        raise KeyboardInterrupt("; ".join(interrupted)) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if interrupted:
        raise KeyboardInterrupt("; ".join(interrupted))


def _run_plan(plan: Plan, out: Path, corpus, config: dict, previous: Optional[dict], *,
              resume: bool, keep_checkpoints: bool, progress: bool,
              report: bool, jobs: int = 1) -> dict[str, Any]:
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
        env = results["environment"]  # every other process on the GPU seen at any save
        env["gpu_other_processes"] = merge_processes(env.get("gpu_other_processes"),
                                                     other_gpu_processes(plan.device))
        order = {key: i for i, key in enumerate(plan.runs())}
        results["runs"].sort(key=lambda r: order.get((r["method"], r["seed"]), len(order)))
        atomic_write_json(out / RESULTS_FILE, results)

    save()  # the experiment's config is on disk before the first step: --resume can check it
    todo = plan.runs()
    tasks = []  # (i, method, seed, resume, fingerprint) of the runs to train
    for i, (method, seed) in enumerate(todo, 1):
        run_dir = out / "runs" / method / f"seed{seed}"
        fingerprint = run_fingerprint(config, method)
        recorded = recorded_row(run_dir)
        if resume and reusable(recorded, method, seed, fingerprint):
            row = {k: v for k, v in recorded.items() if k != "fingerprint"}
            if progress:
                print(f"[{i}/{len(todo)}] {method} seed {seed}: finished earlier "
                      f"({row['status']}), reused", file=sys.stderr)
            _add_row(results, config, row)
        else:
            # a folder recorded by another experiment (left by --force) starts afresh;
            # one without a record (or with an error) is this experiment's: continue it
            mine = recorded is None or recorded.get("fingerprint") == fingerprint
            tasks.append((i, method, seed, resume and mine, fingerprint))
    save()

    def announce(i: int, method: str, seed: int) -> None:
        if progress:
            opts = plan.balancer_options[method]
            print(f"[{i}/{len(todo)}] {method} seed {seed}"
                  + (f" ({', '.join(f'{k}={v}' for k, v in opts.items())})" if opts else ""),
                  file=sys.stderr)

    try:
        if jobs <= 1 or len(tasks) <= 1:
            for i, method, seed, again, fingerprint in tasks:
                announce(i, method, seed)
                row = train_one(plan, method, seed, corpus, out, resume=again,
                                keep_checkpoints=keep_checkpoints, progress=progress,
                                fingerprint=fingerprint)
                _add_row(results, config, row)
                save()
        else:
            for row in _train_parallel(plan, corpus, out, tasks, jobs, keep_checkpoints,
                                       len(todo), progress):
                _add_row(results, config, row)
                save()
    finally:
        if report and results["runs"]:
            from moebal.report import write_report

            save()
            write_report(out, results)
    return results
