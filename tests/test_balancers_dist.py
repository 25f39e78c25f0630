"""Balancers over a real two-rank gloo group: the state every rank ends with is the one a
single process computes from all ranks' loads."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moebal.routing import Router, RouterConfig

E, K, T = 6, 2, 24


def batches(rank):
    gen = torch.Generator().manual_seed(100 + rank)
    skew = torch.arange(E, dtype=torch.float32) * 0.4
    return [torch.randn(T, E, generator=gen) + skew for _ in range(2)]


def worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        group = dist.group.WORLD
        result = {}
        for name in ("loss_free", "quantile", "global_aux_loss"):
            options = {"aux_loss_coeff": 1.0} if name == "global_aux_loss" else {}
            router = Router(RouterConfig(num_experts=E, top_k=K, balancer=name, **options),
                            group=group)
            router.step()  # explicit steps
            outs = [router(b) for b in batches(rank)]
            result[name + "_aux"] = outs[-1].aux_loss.detach()
            result[name + "_idx"] = [o.indices_TK for o in outs]
            router.step()
            result[name + "_state"] = {k: v.clone() for k, v in router.state_dict().items()}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_loads_and_estimates_are_all_reduced_over_the_group(tmp_path):
    world = 2
    mp.spawn(worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    # every rank ends with the same state
    for name in ("loss_free", "quantile", "global_aux_loss"):
        a, b = res[0][name + "_state"], res[1][name + "_state"]
        assert all(torch.equal(a[k], b[k]) for k in a), name

    # loss-free: one sign step from the loads of both ranks and both micro-batches
    loads = torch.zeros(E)
    for r in range(world):
        for idx in res[r]["loss_free_idx"]:
            loads += torch.bincount(idx.flatten(), minlength=E)
    want = 1e-3 * torch.sign(loads.mean() - loads)
    assert torch.allclose(res[0]["loss_free_state"]["balancer.bias_E"], want)

    # quantile: the mean over ranks of each rank's micro-batch average, centred
    from moebal.routing.balancers.quantile import quantile_dual_update

    per_rank = []
    for r in range(world):
        est = [quantile_dual_update(b, torch.zeros(E), K)[1] for b in batches(r)]
        per_rank.append(torch.stack(est).mean(0))
    beta = torch.stack(per_rank).mean(0)
    beta -= beta.mean()
    assert torch.allclose(res[0]["quantile_state"]["balancer.beta_E"], beta, atol=1e-6)

    # global aux loss: f from the counts of both ranks (both micro-batches), P local
    counts = torch.zeros(E)
    for r in range(world):
        for idx in res[r]["global_aux_loss_idx"]:
            counts += torch.bincount(idx.flatten(), minlength=E)
    for r in range(world):
        P = torch.softmax(batches(r)[-1], -1).mean(0)
        want = E * (counts / (K * 2 * world * T) * P).sum()
        assert float(res[r]["global_aux_loss_aux"]) == pytest.approx(float(want), rel=1e-5)
