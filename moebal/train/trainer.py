"""The training loop: AdamW, warmup + cosine, clipping, accumulation, balance metrics.

``train(model_cfg, train_cfg, out_dir, data=...)`` runs a whole run and returns a
:class:`TrainResult`; :class:`Trainer` holds the state of one run and exposes its parts —
``train_step()`` (one optimizer step), ``evaluate()``, ``state_dict()`` /
``load_state_dict()`` (checkpoints) and ``fit()`` (the loop with files and progress bar) —
so other runners (the balancer comparison, expert parallelism) reuse them.

One optimizer step:

1. ``grad_accum`` micro-batches of ``batch_size`` random windows: forward, backward of
   ``loss / grad_accum`` where loss = LM cross-entropy + the routers' losses;
2. ``reduce_gradients()`` (a no-op here; a data-parallel runner all-reduces), gradient
   clipping, ``optimizer.step()``, ``scheduler.step()``;
3. ``model.step_routers()`` — once per optimizer step, where the loss-free, BIP and
   quantile balancers update their state from the loads of all micro-batches;
4. the per-layer loads summed over the micro-batches go to ``BalanceTracker.record``
   (MaxVio_batch of the global batch).

Run folder (``out_dir``): ``config.json``, ``metrics.jsonl`` (one JSON record per line:
``type`` "train", "eval", "diverged"), ``checkpoint.pt``, ``trace.npz`` (with
``TrainConfig.trace``) and ``result.json`` (the :class:`TrainResult`). See docs/training.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np
import torch

from moebal.data import BatchSampler, Corpus, DataConfig, eval_windows, load_corpus
from moebal.data.batches import windows_to_batch
from moebal.metrics import BalanceTracker
from moebal.model import MoELayer, MoEModel, ModelConfig
from moebal.routing import NonFiniteLogits
from moebal.train.config import RESUME_FREE_FIELDS, TrainConfig
from moebal.train.trace import RoutingTrace, TraceRecorder, load_trace, save_trace

CHECKPOINT_VERSION = 1
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.pt", "trace.npz", "result.json")
DataLike = Union[Corpus, DataConfig, str, os.PathLike, None]


# --------------------------------------------------------------------------- helpers
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device")
    return torch.device(name)


def resolve_amp_dtype(name: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype, or None for plain fp32."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return torch.bfloat16 if name == "bf16" else None


class WarmupCosine:
    """LR multiplier: linear warmup to 1 over ``warmup`` steps, then cosine to min_lr/lr."""

    def __init__(self, steps: int, warmup: int, lr: float, min_lr: float) -> None:
        self.steps, self.warmup, self.floor = steps, warmup, min_lr / lr

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(1, self.steps - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay matrices and expert tensors; not norms, biases or embeddings
    (the output layer is tied to the embedding)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or id(p) in embeddings else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _atomic_write_bytes(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    _atomic_write_bytes(path, lambda fh: fh.write(json.dumps(obj, indent=1).encode()))


def read_metrics(path: Union[str, os.PathLike]) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl (a torn last line is skipped)."""
    records = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def resolve_corpus(data: DataLike, vocab_size: int = 8192, progress: bool = True) -> Corpus:
    """A loaded corpus from ``data`` (see :func:`train`); ``vocab_size`` is the BPE vocabulary
    trained when ``data`` is None or a path."""
    if isinstance(data, Corpus):
        return data
    if isinstance(data, DataConfig):
        return load_corpus(data, progress=progress)
    if data is None:
        return load_corpus(DataConfig(vocab_size=vocab_size), progress=progress)
    if isinstance(data, (str, os.PathLike)):
        return load_corpus(DataConfig(path=str(data), vocab_size=vocab_size), progress=progress)
    raise TypeError(f"data must be a Corpus, DataConfig, path or None, got {type(data).__name__}")


