"""Other processes on the GPU are detected (NVML through torch, else nvidia-smi), our own
left out, and recorded in a comparison's environment at its start and at every save."""

from __future__ import annotations

import json
import os
import subprocess
import types

import pytest
import torch

import moebal.report.runner as runner
from moebal.report.compare import make_plan, run_comparison
from moebal.train import device_info
from moebal.train.device_info import (
    exclude_own,
    merge_processes,
    other_gpu_processes,
    parse_smi,
    parse_torch_listing,
)

ME = os.getpid()
UUID = "GPU-1b2c3d4e-0000-1111-2222-333344445555"


def test_torch_listing_is_parsed_and_its_messages_are_not_a_listing():
    text = ("GPU:0\nprocess       4242 uses     1536.000 MB GPU memory\n"
            "process         17 uses       12.500 MB GPU memory")
    assert parse_torch_listing(text) == [{"pid": 4242, "used_memory_mib": 1536.0},
                                         {"pid": 17, "used_memory_mib": 12.5}]
    assert parse_torch_listing("GPU:1\nno processes are running") == []
    assert parse_torch_listing("pynvml module not found, please install nvidia-ml-py") is None
    assert parse_torch_listing("GPU:0\nsomething else") is None


def test_smi_csv_is_parsed_and_filtered_to_our_gpu():
    text = (f"4242, 1536, {UUID}\n"
            "17, [N/A], GPU-ffffffff-0000-1111-2222-333344445555\n"
            f"99, [Not Supported], {UUID}\n")
    assert parse_smi(text) == [{"pid": 4242, "used_memory_mib": 1536.0},
                               {"pid": 17, "used_memory_mib": None},
                               {"pid": 99, "used_memory_mib": None}]
    mine = [{"pid": 4242, "used_memory_mib": 1536.0}, {"pid": 99, "used_memory_mib": None}]
    assert parse_smi(text, UUID) == mine
    assert parse_smi(text, UUID[4:].upper()) == mine  # torch spells it without "GPU-"
    assert parse_smi("") == []
    assert parse_smi("No running processes found") is None


def test_our_own_process_is_left_out():
    listed = [{"pid": ME, "used_memory_mib": 900.0}, {"pid": 5, "used_memory_mib": 10.0}]
    assert exclude_own(listed, {ME}, holds_memory=True) == [listed[1]]
    assert exclude_own(listed, {ME}, holds_memory=False) == [listed[1]]
    host_pid = [{"pid": 123456, "used_memory_mib": 900.0}]  # us, as the host names us
    assert exclude_own(host_pid, {ME}, holds_memory=True) == []
    assert exclude_own(host_pid, {ME}, holds_memory=False) == host_pid
    two = host_pid + [{"pid": 654321, "used_memory_mib": 5.0}]
    assert exclude_own(two, {ME}, holds_memory=True) is None  # which one is us?


def test_no_cuda_means_no_other_process():
    assert other_gpu_processes("cpu") == []
    if not torch.cuda.is_available():
        assert other_gpu_processes("cuda") == [] and device_info.device_count() == 0


@pytest.fixture
def fake_gpu(monkeypatch):
    """CUDA "available" without pynvml, nvidia-smi answering what ``smi.answer`` says."""
    smi = types.SimpleNamespace(answer=None, calls=[])

    def run(cmd, **kwargs):
        smi.calls.append(cmd)
        if isinstance(smi.answer, BaseException):
            raise smi.answer
        rc, out = smi.answer
        return subprocess.CompletedProcess(cmd, rc, stdout=out, stderr="")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "list_gpu_processes",
                        lambda device=None: "pynvml module not found, please install nvidia-ml-py")
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(uuid=UUID[4:]))
    monkeypatch.setattr(device_info.subprocess, "run", run)
    return smi


def test_nvidia_smi_answers_when_nvml_cannot(fake_gpu):
    fake_gpu.answer = (0, f"{ME}, 800, {UUID}\n31337, 20000, {UUID}\n"
                          "8, 1, GPU-ffffffff-0000-1111-2222-333344445555\n")
    assert other_gpu_processes("cuda") == [{"pid": 31337, "used_memory_mib": 20000.0}]
    assert fake_gpu.calls[0][0] == "nvidia-smi"
    fake_gpu.answer = (0, f"{ME}, 800, {UUID}\n")
    assert other_gpu_processes("cuda:0") == []


@pytest.mark.parametrize("answer", [FileNotFoundError("nvidia-smi"), (9, "NVIDIA-SMI has failed"),
                                    subprocess.TimeoutExpired("nvidia-smi", 20)])
def test_it_cannot_tell_when_nothing_answers(fake_gpu, answer):
    fake_gpu.answer = answer
    assert other_gpu_processes("cuda") is None


def test_nvml_through_torch_is_asked_first(fake_gpu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "list_gpu_processes", lambda device=None: (
        f"GPU:{device}\nprocess {ME:>10d} uses 100.000 MB GPU memory\n"
        "process       2024 uses 5.000 MB GPU memory"))
    assert other_gpu_processes("cuda") == [{"pid": 2024, "used_memory_mib": 5.0}]
    assert fake_gpu.calls == []


def test_merging_what_several_queries_saw():
    a, b = {"pid": 1, "used_memory_mib": 5.0}, {"pid": 2, "used_memory_mib": None}
    assert merge_processes([a], [b, dict(a, used_memory_mib=9.0)]) == [a, b]
    assert merge_processes([], []) == []
    assert merge_processes(None, []) is None and merge_processes([], None) is None
    assert merge_processes(None, [b]) == [b] and merge_processes([a], None) == [a]


def test_the_environment_names_the_devices_and_the_other_processes(fake_gpu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "Fake GPU")
    fake_gpu.answer = (0, f"31337, 20000, {UUID}\n")
    env = runner.environment("cuda")
    assert env["device_count"] == 2 and env["device_name"] == "Fake GPU"
    assert env["gpu_other_processes"] == [{"pid": 31337, "used_memory_mib": 20000.0}]
    assert runner.environment("cpu")["gpu_other_processes"] == []


def test_a_comparison_keeps_every_other_process_seen_at_any_save(tmp_path, monkeypatch):
    seen = iter([[], [], [{"pid": 7, "used_memory_mib": 1.0}], []])
    monkeypatch.setattr(runner, "other_gpu_processes", lambda device: next(seen, []))
    monkeypatch.setattr(runner, "resolve_corpus", lambda data, progress=True: None)
    monkeypatch.setattr(runner, "experiment_config", lambda plan, corpus: {"test": True})
    monkeypatch.setattr(runner, "train_one", lambda plan, method, seed, corpus, out, **kw: {
        "method": method, "seed": seed, "status": "ok"})
    plan = make_plan(balancers="none,aux_loss", preset="micro", steps=1, data="unused",
                     device="cpu", command="test")
    out = tmp_path / "cmp"
    results = run_comparison(plan, out, progress=False, report=False)
    expected = [{"pid": 7, "used_memory_mib": 1.0}]  # seen after the first run, gone later
    assert results["environment"]["gpu_other_processes"] == expected
    on_disk = json.loads((out / "results.json").read_text())["environment"]
    assert on_disk["gpu_other_processes"] == expected and on_disk["device_count"] >= 0
