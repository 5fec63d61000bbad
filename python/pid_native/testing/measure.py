"""Peak memory of this process: the RSS high-water mark (Linux) and GPU memory through NVML.

NVML (``pip install nvidia-ml-py``) has no peak counter, so :class:`GpuMemory` samples from a
background thread every few milliseconds and keeps the largest value: this process's memory
where NVML lists it, else (a container whose PID namespace hides it) the device's used memory
minus what was in use when the object was made, before this process touched the GPU.
Both include the CUDA context and whatever the allocator keeps cached, unlike an allocator's
own counter (``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import BackendUnavailableError


def reset_peak_rss() -> None:
    """Restart the kernel's high-water mark of this process (Linux), so VmHWM covers what follows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_bytes() -> int | None:
    """VmHWM of this process (Linux), None where the kernel does not report it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def device_ordinal(device: str) -> int:
    """The CUDA ordinal of ``"cuda"`` / ``"cuda:N"``."""
    return int(device.partition(":")[2] or 0)


def _nvml() -> Any:
    try:
        import pynvml
    except ImportError:
        raise BackendUnavailableError(
            'measuring GPU memory needs NVML: pip install nvidia-ml-py (or "pid-native[cuda]")'
        ) from None
    pynvml.nvmlInit()
    return pynvml


def nvml_handle(device: str) -> Any:
    """The NVML handle of a CUDA device, following ``CUDA_VISIBLE_DEVICES`` (indices or UUIDs)."""
    nvml = _nvml()
    ordinal = device_ordinal(device)
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if ordinal < len(visible):
        entry = visible[ordinal]
        return (
            nvml.nvmlDeviceGetHandleByIndex(int(entry))
            if entry.isdigit()
            else nvml.nvmlDeviceGetHandleByUUID(entry)
        )
    return nvml.nvmlDeviceGetHandleByIndex(ordinal)


def gpu_info(device: str) -> dict[str, Any]:
    """Name, driver, CUDA driver version and memory of a CUDA device, from NVML."""
    nvml = _nvml()
    handle = nvml_handle(device)
    cuda = nvml.nvmlSystemGetCudaDriverVersion()
    return {
        "name": nvml.nvmlDeviceGetName(handle),
        "driver": nvml.nvmlSystemGetDriverVersion(),
        "cuda_driver": f"{cuda // 1000}.{cuda % 1000 // 10}",
        "memory_total_bytes": int(nvml.nvmlDeviceGetMemoryInfo(handle).total),
        "compute_capability": ".".join(map(str, nvml.nvmlDeviceGetCudaComputeCapability(handle))),
    }


class GpuMemory:
    """Peak GPU memory of this process on one device, sampled by a background thread.

    Make it before this process first uses the GPU (the device-wide fallback subtracts what
    was in use then); wrap each measured region in :meth:`peak`.
    """

    def __init__(self, device: str, interval_s: float = 0.002) -> None:
        self._nvml = _nvml()
        self._handle = nvml_handle(device)
        self._interval = interval_s
        self._baseline = self._used()
        self.method = ""

    def _used(self) -> int:
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)

    def free_bytes(self) -> int:
        """The device's free memory now."""
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).free)

    def sample(self) -> int:
        """This process's GPU memory now (bytes); sets :attr:`method`."""
        pid = os.getpid()
        for proc in self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle):
            if proc.pid == pid and proc.usedGpuMemory is not None:
                self.method = f"NVML per-process used memory, sampled every {self._interval * 1e3:g} ms"
                return int(proc.usedGpuMemory)
        self.method = (
            "NVML device used memory minus its value before this process used the GPU "
            f"(NVML does not list this process), sampled every {self._interval * 1e3:g} ms"
        )
        return max(0, self._used() - self._baseline)

    @contextmanager
    def peak(self) -> Iterator[dict[str, int]]:
        """Samples while the block runs; the yielded dict's ``bytes`` is the peak afterwards."""
        result = {"bytes": self.sample()}
        stop = threading.Event()

        def poll() -> None:
            while not stop.is_set():
                result["bytes"] = max(result["bytes"], self.sample())
                time.sleep(self._interval)

        thread = threading.Thread(target=poll, name="pid-gpu-memory", daemon=True)
        thread.start()
        try:
            yield result
        finally:
            stop.set()
            thread.join()
            result["bytes"] = max(result["bytes"], self.sample())


__all__ = ["GpuMemory", "device_ordinal", "gpu_info", "nvml_handle", "peak_rss_bytes", "reset_peak_rss"]
