"""moebal's scheduled replicated experts as a torchtitan token dispatcher, on gloo/CPU.

Each rank runs a stack of two torchtitan ``MoE`` blocks whose dispatcher is
``ScheduledTokenDispatcher`` on its share of a global batch; the result must be the
single-process model's on the whole batch (loss and every gradient), and the replicas of
each expert must stay identical over optimizer steps.
"""

import functools

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("torchtitan")

from torchtitan.models.common.config_utils import (  # noqa: E402
    make_moe_config,
    make_routed_experts_config,
    make_router_config,
)

from moebal.integrations.torchtitan import (  # noqa: E402
    ScheduledTokenDispatcher,
    place_experts,
    scheduled_dispatchers,
    sync_replica_grads,
    use_scheduled_dispatcher,
)
from moebal.integrations.torchtitan.dispatcher import (  # noqa: E402
    EXPERT_WEIGHTS,
    local_experts,
    unscheduled_makespan,
)
from moebal.parallel import spawn  # noqa: E402
from moebal.schedule import build_placement  # noqa: E402

D, F, E, K = 16, 8, 8, 2
TOKENS_PER_RANK = 24
STEPS = 3
BLOCKS = 2
LR = 1e-2
_INIT = {"weight": functools.partial(nn.init.normal_, std=0.5)}
_EXPERT_INIT = {n: functools.partial(nn.init.normal_, std=0.2) for n in EXPERT_WEIGHTS}


def moe_config(**dispatch):
    config = make_moe_config(
        num_experts=E, load_balance_coeff=None,
        router=make_router_config(dim=D, num_experts=E, gate_param_init=_INIT, top_k=K,
                                  score_func="softmax", route_norm=True),
        routed_experts=make_routed_experts_config(dim=D, hidden_dim=F, num_experts=E, top_k=K,
                                                  param_init=_EXPERT_INIT,
                                                  comm_backend="standard"))
    if dispatch:
        assert use_scheduled_dispatcher(config, **dispatch) == 1
    return config


def stack(seed=0, **dispatch):
    torch.manual_seed(seed)
    blocks = nn.Sequential(*[moe_config(**dispatch).build() for _ in range(BLOCKS)])
    for block in blocks:
        block.init_states(buffer_device=torch.device("cpu"))
    return blocks


def global_batch(world, step):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(world, TOKENS_PER_RANK, D, generator=g)
    x[:, :, :4] += 1.5  # skewed routing, so that placement and schedule matter
    return x, torch.randn(world, TOKENS_PER_RANK, D, generator=g)


def ep_worker(rank, world, placement, slots):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    reference = stack()  # the single-process model, on the whole batch
    model = stack(placement=placement, slots_per_rank=slots,
                  placement_loads=[1 + 3 * (e < 2) for e in range(E)])
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    records = []
    for _, dispatcher in scheduled_dispatchers(model):
        dispatcher.wire_meshes(ep_mesh=mesh)
        dispatcher.record_into(records)
    place_experts(model)
    mine = [d.experts for _, d in scheduled_dispatchers(model)]
    opt_ref = torch.optim.SGD(reference.parameters(), lr=LR)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    report = {"experts": mine[0], "steps": []}
    for step in range(STEPS):
        x, w = global_batch(world, step)
        opt_ref.zero_grad()
        opt.zero_grad()
        loss_ref = (reference(x.reshape(1, -1, D)) * w.reshape(1, -1, D)).sum()
        loss_ref.backward()
        loss = (model(x[rank:rank + 1]) * w[rank:rank + 1]).sum()
        loss.backward()
        sync_replica_grads(model)
        for name, p in model.named_parameters():
            if not name.endswith(EXPERT_WEIGHTS):  # replicated parameters: the usual DP sum
                dist.all_reduce(p.grad)
        total = loss.detach().clone()
        dist.all_reduce(total)
        # every gradient against the reference's (an expert's rows: the experts held here)
        ref_params = dict(reference.named_parameters())
        worst = (0.0, "")
        for name, p in model.named_parameters():
            ref_grad = ref_params[name].grad
            if name.endswith(EXPERT_WEIGHTS):
                ref_grad = ref_grad[mine[int(name.split(".")[0])]]
            err = float((p.grad - ref_grad).abs().max() / ref_grad.abs().max())
            worst = max(worst, (err, name))
        opt_ref.step()
        opt.step()
        report["steps"].append({"loss": float(total), "loss_ref": float(loss_ref.detach()),
                                "grad_rel_err": worst})
    # replicas identical: every rank's rows of each expert, gathered
    for layer, (experts, dispatcher) in enumerate(scheduled_dispatchers(model)):
        for name in EXPERT_WEIGHTS:
            full = torch.zeros((E,) + tuple(getattr(experts.inner_experts, name).shape[1:]))
            full[mine[layer]] = getattr(experts.inner_experts, name).detach()
            gathered = [torch.zeros_like(full) for _ in range(world)]
            dist.all_gather(gathered, full)
            for e in range(E):
                holders = [g for g in range(world) if e in local_experts(dispatcher.placement, g)]
                for g in holders[1:]:
                    assert torch.equal(gathered[g][e], gathered[holders[0]][e]), (layer, name, e)
            ref_w = dict(reference.named_parameters())[f"{layer}.routed_experts.inner_experts.{name}"]
            report.setdefault("weight_rel_err", 0.0)
            err = float((getattr(experts.inner_experts, name) - ref_w[mine[layer]]).abs().max()
                        / ref_w.abs().max())
            report["weight_rel_err"] = max(report["weight_rel_err"], err)
    report["records"] = [vars(r) for r in records]
    return report


