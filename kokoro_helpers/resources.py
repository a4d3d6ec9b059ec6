"""Resource monitor for long jobs: CPU, memory, disk and GPU memory, with a warning above 90%.

The seeds' training loop printed a resource line next to its progress bar; this is that monitor
as a small object: ``postfix()`` gives short strings for a tqdm bar's postfix, ``check()``
returns warning lines the first time a resource crosses the threshold (again only after it has
dropped back below), so a long run is not flooded with repeats. A job that computes on the CPU
turns the CPU warning off (``warn_cpu=False``): a busy CPU is then the point, not a problem.

    mon = ResourceMonitor(disk_path="runs/default")
    bar.set_postfix(loss=..., **mon.postfix())
    for line in mon.check():
        tqdm.write(line)
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WARN_AT = 90.0   # percent


def prefer_passive_openmp() -> None:
    """Ask OpenMP threads to sleep, not spin, while they wait (unless the user chose otherwise).

    On a small shared CPU (2 cores, other jobs running) spinning OpenMP threads steal each
    other's cycles: a LoRA step of the tiny model measured 2-6x slower with the default policy
    under load, and the same speed with PASSIVE when the machine is idle. It only takes effect
    if called before torch starts its OpenMP runtime, so the training modules call it on import.
    """
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@dataclass
class Snapshot:
    """One reading. Percentages are 0..100; ``gpu`` holds one entry per visible CUDA device."""

    cpu_percent: float
    ram_percent: float
    ram_used_gb: float
    ram_total_gb: float
    disk_percent: float
    disk_free_gb: float
    gpu: list[dict[str, float]] = field(default_factory=list)   # {index, used_gb, total_gb, percent}
    time: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"cpu_percent": self.cpu_percent, "ram_percent": self.ram_percent,
                "ram_used_gb": self.ram_used_gb, "ram_total_gb": self.ram_total_gb,
                "disk_percent": self.disk_percent, "disk_free_gb": self.disk_free_gb, "gpu": self.gpu}


def _gpu_memory() -> list[dict[str, float]]:
    """Used/total memory of each CUDA device as the driver reports it (all processes), or []."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        try:
            free, total = torch.cuda.mem_get_info(i)
        except Exception:       # a device we may not touch (MIG slice, another process's context)
            continue
        used = total - free
        out.append({"index": i, "used_gb": used / 2**30, "total_gb": total / 2**30,
                    "percent": 100.0 * used / total if total else 0.0})
    return out


class ResourceMonitor:
    """Reads CPU, RAM, disk (of ``disk_path``'s filesystem) and GPU memory, at most every ``interval`` s."""

    def __init__(self, disk_path: str | Path = ".", interval: float = 2.0, warn_at: float = WARN_AT,
                 warn_cpu: bool = True):
        """``warn_cpu=False`` still shows the CPU (marked '!' above the threshold) but prints no
        warning line for it: a job that trains on the CPU is meant to keep it busy."""
        import psutil

        self._psutil = psutil
        path = Path(disk_path)
        while not path.exists() and path != path.parent:    # the run folder may not exist yet
            path = path.parent
        self.disk_path = path
        self.interval = interval
        self.warn_at = warn_at
        self.warn_cpu = warn_cpu
        self._last: Snapshot | None = None
        self._warned: set[str] = set()
        psutil.cpu_percent(interval=None)   # starts the CPU measurement window

    def snapshot(self, force: bool = False) -> Snapshot:
        """The latest reading (cached for ``interval`` seconds unless ``force``)."""
        now = time.monotonic()
        if self._last is not None and not force and now - self._last.time < self.interval:
            return self._last
        ps = self._psutil
        vm = ps.virtual_memory()
        disk = shutil.disk_usage(self.disk_path)
        self._last = Snapshot(
            cpu_percent=float(ps.cpu_percent(interval=None)),
            ram_percent=float(vm.percent), ram_used_gb=(vm.total - vm.available) / 2**30,
            ram_total_gb=vm.total / 2**30,
            disk_percent=100.0 * disk.used / disk.total if disk.total else 0.0,
            disk_free_gb=disk.free / 2**30, gpu=_gpu_memory(), time=now)
        return self._last

    def levels(self, snap: Snapshot | None = None) -> dict[str, float]:
        """Percent used per resource: cpu, ram, disk, gpu0, gpu1, ..."""
        s = snap or self.snapshot()
        out = {"cpu": s.cpu_percent, "ram": s.ram_percent, "disk": s.disk_percent}
        for g in s.gpu:
            out[f"gpu{int(g['index'])}"] = g["percent"]
        return out

    def postfix(self) -> dict[str, str]:
        """Short strings for a progress bar's postfix; a resource above the threshold gets a '!'."""
        s = self.snapshot()
        out = {}
        for name, pct in self.levels(s).items():
            mark = "!" if pct >= self.warn_at else ""
            if name == "ram":
                out[name] = f"{s.ram_used_gb:.1f}G/{pct:.0f}%{mark}"
            elif name.startswith("gpu"):
                g = s.gpu[int(name[3:])] if int(name[3:]) < len(s.gpu) else None
                used = f"{g['used_gb']:.1f}G/" if g else ""
                out[name] = f"{used}{pct:.0f}%{mark}"
            else:
                out[name] = f"{pct:.0f}%{mark}"
        return out

    def check(self) -> list[str]:
        """Warning lines for resources that just crossed the threshold (each once until it recovers)."""
        s = self.snapshot()
        lines = []
        advice = {"ram": "reduce local_batch_size or max_length, or close other programs",
                  "disk": f"free space on {self.disk_path} (checkpoints and adapters are written there)",
                  "cpu": "the CPU is the bottleneck: data preparation or other jobs are slowing the GPU down"}
        for name, pct in self.levels(s).items():
            if name == "cpu" and not self.warn_cpu:
                continue
            if pct >= self.warn_at and name not in self._warned:
                self._warned.add(name)
                hint = advice.get(name, "reduce local_batch_size or max_length, or enable gradient_checkpointing")
                lines.append(f"WARNING: {name} at {pct:.0f}% (above {self.warn_at:.0f}%): {hint}")
            elif pct < self.warn_at - 5 and name in self._warned:
                self._warned.discard(name)
        return lines

    def line(self) -> str:
        """One human-readable line of the current reading."""
        return " | ".join(f"{k} {v}" for k, v in self.postfix().items())
