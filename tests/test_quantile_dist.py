"""Global-batch and histogram quantile balancing over a real two-rank gloo group: the
prices every rank ends with are those of one process holding all the tokens."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moebal.routing import Router, RouterConfig
from moebal.routing.balancers.quantile import QuantileBalancer

E, K, STEPS = 8, 2, 3
# uneven shards: rank 0 holds 3 micro-batches of 20 tokens, rank 1 two of 13 and 7
SHARDS = {0: (20, 20, 20), 1: (13, 7)}
MODES = {"global_batch": QuantileBalancer.Config(mode="global_batch", ema=0.3),
         "histogram": QuantileBalancer.Config(mode="histogram", bins=100, margin=1.5)}


def micro_batches(rank, step):
    gen = torch.Generator().manual_seed(1000 * step + rank)
    skew = torch.arange(E, dtype=torch.float32) * 0.4
    return [torch.randn(T, E, generator=gen) * 1.5 + skew for T in SHARDS[rank]]


def run(mode, ranks, group=None):
    """The betas after each step, and the experts chosen, of a router fed ``ranks``' tokens."""
    router = Router(RouterConfig(num_experts=E, top_k=K, balancer=MODES[mode]), group=group)
    router.step()
    betas, chosen = [], []
    for step in range(STEPS):
        for r in ranks:
            chosen += [router(b).indices_TK for b in micro_batches(r, step)]
        router.step()
        betas.append(router.balancer.beta_E.clone())
    return betas, chosen


def worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        result = {mode: run(mode, [rank], dist.group.WORLD) for mode in MODES}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_tokens_give_the_prices_of_one_process_holding_them_all(tmp_path):
    world = 2
    mp.spawn(worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for mode in MODES:
        betas, chosen = run(mode, [0, 1])
        for r in range(world):
            assert all(torch.equal(a, b) for a, b in zip(res[r][mode][0], betas)), (mode, r)
        # and every token was routed as the single process routes it
        per_rank = {0: [], 1: []}
        n0 = len(SHARDS[0])
        for step in range(STEPS):
            block = chosen[step * (n0 + len(SHARDS[1])):(step + 1) * (n0 + len(SHARDS[1]))]
            per_rank[0] += block[:n0]
            per_rank[1] += block[n0:]
        for r in range(world):
            assert all(torch.equal(a, b) for a, b in zip(res[r][mode][1], per_rank[r])), mode
        assert not torch.equal(betas[-1], torch.zeros(E))  # the prices did move
