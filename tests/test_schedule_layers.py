"""The schedule package: one-way module layers, the public slot index, derived structures."""

import ast
import importlib
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import moebal.schedule
from moebal.schedule import Placement, SlotIndex, build_placement, solve_schedule

# each module may import only the modules before it
LAYERS = ["placement", "loads", "bounds", "flow", "locality", "highs", "solve", "placements"]


def _schedule_imports(path: Path) -> set[str]:
    """moebal.schedule modules imported anywhere in the file (function bodies included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[:2] == ["moebal", "schedule"] and len(parts) > 2:
                out.add(parts[2])
    return out


def test_modules_import_only_earlier_layers_and_no_private_names():
    root = Path(moebal.schedule.__file__).parent
    files = [p for p in root.rglob("*.py") if p.name != "__init__.py" or p.parent != root]
    for path in files:
        rel = path.relative_to(root).parts
        layer = LAYERS.index(rel[0].removesuffix(".py"))
        for dep in _schedule_imports(path) - {rel[0].removesuffix(".py")}:
            assert LAYERS.index(dep) < layer, f"{path.name} imports the later layer {dep}"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("moebal"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name} imports {private} from {node.module}"


def test_every_module_imports_on_its_own():
    for name in LAYERS:
        importlib.import_module(f"moebal.schedule.{name}")


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_slot_index_lists_every_replica_once(data):
    G = data.draw(st.integers(1, 6))
    sets = data.draw(
        st.lists(st.sets(st.integers(0, G - 1), min_size=1, max_size=G), min_size=1, max_size=8)
    )
    p = Placement(G, max(sum(g in s for s in sets) for g in range(G)) or 1, tuple(map(tuple, sets)))
    idx = p.slots
    assert isinstance(idx, SlotIndex) and idx.num_slots == sum(len(s) for s in sets)
    assert [(int(e), int(g)) for e, g in zip(idx.expert_N, idx.gpu_N)] == [
        (e, g) for e, s in enumerate(p.gpus_of_expert) for g in s
    ]
    assert np.array_equal(idx.replicas_E, p.replicas_E)
    assert np.array_equal(idx.start_E, np.concatenate([[0], np.cumsum(p.replicas_E)[:-1]]))
    assert np.array_equal(idx.key_N, idx.expert_N * G + idx.gpu_N)
    by_gpu = list(zip(idx.gpu_N[idx.by_gpu_N].tolist(), idx.expert_N[idx.by_gpu_N].tolist()))
    assert by_gpu == sorted(by_gpu)
    assert (idx.rot_N < idx.rep_N).all()
    for e in range(p.num_experts):  # rotations of one expert are a permutation of its slots
        run = idx.rot_N[idx.expert_N == e]
        assert sorted(run.tolist()) == list(range(len(run)))
    assert not idx.gpu_N.flags.writeable


def test_derived_structures_are_built_once_per_placement():
    p = build_placement("symmetric", 8, 16, 4, seed=0)
    calls = []

    def build(placement):
        calls.append(placement)
        return object()

    first = p.derived("test", build)
    assert p.derived("test", build) is first and calls == [p]
    # skewed experts, uniform sources: the exact min-cost flow runs, on a layout kept by p
    rng = np.random.default_rng(0)
    w = 1 / np.arange(1, 17) ** 1.5
    loads_E = rng.multinomial(8 * 256, w / w.sum())
    loads_RE = np.stack([rng.multinomial(int(n), np.full(8, 1 / 8)) for n in loads_E], 1)
    fresh = [solve_schedule(build_placement("symmetric", 8, 16, 4, seed=0), loads_RE)]
    again = [solve_schedule(p, loads_RE) for _ in range(2)]
    for s in fresh + again:
        assert np.array_equal(s.sends, fresh[0].sends) and s.tokens_moved == fresh[0].tokens_moved
        assert s.tokens_moved == solve_schedule(p, loads_RE, method="highs").tokens_moved
