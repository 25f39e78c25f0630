"""Worker functions of tests/test_parallel.py, run on several processes by
``moebal.parallel.spawn``. Kept apart from the test module so that each worker process
imports only this light module (not pytest)."""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.distributed as dist

from moebal.model import MoEModel, ModelConfig
from moebal.parallel import ExpertParallel, ParallelConfig, Planner, RankPlan, all_to_all
from moebal.parallel.comm import all_gather_counts
from moebal.routing import BALANCERS, Balancer, register_balancer

# 4 ranks, EP size 2, 8 experts (4 per rank)
STANDARD = [[0, 2, 4, 6], [1, 3, 5, 7], [0, 2, 4, 6], [1, 3, 5, 7]]
# every EP group holds every expert, but the replica sets overlap across groups
OVERLAP = [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 4, 5], [2, 3, 6, 7]]

MODEL = dict(vocab_size=61, seq_len=16, d_model=16, n_layers=2, n_heads=2, num_experts=8,
             top_k=2, expert_hidden=8)


def model_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**MODEL, **overrides})


def global_batch(step: int = 0, batch: int = 8, seq: int = 12):
    g = torch.Generator().manual_seed(100 + step)
    tokens, targets = torch.randint(0, MODEL["vocab_size"], (2, batch, seq), generator=g)
    return tokens, targets


