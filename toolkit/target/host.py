"""The "host" device profile: this machine as measured now (RAM, cores, CPU features, bandwidth, GPU).

Used to plan for the machine Bedside runs on and to sanity-check the shipped profiles against a
real measurement. Memory bandwidth is measured (decode speed scales with it); RAM and cores are
read from the OS; a GPU is described from NVML when nvidia-ml-py and a driver are present.
Peak compute is estimated from core count, clock and ISA, and every source string says which.
"""

import datetime
import functools
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

from toolkit.core.formats import FORMATS
from toolkit.core.units import GIB
from toolkit.target.schema import (
    HOST_PROFILE_NAME,
    Compute,
    DeviceProfile,
    Figure,
    Link,
    MemoryTier,
    QualityFloor,
)

MEASURED_BY = "`bedside profiles show host`"
# Typical latencies, not measured here (a pointer chase in Python would time the interpreter).
DRAM_LATENCY = Figure(
    value=90,
    source="typical, not measured: 'main memory reference ~100 ns' (Latency Numbers Every Programmer "
    "Should Know, J. Dean 2010, reproduced in d2l.ai ch. 12.4 Hardware); Intel's Core i7/Xeon 5500 "
    "Performance Analysis Guide gives ~60 ns local DRAM",
)
GPU_MEMORY_LATENCY = Figure(
    value=200,
    source="typical, not measured: GPU global memory ~200 ns (d2l.ai ch. 12.4 Hardware)",
)
PCIE_LATENCY = Figure(
    value=1000,
    source="typical, not measured: small PCIe DMA round trips are on the order of 1 us "
    "(Neugebauer et al., Understanding PCIe performance for end host networking, SIGCOMM 2018)",
)
# PCIe payload rate per lane in GB/s after line encoding (8b/10b for gen 1-2, 128b/130b for gen 3-5).
PCIE_LANE_GBS = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}
# ISA-level flags the runtimes choose kernels by; everything else in /proc/cpuinfo is noise here.
INTERESTING_CPU_FLAGS = (
    "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
    "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "asimd", "asimddp", "asimdhp", "i8mm", "sve", "sve2",
)  # fmt: skip


@dataclass(frozen=True)
class CpuFacts:
    """What the OS says about the CPU; `cores` is what this process may use."""

    model: str
    cores: int
    cores_source: str
    mhz: float
    mhz_source: str
    features: tuple[str, ...]


@dataclass(frozen=True)
class GpuFacts:
    """The first NVIDIA GPU as NVML reports it."""

    name: str
    total_bytes: int
    used_bytes: int
    compute_capability: tuple[int, int]
    cuda_cores: int
    sm_clock_mhz: float
    memory_bandwidth_gbs: float | None
    pcie_generation: int | None
    pcie_width: int | None


def _today() -> str:
    return datetime.date.today().isoformat()


def _proc_cpuinfo() -> dict[str, str]:
    """First processor block of /proc/cpuinfo (empty off Linux)."""
    path = Path("/proc/cpuinfo")
    if not path.is_file():
        return {}
    info: dict[str, str] = {}
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            if info:
                break
            continue
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    return info


def detect_cpu() -> CpuFacts:
    """CPU model, usable cores, clock and ISA flags from psutil and /proc/cpuinfo."""
    info = _proc_cpuinfo()
    model = info.get("model name") or info.get("Hardware") or platform.processor() or platform.machine()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    features = tuple(flag for flag in INTERESTING_CPU_FLAGS if flag in flags)

    physical = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else physical
    cores = max(1, min(physical, usable))
    cores_source = (
        f"read by {MEASURED_BY} on {_today()}: min(psutil.cpu_count(logical=False)={physical}, "
        f"CPUs this process may run on={usable})"
    )
    frequency = psutil.cpu_freq()
    if frequency is not None and (frequency.max or frequency.current):
        mhz = float(frequency.max or frequency.current)
        mhz_source = "psutil.cpu_freq() max" if frequency.max else "psutil.cpu_freq() current"
    elif info.get("cpu MHz"):
        mhz, mhz_source = float(info["cpu MHz"]), "/proc/cpuinfo 'cpu MHz'"
    else:
        mhz, mhz_source = 2000.0, "assumed 2 GHz (the OS reports no clock)"
    return CpuFacts(model, cores, cores_source, mhz, mhz_source, features)


