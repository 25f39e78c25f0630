"""The training loop: :class:`Trainer` holds the state of one run and its steps.

``train_step()``, ``evaluate()``, ``state_dict()`` / ``load_state_dict()`` and ``fit()``
(the loop with files, progress bar, checkpoints and stop signals) are separate so that
other runners (expert parallelism) reuse them. Entry point: :func:`moebal.train.train`.

One optimizer step:

1. ``grad_accum`` micro-batches of ``batch_size`` random windows: forward, backward of
   ``loss / grad_accum`` where loss = LM cross-entropy + the routers' losses;
2. ``reduce_gradients()`` (a no-op here; a data-parallel runner all-reduces), gradient
   clipping, ``optimizer.step()``, ``scheduler.step()``;
3. ``model.step_routers()`` — once per optimizer step, where the loss-free, BIP and
   quantile balancers update their state from the loads of all micro-batches;
4. the per-layer loads summed over the micro-batches go to ``BalanceTracker.record``
   (MaxVio_batch of the global batch).

A step whose loss or gradient norm is not finite changes nothing and raises
:class:`NonFiniteLoss`; ``fit()`` records it (``TrainResult.diverged_step``) and stops.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np
import torch

from moebal.data import BatchSampler, Corpus, eval_windows
from moebal.data.batches import windows_to_batch
from moebal.metrics import BalanceTracker, optimal_score_gaps
from moebal.model import MoELayer, MoEModel, ModelConfig
from moebal.routing import NonFiniteLogits
from moebal.train.config import TrainConfig, check_configs
from moebal.train.context import StopSignals, resolve_amp_dtype, resolve_device, run_settings
from moebal.train.errors import NonFiniteLoss, RunInterrupted
from moebal.train.optim import build_optimizer
from moebal.train.results import History, StepStats, TrainResult, balance_summary
from moebal.train.rundir import RunDir, load_checkpoint, save_checkpoint
from moebal.train.state import capture, restore
from moebal.train.trace import RoutingTrace, TraceRecorder, save_trace

class Trainer:
    """The state of one training run and the pieces of its loop.

    Construction seeds Python, NumPy and torch with ``train_cfg.seed``, builds the model,
    optimizer, schedule, batch sampler, BalanceTracker and (with ``trace``) the trace
    recorder. Nothing is written until ``fit()``; ``out_dir=None`` writes nothing at all.

    Subclasses (a data-parallel runner) override ``micro_batch`` (which rows this process
    computes), ``reduce_gradients``, ``reduce_loads``, ``reduce_losses``,
    ``clip_gradients``, ``agree``, ``extra_records``, ``is_main`` and ``checkpoint_file``.
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        train_cfg: TrainConfig,
        corpus: Corpus,
        out_dir: Union[str, os.PathLike, RunDir, None] = None,
        *,
        preset: str = "",
        model: Optional[MoEModel] = None,
    ) -> None:
        check_configs(model_cfg, train_cfg)
        if corpus.vocab_size > model_cfg.vocab_size:
            raise ValueError(
                f"the tokenizer has {corpus.vocab_size} tokens but the model's vocab_size is "
                f"{model_cfg.vocab_size}"
            )
        self.model_cfg, self.train_cfg, self.corpus = model_cfg, train_cfg, corpus
        self.preset = preset
        self.run = (out_dir if isinstance(out_dir, RunDir) or out_dir is None
                    else RunDir(out_dir))
        self.out_dir = self.run.path if self.run is not None else None
        self.device = resolve_device(train_cfg.device)
        self.amp_dtype = resolve_amp_dtype(train_cfg.dtype, self.device)
        seq_len = model_cfg.seq_len
        # data first: a sequence longer than the data fails before anything is built
        self.sampler = BatchSampler(corpus.train, seq_len, seed=train_cfg.seed)
        self.eval_starts = eval_windows(
            corpus.val, seq_len, train_cfg.eval_batches * train_cfg.batch_size
        )

        random.seed(train_cfg.seed)
        np.random.seed(train_cfg.seed)
        torch.manual_seed(train_cfg.seed)
        self.model = model if model is not None else MoEModel(model_cfg)
        self.model.to(self.device)
        # Routers step only when told (once per optimizer step), from the very first batch.
        self.model.set_auto_step(False)
        self.model.time_routers = train_cfg.router_timing

        self.optimizer, self.scheduler = build_optimizer(self.model, train_cfg, self.device)
        self.moe_layers = self.model.moe_layers()
        L, E = len(self.moe_layers), model_cfg.num_experts
        self.tracker = BalanceTracker(L, E) if L else None
        self.tracer = (
            TraceRecorder(L, train_cfg.trace_shards, E, train_cfg.global_batch, seq_len)
            if train_cfg.trace and L else None
        )
        self.step = 0
        self.tokens_seen = 0
        self.train_seconds = 0.0
        self.router_seconds = 0.0
        self.wall_seconds = 0.0
        self.evals: list[dict[str, Any]] = []
        self.optimal_gaps: list[dict[str, float]] = []  # optimal_score_gap samples
        self.history = History()
        self.last_loss = float("nan")
        self.diverged_step: Optional[int] = None
        self.divergence: Optional[str] = None

    # ---------------------------------------------------------------- hooks
    @property
    def is_main(self) -> bool:
        """Whether this process writes the run folder (every process, when not distributed)."""
        return True

    @property
    def checkpoint_file(self) -> Optional[Path]:
        """Where this process's checkpoint goes (None: no run folder)."""
        return self.run.checkpoint() if self.run is not None else None

    def micro_batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of micro-batch ``index`` of the current step."""
        return self.sampler.next_batch(self.train_cfg.batch_size, self.device)

    def reduce_gradients(self) -> None:
        """Called after the backward passes, before clipping (data-parallel all-reduce)."""

    def reduce_loads(self, loads_LE: torch.Tensor) -> torch.Tensor:
        """Per-layer loads of this process -> of the global batch (all-reduce when distributed)."""
        return loads_LE

    def reduce_losses(self, totals: torch.Tensor) -> torch.Tensor:
        """This process's summed (loss, lm_loss, aux_loss) -> the global batch's (the mean
        over processes when distributed), so every process takes the same decisions."""
        return totals

    def clip_gradients(self, max_norm: float) -> float:
        """Clip to ``max_norm`` (inf: measure only); returns the norm before clipping."""
        return float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))

    def agree(self, signum: int, clock_due: bool) -> tuple[int, bool]:
        """This process's (stop signal or 0, checkpoint due on the clock) -> what all
        processes act on (the same on every process when distributed)."""
        return signum, clock_due

    def extra_records(self, stats: "StepStats") -> list[dict[str, Any]]:
        """More metrics.jsonl records of this step (called on every process, every step)."""
        return []

    # ---------------------------------------------------------------- pieces
    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def train_step(self) -> StepStats:
        """One optimizer step over ``grad_accum`` micro-batches (see the module docstring).

        A non-finite loss or gradient norm (or logits the router refuses as NaN/inf) leaves
        parameters, optimizer and routers untouched and raises :class:`NonFiniteLoss`.
        """
        cfg = self.train_cfg
        model = self.model
        model.train()
        router_timers = []  # resolved once the step is done (CUDA events: no sync before)
        self._sync()
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        gaps: list[dict] = []
        L, E = len(self.moe_layers), self.model_cfg.num_experts
        loads_LE = torch.zeros(L, E, dtype=torch.int64, device=self.device)
        totals = torch.zeros(3, dtype=torch.float32, device=self.device)
        if self.tracer is not None:
            self.tracer.begin_step(self.device)
        for m in range(cfg.grad_accum):
            x_BS, y_BS = self.micro_batch(m)
            try:
                with self.autocast():
                    out = model(x_BS, y_BS)
            except NonFiniteLogits:  # the router refuses NaN/inf logits: diverged
                totals.fill_(float("nan"))  # every process learns it from the loss
                break
            (out.loss / cfg.grad_accum).backward()
            totals += torch.stack([out.loss.detach(), out.lm_loss.detach(),
                                   out.router_loss.detach().float()])
            router_timers.append(out.router_timer)
            if L:
                loads_LE += out.loads_LE
            if self.tracer is not None:
                self.tracer.add_micro_batch(out.routings, m * cfg.batch_size)
            if m == 0 and cfg.optimal_gap and (self.step == 0
                                               or (self.step + 1) % cfg.eval_every == 0):
                gap_start = time.perf_counter()  # a measurement, not part of the step's time
                gaps = optimal_score_gaps(out.routings)
                start += time.perf_counter() - gap_start
        loss, lm_loss, aux_loss = (self.reduce_losses(totals) / cfg.grad_accum).tolist()
        lr = self.lr
        step = self.step + 1
        finite = math.isfinite(loss)
        grad_norm = float("nan")
        if finite:
            self.reduce_gradients()
            grad_norm = self.clip_gradients(cfg.clip if cfg.clip > 0 else float("inf"))
            finite = math.isfinite(grad_norm)  # never step into non-finite weights
        if finite:
            self.optimizer.step()
            self.scheduler.step()
            model.step_routers()
            self.step = step
        self._sync()
        seconds = time.perf_counter() - start
        router_seconds = sum((t.seconds for t in router_timers), 0.0)
        loads_np = self.reduce_loads(loads_LE).cpu().numpy()
        if self.tracker is not None and finite:
            routed_slots = cfg.global_batch * self.model_cfg.seq_len * self.model_cfg.top_k
            max_vio = self.tracker.record(loads_np, step=step, routed_slots=routed_slots)
            vio_layers = self.tracker.per_layer[-1].tolist()
            dropped_layers = self.tracker.dropped[-1].tolist()
        else:
            max_vio, vio_layers, dropped_layers = float("nan"), [], []
        tokens = cfg.global_batch * self.model_cfg.seq_len
        if not finite:
            if self.tracer is not None:
                self.tracer.discard_step()
            what = "loss" if not math.isfinite(loss) else "gradient norm"
            value = loss if not math.isfinite(loss) else grad_norm
            raise NonFiniteLoss(step, loss, f"training {what} is {value} (diverged)")
        if self.tracer is not None:
            self.tracer.end_step(step)
        self.last_loss = loss
        self.optimal_gaps.extend(gaps)
        self.tokens_seen += tokens
        self.train_seconds += seconds
        self.router_seconds += router_seconds
        return StepStats(step, loss, lm_loss, aux_loss, lr, grad_norm, tokens, seconds,
                         router_seconds, max_vio, vio_layers, loads_np, dropped_layers)

    def eval_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The fixed validation windows, ``batch_size`` at a time."""
        B = self.train_cfg.batch_size
        for i in range(0, len(self.eval_starts), B):
            yield windows_to_batch(
                self.corpus.val, self.eval_starts[i: i + B], self.model_cfg.seq_len, self.device
            )

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Validation loss and perplexity on the fixed windows, and MaxVio_global of their
        summed per-layer loads. Routers do not update (eval mode)."""
        start = time.perf_counter()
        self.model.eval()
        loss_sum, count = 0.0, 0
        try:
            for x_BS, y_BS in self.eval_batches():
                with self.autocast():
                    out = self.model(x_BS, y_BS)
                loss_sum += float(out.lm_loss) * y_BS.numel()
                count += y_BS.numel()
                if self.tracker is not None:
                    self.tracker.accumulate_global(self.reduce_loads(out.loads_LE).cpu().numpy(),
                                                   out.routed_slots)
        finally:
            self.model.train()
        val_loss = loss_sum / count
        record = {
            "type": "eval",
            "step": self.step,
            "val_loss": val_loss,
            "val_ppl": math.exp(min(val_loss, 700.0)),
            "max_vio_global_layers": (self.tracker.max_vio_global_per_layer().tolist()
                                      if self.tracker is not None else []),
            "eval_tokens": count,
            "eval_seconds": time.perf_counter() - start,
        }
        layers = record["max_vio_global_layers"]
        record["max_vio_global"] = float(np.mean(layers)) if layers else float("nan")
        self.evals.append(record)
        return record

    # ---------------------------------------------------------------- checkpoints
    def identity(self) -> dict[str, Any]:
        """What a checkpoint or finished run must share with this one to be continued
        (see :func:`moebal.train.rundir.compatibility_problems`)."""
        return {"model": self.model_cfg.to_dict(), "train": self.train_cfg.to_dict(),
                "data": self.data_identity()}

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly (:mod:`moebal.train.state`)."""
        return capture(self)

    def data_identity(self) -> dict[str, Any]:
        return self.corpus.identity()

    def load_state_dict(self, saved: dict[str, Any], source: str = "checkpoint") -> None:
        """Continue from ``saved``; ValueError (before anything is loaded) when it comes
        from another model, training config (up to RESUME_FREE_FIELDS) or corpus."""
        restore(self, saved, source)

    def save_checkpoint(self, path: Union[str, os.PathLike]) -> Path:
        """The state, checksummed and written atomically (:func:`rundir.save_checkpoint`)."""
        return save_checkpoint(path, self.state_dict())

    def load_checkpoint(self, path: Union[str, os.PathLike]) -> None:
        """Continue from a checkpoint; CheckpointError for a missing, truncated or damaged
        file, ValueError for one of another configuration."""
        saved = load_checkpoint(path, map_location=self.device)
        self.load_state_dict(saved, source=f"checkpoint {str(path)!r}")

    # ---------------------------------------------------------------- trace
    def trace(self) -> Optional[RoutingTrace]:
        if self.tracer is None:
            return None
        return self.tracer.to_trace(
            top_k=self.model_cfg.top_k,
            moe_layers=np.array([i for i, b in enumerate(self.model.blocks)
                                 if isinstance(b.ffn, MoELayer)]),
            balancer=self.model_cfg.balancer,
            preset=self.preset,
            capacity_factor=float(
                self.model_cfg.router_options.get("capacity_factor") or float("nan")
            ),
        )

    # ---------------------------------------------------------------- the loop
    def fit(self, progress: bool = True) -> TrainResult:
        """Train from ``self.step`` to ``train_cfg.steps``, evaluating, logging and
        checkpointing as configured; returns (and writes) the TrainResult.

        Checkpoints: every ``checkpoint_every`` steps, every ``checkpoint_interval_s``
        seconds, after the last step, and after the step in progress when SIGINT or
        SIGTERM arrives, which then raises :class:`RunInterrupted`.
        """
        from tqdm.auto import tqdm

        cfg = self.train_cfg
        run = self.run if self.is_main else None
        log = run.open_metrics() if run is not None else None
        wall_start = time.perf_counter() - self.wall_seconds
        last_checkpoint = time.monotonic()

        def write(record: dict[str, Any]) -> None:
            if log is not None:
                log.write(json.dumps(record) + "\n")
                log.flush()

        def checkpoint() -> None:
            self.wall_seconds = time.perf_counter() - wall_start
            if self.checkpoint_file is not None:
                self.save_checkpoint(self.checkpoint_file)
            if run is not None and self.tracer is not None:
                save_trace(run / "trace.npz", self.trace())

        desc = " ".join(x for x in (self.preset, self.model_cfg.balancer, f"seed {cfg.seed}") if x)
        bar = tqdm(total=cfg.steps, initial=self.step, desc=desc, unit="step",
                   disable=not progress, dynamic_ncols=True)
        try:
            with run_settings(cfg, self.device), StopSignals() as stop:
                while self.step < cfg.steps:
                    try:
                        stats = self.train_step()
                    except NonFiniteLoss as exc:
                        self.diverged_step, self.divergence = exc.step, exc.reason
                        write({"type": "diverged", "step": exc.step, "loss": exc.loss,
                               "reason": exc.reason})
                        bar.write(f"{exc.reason} at step {exc.step}: stopping")
                        break
                    step = self.step
                    if step % cfg.log_every == 0 or step == 1 or step == cfg.steps:
                        record = stats.record(self.tokens_seen, self.train_seconds)
                        write(record)
                        self.history.add(record)
                    for record in self.extra_records(stats):
                        write(record)
                    bar.update(1)
                    postfix = {"loss": f"{stats.loss:.3f}", "maxvio": f"{stats.max_vio_batch:.2f}",
                               "tok/s": f"{stats.tokens_per_s:,.0f}"}
                    if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                        ev = self.evaluate()
                        write(ev)
                        postfix["val_ppl"] = f"{ev['val_ppl']:.1f}"
                    bar.set_postfix(postfix, refresh=False)
                    every, interval = cfg.checkpoint_every, cfg.checkpoint_interval_s
                    signum, due = self.agree(
                        stop.signum or 0,
                        bool(interval) and time.monotonic() - last_checkpoint >= interval,
                    )
                    if step == cfg.steps or (every and step % every == 0) or due or signum:
                        checkpoint()
                        last_checkpoint = time.monotonic()
                    if signum and step < cfg.steps:
                        raise RunInterrupted(signum, step, self.checkpoint_file)
        finally:
            bar.close()
            if log is not None:
                log.close()
        self.wall_seconds = time.perf_counter() - wall_start
        result = self.result()
        if run is not None:
            run.write_json("result.json", result.to_dict())
        return result

    def result(self) -> TrainResult:
        last_eval = self.evals[-1] if self.evals else {}
        nan = float("nan")
        return TrainResult(
            steps=self.step,
            final_loss=self.last_loss,
            val_loss=last_eval.get("val_loss", nan),
            val_ppl=last_eval.get("val_ppl", nan),
            tokens=self.tokens_seen,
            train_seconds=self.train_seconds,
            wall_seconds=self.wall_seconds,
            tokens_per_s=self.tokens_seen / self.train_seconds if self.train_seconds else nan,
            router_time_share=(self.router_seconds / self.train_seconds
                               if self.train_seconds and self.train_cfg.router_timing else nan),
            params=self.model.num_params(),
            active_params=self.model.num_params(active=True),
            balancer=self.model_cfg.balancer,
            seed=self.train_cfg.seed,
            preset=self.preset,
            diverged_step=self.diverged_step,
            divergence=self.divergence,
            **balance_summary(self.tracker, last_eval, self.optimal_gaps),
            out_dir=str(self.out_dir) if self.out_dir is not None else None,
            model_config=self.model_cfg.to_dict(),
            train_config=self.train_cfg.to_dict(),
            data=self.data_identity(),
            evals=list(self.evals),
            series=self.history.series(self.evals),
            load_snapshots=self.history.load_snapshots(),
        )
