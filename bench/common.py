"""Shared pieces of the benchmarks: checkpoints, sample images, memory sampling, result rows."""

from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
CACHE = REPO / ".bench_cache"
RESULTS = REPO / "bench" / "RESULTS.md"
IMAGES = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "camera.png", "coins.png", "logo.png",
          "hubble_deep_field.jpg", "horse.png", "retina.jpg", "motorcycle_left.png", "page.png"]


def checkpoint(preset: str) -> Path:
    """A random checkpoint of `preset` in the real layout, written once and reused."""
    from chameleon_core.random_checkpoint import write_random_checkpoint

    path = CACHE / preset
    if not (path / "config.json").exists():
        print(f"writing a random '{preset}' checkpoint to {path} ...", flush=True)
        write_random_checkpoint(path, preset, seed=0, dtype="bfloat16" if preset == "7b-shape" else "float32")
    return path


def sample_images(n: int) -> list[Path]:
    import skimage

    folder = Path(os.path.dirname(skimage.__file__)) / "data"
    return [folder / IMAGES[i % len(IMAGES)] for i in range(n)]


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} ({os.cpu_count()} CPU cores)"
    cpu = platform.processor() or platform.machine()
    isa = ""
    try:
        fields = (line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines() if ":" in line)
        info = {key.strip(): value.strip() for key, value in fields}
        cpu = info.get("model name", cpu)
        # Cloud CPUs often report one model name for several generations; the vector ISA and the
        # family/model say which one ran (e.g. AVX2-only Zen 3 vs AVX-512 Zen 4 differ 2x in fp32 GEMM).
        flags = set(info.get("flags", "").split())
        vector = next((f for f in ("avx512f", "avx2", "avx") if f in flags), None)
        if vector:
            isa = f" ({vector}, family {info.get('cpu family', '?')} model {info.get('model', '?')})"
    except OSError:
        pass
    return f"CPU {cpu}{isa}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


class PeakRSS:
    """Peak resident memory of this process (weights included) while inside, sampled every few milliseconds."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.peak_mib = 0.0

    @staticmethod
    def rss_mib() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def __enter__(self) -> PeakRSS:
        self.peak_mib = self.rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mib = max(self.peak_mib, self.rss_mib())
            time.sleep(self.interval_s)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mib = max(self.peak_mib, self.rss_mib())


def gpu_peak_mib() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0


def median_spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} (min {min(values):.2f}, max {max(values):.2f}, n={len(values)})"


def append_result(title: str, lines: list[str]) -> None:
    """Append a dated section to bench/RESULTS.md."""
    stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    with RESULTS.open("a") as f:
        f.write(f"\n## {stamp} {title}\n\nMachine: {machine()}\n\n" + "\n".join(lines) + "\n")
    print(f"appended to {RESULTS.relative_to(REPO)}")