# CPU features a runtime's kernels leave unused, so its reachable peak is that of the ISA below them. llama.cpp is
# built with -DGGML_NATIVE=OFF (AMX crash, docs/ENVIRONMENT.md): `llama_print_system_info()` reports AVX, AVX2, F16C
# and FMA only. ONNX Runtime's MLAS picks AVX-512 kernels at run time; AMX counted out (assumption: its float and
# 4-bit MatMulNBits kernels have no AMX path).
_AMX = frozenset({"amx_tile", "amx_bf16", "amx_int8"})
_AVX512 = frozenset({"avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni"})
RUNTIME_UNUSED_CPU_FEATURES: dict[str, tuple[frozenset[str], str]] = {
    "llama.cpp": (_AMX | _AVX512, "the portable llama.cpp build (AVX2/FMA/F16C kernels, docs/ENVIRONMENT.md)"),
    "onnxruntime": (_AMX, "ONNX Runtime's MLAS kernels (AVX-512 at most; no AMX path assumed)"),
}


def runtime_peak_share(runtime: str, features: list[str] | tuple[str, ...]) -> tuple[float, float, str | None]:
    """(FP16, INT8) peak of `runtime`'s CPU kernels as a share of the CPU's own, and a note when below 1.

    share = FLOP per cycle of the best ISA the runtime uses / FLOP per cycle of the best ISA present
    (_cpu_throughput_per_cycle of each feature set); 1 when the runtime or the features are unknown.
    """
    unused, what = RUNTIME_UNUSED_CPU_FEATURES.get(runtime, (frozenset(), ""))
    if not features or not unused & set(features):
        return 1.0, 1.0, None
    flops, int8_ops, isa = _cpu_throughput_per_cycle(tuple(features))
    used_flops, used_int8, used_isa = _cpu_throughput_per_cycle(tuple(f for f in features if f not in unused))
    note = (
        f"CPU peak scaled to {used_isa} from {isa} ({used_flops:g} of {flops:g} FLOP/cycle, {used_int8:g} of "
        f"{int8_ops:g} INT8 op/cycle): {what}"
    )
    return used_flops / flops, used_int8 / int8_ops, note if (used_flops, used_int8) != (flops, int8_ops) else None


def _cpu_throughput_per_cycle(features: tuple[str, ...]) -> tuple[float, float, str]:
    """(FP16-or-better FLOP, INT8 op) per core per cycle for the best ISA present, and its name.

    Peak figures for two vector FMA pipes; FP16 runs at the FP32 rate unless AMX is present.
    """
    has = set(features)
    if {"amx_bf16", "amx_int8"} <= has:
        return 1024.0, 2048.0, "amx"
    if "avx512f" in has:
        return 64.0, 256.0 if "avx512_vnni" in has else 128.0, "avx512"
    if "avx2" in has:
        return 32.0, 128.0 if "avx_vnni" in has else 64.0, "avx2"
    if "asimd" in has:
        return 16.0, 64.0 if "asimddp" in has else 32.0, "neon"
    return 8.0, 16.0, "scalar"


def _copy_once(destination: np.ndarray, source: np.ndarray, threads: int, pool: ThreadPoolExecutor) -> float:
    """Seconds for one copy of `source` into `destination`, split over `threads` (numpy drops the GIL)."""
    bounds = np.linspace(0, source.size, threads + 1, dtype=np.int64)
    parts = [(int(bounds[i]), int(bounds[i + 1])) for i in range(threads)]
    start = time.perf_counter()
    list(pool.map(lambda part: np.copyto(destination[part[0] : part[1]], source[part[0] : part[1]]), parts))
    return time.perf_counter() - start