# --------------------------------------------------------------------------- results
@dataclass
class StepStats:
    """What one optimizer step measured."""

    step: int
    loss: float
    lm_loss: float
    aux_loss: float
    lr: float
    grad_norm: float
    tokens: int
    seconds: float
    router_seconds: float
    max_vio_batch: float
    max_vio_layers: list[float]
    loads_LE: np.ndarray
    finite: bool = True
    dropped_frac_layers: list[float] = field(default_factory=list)

    @property
    def dropped_frac(self) -> float:
        """Share of the step's token-slots capacity dropped, averaged over MoE layers."""
        return float(np.mean(self.dropped_frac_layers)) if self.dropped_frac_layers else float("nan")

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")

    @property
    def router_time_share(self) -> float:
        return self.router_seconds / self.seconds if self.seconds > 0 else float("nan")

    def record(self, total_tokens: int, elapsed: float) -> dict[str, Any]:
        return {
            "type": "train",
            "step": self.step,
            "loss": self.loss,
            "lm_loss": self.lm_loss,
            "aux_loss": self.aux_loss,
            "lr": self.lr,
            "grad_norm": self.grad_norm,
            "tokens_per_s": self.tokens_per_s,
            "step_seconds": self.seconds,
            "router_time_share": self.router_time_share,
            "max_vio_batch": self.max_vio_batch,
            "max_vio_batch_layers": self.max_vio_layers,
            "dropped_frac": self.dropped_frac,
            "dropped_frac_layers": self.dropped_frac_layers,
            "loads": self.loads_LE.tolist(),
            "tokens": total_tokens,
            "elapsed": elapsed,
        }


@dataclass
class TrainResult:
    """The summary of a run (also written as result.json).

    val_loss / val_ppl / max_vio_global come from the last evaluation; avg_max_vio and
    sup_max_vio aggregate MaxVio_batch over all steps; train_seconds sums the step times
    (no evaluation), wall_seconds includes evaluation and checkpointing. ``diverged_step``
    is the step whose loss was not finite (training stopped there), else None.
    """

    steps: int
    final_loss: float
    val_loss: float
    val_ppl: float
    max_vio_global: float
    avg_max_vio: float
    sup_max_vio: float
    max_vio_batch_first: float
    max_vio_batch_last: float
    tokens: int
    train_seconds: float
    wall_seconds: float
    tokens_per_s: float
    router_time_share: float
    params: int
    active_params: int
    balancer: str
    seed: int
    preset: str = ""
    diverged_step: Optional[int] = None
    dropped_frac: float = float("nan")
    out_dir: Optional[str] = None
    model_config: dict[str, Any] = field(default_factory=dict)
    train_config: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    evals: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainResult":
        return cls(**d)


def load_result(run_dir: Union[str, os.PathLike]) -> TrainResult:
    """The TrainResult of a finished run folder (its result.json)."""
    path = Path(run_dir) / "result.json"
    if not path.is_file():
        raise ValueError(f"{str(run_dir)!r} holds no finished run (no result.json)")
    return TrainResult.from_dict(json.loads(path.read_text()))


