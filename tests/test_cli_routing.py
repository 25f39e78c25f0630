"""The routing demo and the router benchmark, run small from the command line."""

import json

import pytest

from moebal.cli import main


def test_demo_json_has_every_balancer(capsys):
    assert main(["demo", "--tokens", "256", "--experts", "8", "--batches", "3",
                 "--optimal-batches", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {r["balancer"]: r for r in out["results"]}
    assert set(rows) >= {"none", "aux_loss", "loss_free", "bip", "quantile", "sinkhorn",
                         "optimal"}
    assert rows["optimal"]["sup_max_vio"] == 0.0 and rows["optimal"]["batches"] == 2
    assert rows["bip"]["batches"] == 3 and len(rows["bip"]["max_vio_batch"]) == 3
    assert rows["none"]["max_vio_first"] > rows["bip"]["max_vio_first"]


def test_demo_table(capsys):
    assert main(["demo", "--tokens", "128", "--experts", "4", "--batches", "2",
                 "--balancers", "none", "bip"]) == 0
    out = capsys.readouterr().out
    assert "| bip |" in out and "SupMaxVio" in out


@pytest.mark.parametrize("argv", [["demo", "--top-k", "9", "--experts", "8"],
                                  ["demo", "--balancers", "nope"],
                                  ["demo", "--tokens", "10", "--seq-len", "3"],
                                  ["bench", "router", "--clock", "cpu", "--threads", "2"],
                                  ["bench", "router", "--repeats", "0"]])
def test_bad_arguments_are_one_line_errors(argv, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("moebal: error:")


def test_bench_router_json(capsys):
    assert main(["bench", "router", "--sizes", "256x8x2", "--repeats", "2", "--warmup", "1",
                 "--optimal-repeats", "1", "--threads", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    methods = [r["method"] for r in out["results"]]
    assert methods[0] == "softmax+topk" and "bip" in methods and "optimal" in methods
    base = [r for r in out["results"] if r["method"] == "softmax+topk"]
    assert all(r["ratio"] == pytest.approx(1.0) for r in base)
    assert all(r["median_ms"] > 0 for r in out["results"])