def titan_ep_worker(rank, world):
    """torchtitan's own EP (AllToAllTokenDispatcher, E / EP contiguous experts per rank) and
    the scheduled dispatcher with one replica per expert, forward and backward."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torchtitan.distributed.utils import set_spmd_backend

    # the default "spmd_types" backend takes its EP group from the mesh that torchtitan's
    # ParallelDims registers; without one, the EP dispatcher uses ep_mesh (its DTensor path)
    set_spmd_backend("partial_dtensor")
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    x, w = global_batch(world, 0)
    out = {}
    for kind in ("torchtitan", "moebal"):
        model = stack(**({} if kind == "torchtitan" else {"placement": "standard"}))
        rows_of_block = []
        for block in model:
            dispatcher = block.routed_experts.token_dispatcher
            dispatcher.wire_meshes(ep_mesh=mesh)
            if kind == "torchtitan":  # torchtitan's Shard(0) layout, as local rows
                rows = list(range(rank * E // world, (rank + 1) * E // world))
                inner = block.routed_experts.inner_experts
                for name in EXPERT_WEIGHTS:
                    full = getattr(inner, name)
                    setattr(inner, name, nn.Parameter(full.detach()[rows].clone()))
            else:
                rows = dispatcher.experts
            rows_of_block.append(rows)
        if kind == "moebal":
            place_experts(model)
        y = model(x[rank:rank + 1])
        (y * w[rank:rank + 1]).sum().backward()
        grads = {}
        for name, p in model.named_parameters():
            g = p.grad
            if name.endswith(EXPERT_WEIGHTS):  # back to [E, ...], summed over ranks
                full = g.new_zeros((E,) + tuple(g.shape[1:]))
                full[rows_of_block[int(name.split(".")[0])]] = g
                g = full
            g = g.clone()
            dist.all_reduce(g)
            grads[name] = g
        out[kind] = (y.detach(), grads)
    (y_t, g_t), (y_m, g_m) = out["torchtitan"], out["moebal"]
    return {"out_err": float((y_t - y_m).abs().max()),
            "grad_err": max(float((g_t[n] - g_m[n]).abs().max() / g_t[n].abs().max())
                            for n in g_t)}


@pytest.mark.slow
def test_scheduled_dispatcher_equals_torchtitans_ep_on_gloo():
    for report in (r.value for r in spawn(titan_ep_worker, 2, timeout_s=240)):
        assert report["out_err"] < 1e-6 and report["grad_err"] < TOL, report


# bf16 expert matmuls: the same tokens grouped differently round differently
TOL = 3e-2


@pytest.mark.slow
@pytest.mark.parametrize("world, placement, slots", [
    (2, "standard", 4), (2, "symmetric", 8), (4, "symmetric", 4), (4, "asymmetric", 3),
])
def test_scheduled_ep_equals_single_process(world, placement, slots):
    results = spawn(ep_worker, world, (placement, slots), timeout_s=240)
    reports = [r.value for r in results]
    built = build_placement(placement, world, E, slots,
                            loads_E=np.array([1 + 3 * (e < 2) for e in range(E)]))
    for rank, report in enumerate(reports):
        assert report["experts"] == local_experts(built, rank)
        assert len(report["experts"]) <= slots
        for step in report["steps"]:
            assert step["loss"] == pytest.approx(step["loss_ref"], rel=TOL, abs=TOL)
            assert step["grad_rel_err"][0] < TOL, step
        assert report["weight_rel_err"] < TOL
        # one record per block and step, the same on every rank
        assert len(report["records"]) == BLOCKS * STEPS
        assert report["records"] == reports[0]["records"]
    for record in reports[0]["records"]:
        assert record["tokens"] == world * TOKENS_PER_RANK * K
        assert record["lower_bound"] <= record["makespan"] <= record["makespan_unscheduled"]
        assert 0 <= record["tokens_moved"] <= record["tokens"]
    if world == 4:  # replicas over 4 ranks: the schedule beats a fixed replica per source
        assert any(r["makespan"] < r["makespan_unscheduled"] for r in reports[0]["records"])


# -- the parts that need no process group ----------------------------------------------------
def test_without_ep_mesh_it_is_torchtitans_local_dispatch():
    ref, model = stack(), stack(placement="symmetric", slots_per_rank=4)
    assert all(isinstance(d, ScheduledTokenDispatcher) for _, d in scheduled_dispatchers(model))
    x = torch.randn(2, 12, D)
    assert torch.equal(model(x), ref(x))


def test_unscheduled_makespan_and_local_experts():
    placement = build_placement("symmetric", 4, E, 4)
    loads_GE = np.ones((4, E), dtype=np.int64)
    held = [local_experts(placement, g) for g in range(4)]
    assert all(len(h) == 4 for h in held)
    assert sorted(e for h in held for e in h) == sorted(list(range(E)) * 2)
    assert unscheduled_makespan(placement, loads_GE) >= loads_GE.sum() // 4


def test_dispatcher_config_refusals():
    with pytest.raises(ValueError, match="placement must be one of"):
        ScheduledTokenDispatcher.Config(num_experts=E, top_k=K, placement="nope").build()
    with pytest.raises(ValueError, match="slots_per_rank"):
        ScheduledTokenDispatcher.Config(num_experts=E, top_k=K, slots_per_rank=0).build()