@functools.cache
def measure_memory_bandwidth(threads: int, array_mib: int = 64, budget_s: float = 0.25) -> tuple[float, str]:
    """Sustained RAM bandwidth in GB/s: best numpy copy of an array far larger than the caches.

    Counts bytes read + bytes written (the STREAM 'copy' convention). Tries one thread and
    `threads` threads and keeps the best run, at least 3 runs each, within about `budget_s`
    after a warm-up copy that faults the pages in. Cached for the process.
    """
    available = psutil.virtual_memory().available
    array_mib = int(max(16, min(array_mib, available // (16 * 2**20))))
    source = np.ones(array_mib * 2**20 // 8)
    destination = np.empty_like(source)
    np.copyto(destination, source)  # warm-up: page faults are not bandwidth
    moved = 2 * source.nbytes
    best = 0.0
    runs = 0
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for thread_count in sorted({1, max(1, threads)}):
            deadline = time.perf_counter() + budget_s / 2
            attempts = 0
            while attempts < 3 or (time.perf_counter() < deadline and attempts < 10):
                best = max(best, moved / _copy_once(destination, source, thread_count, pool) / 1e9)
                attempts += 1
            runs += attempts
    source_text = (
        f"measured by {MEASURED_BY} on {_today()}: best of {runs} numpy copies of a {array_mib} MiB "
        f"array with 1 and {threads} threads, bytes read + written (STREAM copy convention)"
    )
    return best, source_text


def detect_nvidia_gpu() -> GpuFacts | None:
    """The first NVIDIA GPU via NVML, or None when nvidia-ml-py, the driver or a GPU is missing."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        if pynvml.nvmlDeviceGetCount() < 1:
            return None
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)

        def optional(query: str, *args: object) -> object | None:
            try:
                return getattr(pynvml, query)(handle, *args)
            except (pynvml.NVMLError, AttributeError):
                return None

        name = pynvml.nvmlDeviceGetName(handle)
        name = name.decode() if isinstance(name, bytes) else str(name)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        capability = optional("nvmlDeviceGetCudaComputeCapability") or (0, 0)
        bus_bits = optional("nvmlDeviceGetMemoryBusWidth")
        memory_mhz = optional("nvmlDeviceGetMaxClockInfo", pynvml.NVML_CLOCK_MEM)
        bandwidth = 2 * float(memory_mhz) * 1e6 * int(bus_bits) / 8 / 1e9 if bus_bits and memory_mhz else None
        return GpuFacts(
            name=name,
            total_bytes=int(memory.total),
            used_bytes=int(memory.used),
            compute_capability=(int(capability[0]), int(capability[1])),
            cuda_cores=int(optional("nvmlDeviceGetNumGpuCores") or 0),
            sm_clock_mhz=float(optional("nvmlDeviceGetMaxClockInfo", pynvml.NVML_CLOCK_SM) or 0),
            memory_bandwidth_gbs=bandwidth,
            pcie_generation=optional("nvmlDeviceGetMaxPcieLinkGeneration"),  # type: ignore[arg-type]
            pcie_width=optional("nvmlDeviceGetMaxPcieLinkWidth"),  # type: ignore[arg-type]
        )
    except pynvml.NVMLError:
        return None
    finally:
        pynvml.nvmlShutdown()


def _policy_quality_floor() -> QualityFloor:
    return QualityFloor(
        max_perplexity_increase_pct=Figure(
            value=25,
            source="Bedside default policy: admits 4-bit weight-only quantization of a small model "
            "(ONNX int4 block 32 gave +22 % on the 135M demo model, docs/ENVIRONMENT.md, section "
            "'ONNX export and int4 on the demo model')",
        ),
        min_accuracy_retention_pct=Figure(
            value=90, source="Bedside default policy: keep 90 % of the uncompressed model's accuracy"
        ),
    )


def _ram_tier(cpu_facts: CpuFacts, kind: str) -> tuple[MemoryTier, float, str]:
    """RAM as a tier, plus the GiB other processes hold now (the measured reserve) and its source."""
    memory = psutil.virtual_memory()
    bandwidth, bandwidth_source = measure_memory_bandwidth(cpu_facts.cores)
    measured = Figure(value=round(bandwidth, 2), source=bandwidth_source)
    tier = MemoryTier(
        name="ram",
        kind=kind,  # type: ignore[arg-type]
        capacity_gib=Figure(
            value=round(memory.total / GIB, 3),
            source=f"read by {MEASURED_BY} on {_today()}: psutil.virtual_memory().total",
        ),
        # The peak is unknown from inside the OS; the measurement stands for both.
        bandwidth_gbs=measured,
        sustained_bandwidth_gbs=measured,
        latency_ns=DRAM_LATENCY,
    )
    reserved = (memory.total - memory.available) / GIB
    reserved_source = (
        f"measured by {MEASURED_BY} on {_today()}: psutil total - available "
        "(memory the OS and other processes hold right now)"
    )
    return tier, reserved, reserved_source


def _cpu_compute(cpu_facts: CpuFacts) -> Compute:
    flops, int8_ops, isa = _cpu_throughput_per_cycle(cpu_facts.features)
    ghz = cpu_facts.mhz / 1000
    estimate = (
        f"estimated peak, not measured: {cpu_facts.cores} cores x {ghz:.2f} GHz ({cpu_facts.mhz_source})"
    )
    return Compute(
        accelerator="cpu",
        architecture=f"{platform.machine()}-{isa}",
        cores=Figure(value=cpu_facts.cores, source=cpu_facts.cores_source),
        fp16_tflops=Figure(
            value=round(cpu_facts.cores * ghz * flops / 1000, 3),
            source=f"{estimate} x {flops:g} FLOP/cycle ({isa}, FP16 at the FP32 rate without AMX)",
        ),
        int8_tops=Figure(
            value=round(cpu_facts.cores * ghz * int8_ops / 1000, 3),
            source=f"{estimate} x {int8_ops:g} INT8 op/cycle ({isa})",
        ),
        cpu_model=cpu_facts.model,
        cpu_features=list(cpu_facts.features),
    )


def _gpu_compute(gpu: GpuFacts, cpu_facts: CpuFacts) -> Compute:
    ghz = gpu.sm_clock_mhz / 1000
    nvml = f"read by {MEASURED_BY} on {_today()} from NVML"
    lower_bound = f"estimated lower bound: {gpu.cuda_cores} CUDA cores x {ghz:.2f} GHz max SM clock (NVML)"
    return Compute(
        accelerator="cuda",
        architecture=f"sm_{gpu.compute_capability[0]}{gpu.compute_capability[1]}",
        cores=Figure(
            value=gpu.cuda_cores,
            source=f"{nvml} (nvmlDeviceGetNumGpuCores)" if gpu.cuda_cores else "NVML reports no core count",
        ),
        fp16_tflops=Figure(
            value=round(gpu.cuda_cores * ghz * 2 / 1000, 3),
            source=f"{lower_bound} x 2 FLOP (FMA, no tensor cores; those give several times more)",
        ),
        int8_tops=Figure(
            value=round(gpu.cuda_cores * ghz * 8 / 1000, 3),
            source=f"{lower_bound} x 8 op (DP4A, no tensor cores)",
        ),
        cpu_model=cpu_facts.model,
        cpu_features=list(cpu_facts.features),
    )


@functools.cache
def detect_host_profile() -> DeviceProfile:
    """Describe this machine as a DeviceProfile named "host"; measured once per process."""
    return build_host_profile(detect_cpu(), detect_nvidia_gpu())


def build_host_profile(cpu_facts: CpuFacts, gpu: GpuFacts | None) -> DeviceProfile:
    """The "host" profile from detected facts: RAM only, or VRAM as the model tier plus RAM over PCIe."""
    today = _today()
    assumptions = [
        f"Measured on {platform.node() or 'this machine'} on {today}; other tenants' load at that moment "
        "lowers the bandwidth and raises the reserve.",
        "Latencies are typical published values, not measurements of this machine.",
    ]
    if gpu is None:
        ram, reserved, reserved_source = _ram_tier(cpu_facts, "host")
        tiers, links, model_tier, compute = [ram], [], "ram", _cpu_compute(cpu_facts)
        description = f"This machine, CPU only: {cpu_facts.model}"
    else:
        ram, _, _ = _ram_tier(cpu_facts, "host")
        nvml = f"read by {MEASURED_BY} on {today} from NVML"
        bandwidth = gpu.memory_bandwidth_gbs
        vram = MemoryTier(
            name="vram",
            kind="device",
            capacity_gib=Figure(value=round(gpu.total_bytes / GIB, 3), source=f"{nvml} (memory total)"),
            bandwidth_gbs=Figure(
                value=round(bandwidth, 1) if bandwidth else 0,
                source=f"derived from NVML: 2 x max memory clock x bus width / 8 ({nvml})"
                if bandwidth
                else "NVML reports no memory clock or bus width",
            ),
            latency_ns=GPU_MEMORY_LATENCY,
        )
        tiers, model_tier = [vram, ram], "vram"
        links = []
        if gpu.pcie_generation in PCIE_LANE_GBS and gpu.pcie_width:
            lane = PCIE_LANE_GBS[gpu.pcie_generation]
            links.append(
                Link(
                    name="pcie",
                    between=("ram", "vram"),
                    bandwidth_gbs=Figure(
                        value=round(lane * gpu.pcie_width, 2),
                        source=f"PCIe gen {gpu.pcie_generation} x{gpu.pcie_width} ({nvml}, max link) "
                        f"x {lane} GB/s per lane after line encoding (PCI-SIG base specifications)",
                    ),
                    latency_ns=PCIE_LATENCY,
                    kind="pcie",
                    generation=Figure(value=gpu.pcie_generation, source=f"{nvml} (max link generation)"),
                    lanes=Figure(value=gpu.pcie_width, source=f"{nvml} (max link width)"),
                )
            )
        reserved = gpu.used_bytes / GIB
        reserved_source = (
            f"measured by {MEASURED_BY} on {today}: NVML memory used (driver and other processes); "
            "our own CUDA context is counted by the memory estimate (toolkit/plan/memory.py)"
        )
        compute = _gpu_compute(gpu, cpu_facts)
        description = f"This machine: {gpu.name} with {cpu_facts.model}"

    return DeviceProfile(
        name=HOST_PROFILE_NAME,
        description=description,
        memory_tiers=tiers,
        links=links,
        model_tier=model_tier,
        reserved_gib=Figure(value=round(reserved, 3), source=reserved_source),
        headroom_pct=Figure(
            value=10, source="Bedside default policy: margin for estimator error and allocator fragmentation"
        ),
        compute=compute,
        runtimes=["llama.cpp", "onnxruntime", "torch"],
        formats=["gguf", "onnx"],
        quant_schemes=[*FORMATS["gguf"], *FORMATS["onnx"]],
        context_length=4096,
        batch_size=1,
        kv_cache_dtypes=["f16", "q8_0", "q4_0"],
        quality_floor=_policy_quality_floor(),
        min_decode_tokens_per_s=Figure(
            value=5,
            source="Bedside default policy: near reading speed; 5 tok/s x 0.75 words/token x 60 = 225 "
            "words/min against 238 wpm average silent reading (Brysbaert 2019, J. Mem. Lang. 109:104047)",
        ),
        assumptions=assumptions,
    )
