"""Device facts: the memory an allocation can still take."""

import pytest
import torch

from lmforge.utils import device as device_module


def test_free_memory_on_linux_is_memavailable():
    with open("/proc/meminfo") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    # MemAvailable moves between two reads; within a GiB of each other is the same reading.
    assert abs(device_module.free_memory(torch.device("cpu")) - kib * 1024) < 2**30


def test_free_memory_without_proc_meminfo_asks_posix(monkeypatch):
    def no_proc(*args, **kwargs):
        raise FileNotFoundError("/proc/meminfo")

    monkeypatch.setattr(device_module, "open", no_proc, raising=False)  # the module's `open`, as on macOS
    monkeypatch.setattr(device_module.os, "sysconf", lambda name: {"SC_AVPHYS_PAGES": 3, "SC_PAGE_SIZE": 4096}[name])
    assert device_module.free_memory(torch.device("cpu")) == 3 * 4096

    def unsupported(name):
        raise ValueError(f"unrecognized configuration name {name}")  # macOS has no SC_AVPHYS_PAGES

    monkeypatch.setattr(device_module.os, "sysconf", unsupported)
    assert device_module.free_memory(torch.device("cpu")) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_free_memory_on_cuda_is_what_the_driver_reports():
    free, _ = torch.cuda.mem_get_info(0)
    assert abs(device_module.free_memory(torch.device("cuda", 0)) - free) < 2**30