# --------------------------------------------------------------------------- trainer
class Trainer:
    """The state of one training run and the pieces of its loop.

    Construction seeds Python, NumPy and torch with ``train_cfg.seed``, builds the model,
    optimizer, schedule, batch sampler, BalanceTracker and (with ``trace``) the trace
    recorder. Nothing is written until ``fit()``; ``out_dir=None`` writes nothing at all.

    Subclasses (a data-parallel runner) override ``micro_batch`` (which rows this process
    computes), ``reduce_gradients``, ``reduce_loads``, ``reduce_losses``,
    ``clip_gradients``, ``extra_records`` and ``is_main``.
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        train_cfg: TrainConfig,
        corpus: Corpus,
        out_dir: Union[str, os.PathLike, None] = None,
        *,
        preset: str = "",
        model: Optional[MoEModel] = None,
    ) -> None:
        if not isinstance(model_cfg, ModelConfig):
            raise TypeError(f"model_cfg must be a ModelConfig, got {type(model_cfg).__name__}")
        if not isinstance(train_cfg, TrainConfig):
            raise TypeError(f"train_cfg must be a TrainConfig, got {type(train_cfg).__name__}")
        model_cfg.validate()
        train_cfg.validate()
        if corpus.vocab_size > model_cfg.vocab_size:
            raise ValueError(
                f"the tokenizer has {corpus.vocab_size} tokens but the model's vocab_size is "
                f"{model_cfg.vocab_size}"
            )
        self.model_cfg, self.train_cfg, self.corpus = model_cfg, train_cfg, corpus
        self.preset = preset
        self.out_dir = Path(out_dir) if out_dir is not None else None
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

        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, train_cfg.weight_decay),
            lr=train_cfg.lr,
            betas=(train_cfg.beta1, train_cfg.beta2),
            fused=fused or None,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            WarmupCosine(train_cfg.steps, train_cfg.warmup, train_cfg.lr, train_cfg.min_lr),
        )
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
        self.last_stats: Optional[StepStats] = None
        self.last_loss = float("nan")
        self.diverged_step: Optional[int] = None

    # ---------------------------------------------------------------- hooks
    @property
    def is_main(self) -> bool:
        """Whether this process writes the run folder (every process, when not distributed)."""
        return True

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
        parameters, optimizer and routers untouched and returns stats with ``finite=False``.
        """
        cfg = self.train_cfg
        model = self.model
        model.train()
        router_seconds = 0.0
        self._sync()
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
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
                totals.fill_(float("nan"))
                break
            (out.loss / cfg.grad_accum).backward()
            totals += torch.stack([out.loss.detach(), out.lm_loss.detach(),
                                   out.router_loss.detach().float()])
            router_seconds += out.router_seconds
            if L:
                loads_LE += out.loads_LE
            if self.tracer is not None:
                self.tracer.add_micro_batch(out.routings, m * cfg.batch_size)
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
        loads_np = self.reduce_loads(loads_LE).cpu().numpy()
        if self.tracker is not None and finite:
            routed_slots = cfg.global_batch * self.model_cfg.seq_len * self.model_cfg.top_k
            max_vio = self.tracker.record(loads_np, step=step, routed_slots=routed_slots)
            vio_layers = self.tracker.per_layer[-1].tolist()
            dropped_layers = self.tracker.dropped[-1].tolist()
        else:
            max_vio, vio_layers, dropped_layers = float("nan"), [], []
        tokens = cfg.global_batch * self.model_cfg.seq_len
        if self.tracer is not None:
            if finite:
                self.tracer.end_step(step)
            else:
                self.tracer.discard_step()
        if finite:
            self.last_loss = loss
            self.tokens_seen += tokens
            self.train_seconds += seconds
            self.router_seconds += router_seconds
        stats = StepStats(step, loss, lm_loss, aux_loss, lr, grad_norm, tokens, seconds,
                          router_seconds, max_vio, vio_layers, loads_np, finite, dropped_layers)
        self.last_stats = stats
        return stats

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
            "max_vio_global": (self.tracker.max_vio_global() if self.tracker is not None
                               else float("nan")),
            "eval_tokens": count,
            "eval_seconds": time.perf_counter() - start,
        }
        self.evals.append(record)
        return record

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly (see the module docstring)."""
        rng = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "format": CHECKPOINT_VERSION,
            "step": self.step,
            "preset": self.preset,
            "model_config": self.model_cfg.to_dict(),
            "train_config": self.train_cfg.to_dict(),
            "data": self.data_identity(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "tracker": self.tracker.state_dict() if self.tracker is not None else None,
            "rng": rng,
            "totals": {
                "tokens_seen": self.tokens_seen,
                "train_seconds": self.train_seconds,
                "router_seconds": self.router_seconds,
                "wall_seconds": self.wall_seconds,
                "last_loss": self.last_loss,
            },
            "evals": list(self.evals),
        }

    def data_identity(self) -> dict[str, Any]:
        return {
            "key": self.corpus.key,
            "vocab_size": self.corpus.vocab_size,
            "train_tokens": int(len(self.corpus.train)),
            "val_tokens": int(len(self.corpus.val)),
        }

    def check_compatible(self, state: dict[str, Any], source: str = "checkpoint") -> None:
        """ValueError unless ``state`` comes from a run with this model, training config
        (up to RESUME_FREE_FIELDS) and corpus."""
        if state.get("format") != CHECKPOINT_VERSION:
            raise ValueError(f"{source} has format {state.get('format')!r}, "
                             f"expected {CHECKPOINT_VERSION}")
        problems = []
        mine = self.model_cfg.to_dict()
        for k in sorted(set(mine) | set(state["model_config"])):
            if mine.get(k) != state["model_config"].get(k):
                problems.append(f"model {k}: {state['model_config'].get(k)!r} != {mine.get(k)!r}")
        mine = self.train_cfg.to_dict()
        for k in sorted(set(mine) | set(state["train_config"])):
            if k not in RESUME_FREE_FIELDS and mine.get(k) != state["train_config"].get(k):
                problems.append(f"train {k}: {state['train_config'].get(k)!r} != {mine.get(k)!r}")
        if state["data"] != self.data_identity():
            problems.append(f"data: {state['data']} != {self.data_identity()}")
        if problems:
            raise ValueError(
                f"{source} is from another configuration (saved != now): " + "; ".join(problems)
            )

    def load_state_dict(self, state: dict[str, Any], source: str = "checkpoint") -> None:
        self.check_compatible(state, source)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        if self.tracker is not None:
            self.tracker.load_state_dict(state["tracker"])
        self.step = int(state["step"])
        totals = state["totals"]
        self.tokens_seen = int(totals["tokens_seen"])
        self.train_seconds = float(totals["train_seconds"])
        self.router_seconds = float(totals["router_seconds"])
        self.wall_seconds = float(totals["wall_seconds"])
        self.last_loss = float(totals["last_loss"])
        self.evals = list(state["evals"])
        rng = state["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.model.set_auto_step(False)  # routers keep stepping explicitly (see __init__)

    def save_checkpoint(self, path: Union[str, os.PathLike]) -> Path:
        path = Path(path)
        state = self.state_dict()
        _atomic_write_bytes(path, lambda fh: torch.save(state, fh))
        return path

    def load_checkpoint(self, path: Union[str, os.PathLike]) -> None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"checkpoint {str(path)!r} does not exist")
        # our own file: it holds RNG states (numpy arrays), hence weights_only=False
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.load_state_dict(state, source=f"checkpoint {str(path)!r}")

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
    @contextlib.contextmanager
    def _run_context(self):
        """Deterministic algorithms on CPU and the thread count, restored afterwards."""
        was_det = torch.are_deterministic_algorithms_enabled()
        was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
        was_threads = torch.get_num_threads()
        try:
            if self.train_cfg.threads:
                torch.set_num_threads(self.train_cfg.threads)
            if self.train_cfg.deterministic and self.device.type == "cpu":
                torch.use_deterministic_algorithms(True, warn_only=True)
            yield
        finally:
            torch.set_num_threads(was_threads)
            torch.use_deterministic_algorithms(was_det, warn_only=was_warn)

    def _files(self) -> dict[str, Optional[Path]]:
        d = self.out_dir if self.is_main else None
        return {name: (d / name if d is not None else None) for name in RUN_FILES}

    def fit(self, progress: bool = True) -> TrainResult:
        """Train from ``self.step`` to ``train_cfg.steps``, evaluating, logging and
        checkpointing as configured; returns (and writes) the TrainResult."""
        from tqdm.auto import tqdm

        cfg = self.train_cfg
        files = self._files()
        if files["metrics.jsonl"] is not None:
            files["metrics.jsonl"].parent.mkdir(parents=True, exist_ok=True)
        metrics_file = files["metrics.jsonl"]
        log = open(metrics_file, "a", encoding="utf-8") if metrics_file is not None else None
        wall_start = time.perf_counter() - self.wall_seconds

        def write(record: dict[str, Any]) -> None:
            if log is not None:
                log.write(json.dumps(record) + "\n")
                log.flush()

        def checkpoint() -> None:
            self.wall_seconds = time.perf_counter() - wall_start
            if files["checkpoint.pt"] is not None:
                self.save_checkpoint(files["checkpoint.pt"])
            if files["trace.npz"] is not None and self.tracer is not None:
                save_trace(files["trace.npz"], self.trace())

        desc = " ".join(x for x in (self.preset, self.model_cfg.balancer, f"seed {cfg.seed}") if x)
        bar = tqdm(total=cfg.steps, initial=self.step, desc=desc, unit="step",
                   disable=not progress, dynamic_ncols=True)
        try:
            with self._run_context():
                while self.step < cfg.steps:
                    stats = self.train_step()
                    if not stats.finite:
                        self.diverged_step = stats.step
                        write({"type": "diverged", "step": stats.step, "loss": stats.loss})
                        bar.write(f"loss is {stats.loss} at step {stats.step}: stopping")
                        break
                    step = self.step
                    if step % cfg.log_every == 0 or step == 1 or step == cfg.steps:
                        write(stats.record(self.tokens_seen, self.train_seconds))
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
                    every = cfg.checkpoint_every
                    if step == cfg.steps or (every and step % every == 0):
                        checkpoint()
        finally:
            bar.close()
            if log is not None:
                log.close()
        self.wall_seconds = time.perf_counter() - wall_start
        result = self.result()
        if files["result.json"] is not None:
            write_json(files["result.json"], result.to_dict())
        return result

    def result(self) -> TrainResult:
        last_eval = self.evals[-1] if self.evals else {}
        vio = self.tracker.max_vio_batch if self.tracker is not None else np.zeros(0)
        nan = float("nan")
        return TrainResult(
            steps=self.step,
            final_loss=self.last_loss,
            val_loss=last_eval.get("val_loss", nan),
            val_ppl=last_eval.get("val_ppl", nan),
            max_vio_global=last_eval.get("max_vio_global", nan),
            avg_max_vio=self.tracker.avg_max_vio if self.tracker is not None else nan,
            sup_max_vio=self.tracker.sup_max_vio if self.tracker is not None else nan,
            max_vio_batch_first=float(vio[0]) if vio.size else nan,
            max_vio_batch_last=float(vio[-1]) if vio.size else nan,
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
            dropped_frac=self.tracker.dropped_frac if self.tracker is not None else nan,
            out_dir=str(self.out_dir) if self.out_dir is not None else None,
            model_config=self.model_cfg.to_dict(),
            train_config=self.train_cfg.to_dict(),
            data=self.data_identity(),
            evals=list(self.evals),
        )


# --------------------------------------------------------------------------- entry point
def _truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the records of steps <= last_step (what the checkpoint covers)."""
    if not path.is_file():
        return
    kept = [r for r in read_metrics(path) if int(r.get("step", 0)) <= last_step]
    text = "".join(json.dumps(r) + "\n" for r in kept)
    _atomic_write_bytes(path, lambda fh: fh.write(text.encode()))


