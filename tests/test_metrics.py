import numpy as np
import pytest
import torch

from moebal.metrics import BalanceTracker, max_violation, max_violation_per_layer


def test_max_violation_definition():
    assert max_violation([4, 4, 4, 4]) == 0.0
    assert max_violation(torch.tensor([8, 0, 0, 0])) == pytest.approx(3.0)
    assert max_violation([6, 2, 2, 2]) == pytest.approx(6 / 3 - 1)
    assert max_violation([0, 0]) == 0.0


def test_bad_loads_raise():
    with pytest.raises(ValueError, match="-1"):
        max_violation([1, -1])
    with pytest.raises(ValueError):
        max_violation_per_layer([1, 2])


def test_tracker_aggregates():
    tr = BalanceTracker(num_layers=2)
    a = tr.record([[4, 4], [6, 2]])  # layer vio 0 and 0.5 -> 0.25
    b = tr.record([[8, 0], [4, 4]])  # 1.0 and 0 -> 0.5
    assert a == pytest.approx(0.25) and b == pytest.approx(0.5)
    assert tr.avg_max_vio == pytest.approx(0.375)
    assert tr.sup_max_vio == pytest.approx(0.5)
    tr.accumulate_global([[8, 0], [6, 2]])
    tr.accumulate_global([[0, 8], [2, 6]])
    assert tr.max_vio_global() == pytest.approx(0.0)
    assert np.isnan(tr.max_vio_global())
    clone = BalanceTracker(num_layers=2)
    clone.load_state_dict(tr.state_dict())
    assert np.array_equal(clone.history, tr.history) and clone.steps == tr.steps
    with pytest.raises(ValueError, match="3"):
        tr.record([[1, 1], [1, 1], [1, 1]])
