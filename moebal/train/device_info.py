"""Who else computes on the training GPU: timings taken beside another process are not the
run's own.

:func:`other_gpu_processes` lists the other processes on a CUDA device (NVML through
``torch.cuda.list_gpu_processes`` when ``pynvml`` is installed, else ``nvidia-smi``), our
own process left out; :func:`device_count` the GPUs this process sees. A process listed
is ``{"pid": int, "used_memory_mib": float or None}``.
"""

from __future__ import annotations

import os
import re
import subprocess
from typing import Any, Iterable, Optional, Union

import torch

SMI_QUERY = ["nvidia-smi", "--query-compute-apps=pid,used_memory,gpu_uuid",
             "--format=csv,noheader,nounits"]
_TORCH_LINE = re.compile(r"^process\s+(\d+)\s+uses\s+([0-9.]+)\s+MB GPU memory$")


def device_count() -> int:
    """CUDA devices this process sees (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def parse_torch_listing(text: str) -> Optional[list[dict[str, Any]]]:
    """The processes in ``torch.cuda.list_gpu_processes``' printout; None when ``text`` is
    not one (its messages for a missing pynvml or driver)."""
    lines = [line.strip() for line in text.strip().splitlines()]
    if not lines or not lines[0].startswith("GPU:"):
        return None
    found = []
    for line in lines[1:]:
        if line == "no processes are running":
            continue
        match = _TORCH_LINE.match(line)
        if match is None:
            return None
        found.append({"pid": int(match[1]), "used_memory_mib": float(match[2])})
    return found


def parse_smi(text: str, uuid: Optional[str] = None) -> Optional[list[dict[str, Any]]]:
    """The processes in the CSV of :data:`SMI_QUERY` (``pid, used_memory, gpu_uuid`` lines),
    only those on the GPU ``uuid`` when given (with or without its ``GPU-`` prefix); None
    when a line is not of that form."""
    want = None if uuid is None else _bare_uuid(uuid)
    found = []
    for line in text.strip().splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 3 or not fields[0].isdigit():
            return None
        pid, memory, gpu = fields
        if want is not None and _bare_uuid(gpu) != want:
            continue
        try:
            used = float(memory)
        except ValueError:  # "[N/A]", "[Not Supported]"
            used = None
        found.append({"pid": int(pid), "used_memory_mib": used})
    return found


def _bare_uuid(uuid: str) -> str:
    uuid = str(uuid).strip().lower()
    return uuid[4:] if uuid.startswith("gpu-") else uuid


def own_pids() -> set[int]:
    """This process's pid, in every PID namespace ``/proc/self/status`` shows (``NSpid``)."""
    pids = {os.getpid()}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    pids.update(int(p) for p in line.split()[1:])
    except (OSError, ValueError):
        pass
    return pids


def exclude_own(listed: list[dict[str, Any]], ours: Iterable[int],
                holds_memory: bool) -> Optional[list[dict[str, Any]]]:
    """``listed`` without our own process.

    ``holds_memory``: this process has memory on the device, so it is among ``listed``.
    When none of ``ours`` is listed then, the driver names us by a pid of another PID
    namespace (a container): a single process listed is us ([]); beside others we cannot
    tell which is ours (None).
    """
    ours = set(ours)
    others = [p for p in listed if p["pid"] not in ours]
    if holds_memory and len(others) == len(listed):
        return [] if len(listed) <= 1 else None
    return others


def query_torch(index: int) -> Optional[list[dict[str, Any]]]:
    """Device ``index``'s compute processes by NVML (``torch.cuda.list_gpu_processes``,
    which maps CUDA_VISIBLE_DEVICES); None when it cannot answer."""
    try:
        return parse_torch_listing(torch.cuda.list_gpu_processes(index))
    except Exception:  # pynvml errors, no driver, a process without a memory figure
        return None


def query_smi(uuid: Optional[str]) -> Optional[list[dict[str, Any]]]:
    """The compute processes ``nvidia-smi`` lists on GPU ``uuid`` (all GPUs when None);
    None when it is missing, fails or answers in another form."""
    try:
        done = subprocess.run(SMI_QUERY, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return parse_smi(done.stdout, uuid)


def _device_uuid(index: int) -> Optional[str]:
    try:
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    except Exception:
        return None
    return None if uuid is None else str(uuid)


def other_gpu_processes(
    device: Union[str, torch.device] = "cuda",
) -> Optional[list[dict[str, Any]]]:
    """The processes other than this one computing on ``device``'s GPU.

    [] for a non-CUDA device or without CUDA; None when it cannot tell (neither NVML nor
    ``nvidia-smi`` answered, or see :func:`exclude_own`). Queries the driver each call.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return []
    index = 0 if device.index is None else device.index
    listed = query_torch(index)
    if listed is None:
        listed = query_smi(_device_uuid(index))
    if listed is None:
        return None
    holds_memory = torch.cuda.is_initialized() and torch.cuda.memory_reserved(index) > 0
    return exclude_own(listed, own_pids(), holds_memory)


def merge_processes(
    seen: Optional[list[dict[str, Any]]], now: Optional[list[dict[str, Any]]]
) -> Optional[list[dict[str, Any]]]:
    """Every process in either answer (by pid, the first record kept): what a run saw
    over several queries. None when neither saw one and either could not tell."""
    if not (seen or now):
        return None if seen is None or now is None else []
    merged, pids = [], set()
    for p in (seen or []) + (now or []):
        if p["pid"] not in pids:
            pids.add(p["pid"])
            merged.append(p)
    return merged