def shard(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    n = t.shape[0] // world
    return t[rank * n:(rank + 1) * n]


class SpreadPlanner(Planner):
    """A test schedule that splits every (source, expert) run over all replicas of the
    expert, so one source's tokens of one expert go to several ranks."""

    def __init__(self, layout):
        super().__init__(layout, "none")
        self.holds = layout.holds_GE()

    def full(self, loads_GE):
        G, E = loads_GE.shape
        send_GEG = np.zeros((G, E, G), dtype=np.int64)
        for s in range(G):
            for e in range(E):
                reps = np.flatnonzero(self.holds[:, e])
                reps = np.roll(reps, -s)  # different split order per source
                base, extra = divmod(int(loads_GE[s, e]), len(reps))
                for i, g in enumerate(reps):
                    send_GEG[s, e, g] = base + (i < extra)
        return send_GEG

    def plan(self, loads_GE, rank, layer=0):
        send_GEG = self.full(np.asarray(loads_GE))
        computed = send_GEG.sum((0, 1))
        unscheduled = super().plan(loads_GE, rank, layer).computed_unscheduled_G
        return RankPlan(send_GEG[rank], send_GEG[:, :, rank], computed, unscheduled)


def all_to_all_worker(rank, world):
    g = torch.Generator().manual_seed(7)
    splits = torch.randint(0, 4, (world, world), generator=g)  # rows rank s sends to d
    n = int(splits[rank].sum())
    # row value = 1000 * source + index, so the receiver can check what arrived
    x = (1000.0 * rank + torch.arange(n, dtype=torch.float64)).unsqueeze(1).repeat(1, 3)
    x.requires_grad_(True)
    y = all_to_all(x, splits[:, rank].tolist(), splits[rank].tolist())
    (y * (rank + 1)).sum().backward()  # d loss / d row = 1 + the rank it went to
    counts = all_gather_counts(torch.tensor([rank, 10 * rank]))
    return splits, y.detach(), x.grad, counts


def reference(config: ModelConfig, steps: int, lr: float = 1e-2, clip: float | None = None):
    """Single-process model on the global batches: losses, grads of step 0, final state."""
    torch.manual_seed(0)
    model = MoEModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses, grads = [], None
    for step in range(steps):
        tokens, targets = global_batch(step)
        out = model(tokens, targets)
        opt.zero_grad()
        out.loss.backward()
        if step == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        model.step_routers()
        losses.append(out.loss.item())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return losses, grads, state


def ep_worker(rank, world, config_dict, pconfig_kwargs, steps, lr, clip, spread):
    config = ModelConfig.from_dict(config_dict)
    torch.manual_seed(rank)  # different seeds: parallelize() must broadcast rank 0's weights
    model = MoEModel(config)
    ep = ExpertParallel.setup(ParallelConfig(**pconfig_kwargs), config.num_experts)
    if spread:
        ep.planner = SpreadPlanner(ep.layout)
    if rank == 0:  # rank 0 holds the reference initialisation
        torch.manual_seed(0)
        model = MoEModel(config)
    ep.parallelize(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses, grads, records = [], None, []
    for step in range(steps):
        tokens, targets = global_batch(step)
        out = model(shard(tokens, rank, world), shard(targets, rank, world))
        opt.zero_grad()
        out.loss.backward()
        ep.sync_gradients(model)
        if step == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        if clip is not None:
            ep.clip_grad_norm_(model, clip)
        opt.step()
        model.step_routers()
        loss = out.loss.detach().clone()
        dist.all_reduce(loss)
        losses.append(loss.item() / world)
        records += ep.step_records(step)
    local = {n: p.detach().clone() for n, p in model.named_parameters()}
    full = ep.full_state_dict(model)
    return dict(losses=losses, grads=grads, local_params=local, full_state=full,
                local_experts=ep.local_experts(), records=records,
                placement=[list(ep.layout.local_experts(r)) for r in range(world)],
                router_state=[r.state_dict() for r in model.routers()])


def failing_worker(rank, world, mode):
    config = model_config()
    torch.manual_seed(0)
    model = MoEModel(config)
    ep = ExpertParallel.setup(ParallelConfig(ep_size=2, placement=STANDARD, schedule="none"),
                              config.num_experts)
    ep.parallelize(model)
    tokens, targets = global_batch(0)
    if rank == 2:
        if mode == "raise":
            raise RuntimeError("data loader of rank 2 broke")
        time.sleep(6)  # "hang": longer than the collective timeout
    model(shard(tokens, rank, world), shard(targets, rank, world)).loss.backward()
    return "finished"


def bad_input_worker(rank, world, cases):
    """Try ``ParallelConfig``/``ExpertParallel.setup`` for each bad case; the errors seen."""
    seen = []
    for ep_size, num_experts, placement in cases:
        config = model_config(num_experts=num_experts)
        try:
            ExpertParallel.setup(
                ParallelConfig(ep_size=ep_size, placement=placement, schedule="none"),
                config.num_experts,
            )
            seen.append(("", "set up"))
        except Exception as exc:  # what each rank raised, compared by the test
            seen.append((type(exc).__name__, str(exc)))
    dist.barrier()  # every rank is still in step: no one is left in a collective
    return seen


# --- a stateful balancer that keeps its state in step with the data-parallel group --------

class SyncedBias(Balancer):
    """Loss-free-style expert bias for the tests: loads observed per batch, summed over
    the router's data-parallel group at ``step``, bias moved by the sign of the
    deviation (as the balancers of moebal.routing do with ``group``)."""

    def __init__(self, config):
        super().__init__(config)
        E = config.num_experts
        self.register_buffer("bias_E", torch.zeros(E))
        self.register_buffer("pending_E", torch.zeros(E))

    def selection_scores(self, scores_TE, ctx):
        return scores_TE + self.bias_E

    def observe(self, loads_E, ctx):
        self.pending_E += loads_E.float()

    def step(self, group=None):
        loads_E = self.pending_E.clone()
        if group is not None:
            dist.all_reduce(loads_E, group=group)
        self.bias_E += 0.05 * torch.sign(loads_E.mean() - loads_E)
        self.pending_E.zero_()


if "test_synced_bias" not in BALANCERS:
    register_balancer("test_synced_bias")(SyncedBias)


# --- training runs ----------------------------------------------------------------------

def train_worker(rank, world, model_cfg, train_cfg, out_dir, parallel, data, interrupt_at):
    """``train_parallel`` as torchrun would run it; with ``interrupt_at``, the run stops
    after that step on every rank and is resumed from its checkpoints."""
    from moebal.parallel.train import ParallelTrainer, train_parallel

    class Interrupt(Exception):
        pass

    if interrupt_at is not None:
        original = ParallelTrainer.extra_records

        def stop(self, stats):
            records = original(self, stats)
            if stats.step == interrupt_at:
                raise Interrupt
            return records

        ParallelTrainer.extra_records = stop
        try:
            train_parallel(model_cfg, train_cfg, out_dir, parallel, data, progress=False)
        except Interrupt:
            pass
        ParallelTrainer.extra_records = original
    result = train_parallel(model_cfg, train_cfg, out_dir, parallel, data, progress=False,
                            resume=interrupt_at is not None)
    return None if result is None else result.to_dict()
