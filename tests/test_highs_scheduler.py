"""HiGHS keeps one thread scheduler per process: whatever started it first (the user's own
highspy code, with any thread count), moebal's HiGHS paths must still solve."""

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import sys
    import highspy
    import numpy as np
    import torch

    # the user's own model first, which starts the process's scheduler
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    if sys.argv[1] != "default":
        h.setOptionValue("threads", int(sys.argv[1]))
    h.addVars(2, np.zeros(2), np.full(2, 4.0))
    h.changeColsCost(2, np.array([0, 1], dtype=np.int32), np.array([-1.0, -2.0]))
    h.addRows(1, np.array([-highspy.kHighsInf]), np.array([5.0]), 2,
              np.array([0], dtype=np.int32), np.array([0, 1], dtype=np.int32), np.ones(2))
    h.run()
    assert h.getModelStatus() == highspy.HighsModelStatus.kOptimal

    from moebal.routing import Router, RouterConfig
    from moebal.schedule import build_placement, solve_schedule

    torch.manual_seed(0)
    logits = torch.randn(64, 8)
    flow = Router(RouterConfig(num_experts=8, top_k=2, balancer="optimal"))(logits)
    lp = Router(RouterConfig(num_experts=8, top_k=2, balancer="optimal",
                             optimal_solver="highs"))(logits)
    assert torch.equal(flow.loads_E, lp.loads_E), (flow.loads_E, lp.loads_E)

    placement = build_placement("symmetric", 8, 16, 4, seed=0)
    loads = np.random.default_rng(0).integers(0, 500, size=16)
    ours = solve_schedule(placement, loads)
    ref = solve_schedule(placement, loads, method="highs")
    assert ours.makespan == ref.makespan, (ours.makespan, ref.makespan)
    print("ok")
    """
)


@pytest.mark.parametrize("threads", ["default", "1", "2", "3"])
def test_highs_paths_work_whatever_started_the_scheduler(threads):
    # a fresh process: the scheduler lives as long as the process
    out = subprocess.run([sys.executable, "-c", SCRIPT, threads], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