def train(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    out_dir: Union[str, os.PathLike, None] = None,
    data: DataLike = None,
    *,
    preset: str = "",
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train one model and return its :class:`TrainResult`.

    model_cfg   the model; its ``vocab_size`` is replaced by the tokenizer's.
    train_cfg   the training run.
    out_dir     run folder (None: write nothing). A folder holding a run is refused unless
                ``resume`` (continue from its checkpoint.pt; a finished run returns at once;
                no checkpoint yet: start afresh) or ``force`` (start afresh, deleting it).
    data        a loaded :class:`Corpus` (reuse it across runs), a :class:`DataConfig`,
                a path (file, folder of .txt, JSONL), or None for the default corpus; for a
                path or None the BPE vocabulary is ``model_cfg.vocab_size``.

    All bad input (configs, data, a checkpoint from another configuration) raises
    ValueError/TypeError before the first step.
    """
    if not isinstance(model_cfg, ModelConfig):
        raise TypeError(f"model_cfg must be a ModelConfig, got {type(model_cfg).__name__}")
    if not isinstance(train_cfg, TrainConfig):
        raise TypeError(f"train_cfg must be a TrainConfig, got {type(train_cfg).__name__}")
    model_cfg.validate()
    train_cfg.validate()
    run_dir = Path(out_dir) if out_dir is not None else None
    existing = [n for n in RUN_FILES if run_dir is not None and (run_dir / n).exists()]
    if existing and not (resume or force):
        raise ValueError(
            f"{str(run_dir)!r} already holds a run ({', '.join(existing)}); "
            f"resume it with --resume or start over with --force"
        )
    corpus = resolve_corpus(data, vocab_size=model_cfg.vocab_size, progress=progress)
    model_cfg = dataclasses.replace(model_cfg, vocab_size=corpus.vocab_size)
    trainer = Trainer(model_cfg, train_cfg, corpus, run_dir, preset=preset)
    checkpoint = run_dir / "checkpoint.pt" if run_dir is not None else None
    if resume and checkpoint is not None and checkpoint.is_file():
        trainer.load_checkpoint(checkpoint)
        if trainer.step >= train_cfg.steps and (run_dir / "result.json").is_file():
            return load_result(run_dir)  # finished already
        _truncate_metrics(run_dir / "metrics.jsonl", trainer.step)
        trace_file = run_dir / "trace.npz"
        if trainer.tracer is not None and trace_file.is_file():
            trainer.tracer.load(load_trace(trace_file).truncate(trainer.step))
    elif run_dir is not None:
        for name in existing:
            (run_dir / name).unlink()
    if run_dir is not None:
        write_json(run_dir / "config.json", {
            "preset": preset,
            "model": model_cfg.to_dict(),
            "train": train_cfg.to_dict(),
            "data": {**trainer.data_identity(), "directory": str(corpus.directory),
                     "source": corpus.meta.get("data"), "tokenizer": corpus.meta.get("tokenizer")},
            "params": trainer.model.num_params(),
            "active_params": trainer.model.num_params(active=True),
        })
    return trainer.fit(progress=progress)
