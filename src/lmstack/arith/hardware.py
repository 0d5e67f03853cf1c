"""Accelerator presets: peak matmul throughput, memory bandwidth and memory capacity.

Conventions (stated once, used everywhere in `lmstack.arith`):

* `peak_flops` is the **dense BF16 tensor-core rate with FP32 accumulate**, in FLOP/s (2 FLOPs per
  multiply-add). Vendor headline numbers "with sparsity" assume 2:4 structured sparsity and are twice
  this; we never use them (the RTX 4090 is 165 TFLOP/s here, not 330). The phone is a typical
  mid-range handset and its peak is in int4 operations per second.
* `bandwidth_bytes_per_s` is the vendor's peak DRAM/HBM bandwidth, decimal (1 TB/s = 1e12 B/s).
* `memory_bytes` is the nominal capacity read as **GiB** (2**30 bytes): DRAM and HBM come in
  power-of-two sizes (an A100 80GB reports 81,920 MiB = exactly 80 GiB; an H100 80GB reports 81,559
  MiB after reservations), so "80 GB" on a spec sheet is 85.9e9 bytes, not 80e9.

Sources: NVIDIA A100 datasheet (312 TFLOPS BF16 dense, 624 with sparsity; 1,555 GB/s for 40GB, 2,039
GB/s for 80GB SXM); H100 datasheet (SXM 1,979 / PCIe 1,513 TFLOPS BF16 *with sparsity* -> 989 / 756
dense; 3.35 TB/s / 2.0 TB/s); H200 datasheet (same compute as H100 SXM, 141 GB at 4.8 TB/s); L4
datasheet (242 TFLOPS BF16 with sparsity -> 121 dense, 24 GB, 300 GB/s); Ada Lovelace architecture
whitepaper, RTX 4090 "Peak BF16 Tensor TFLOPS with FP32 Accumulate 165.2/330.4", 24 GB, 1,008 GB/s;
the phone is a typical mid-range handset (6 GB LPDDR5 at ~50 GB/s, an NPU at ~2 TOPS INT4).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass

from lmstack.errors import InputError

GIB = 2**30
GB = 10**9


@dataclass(frozen=True)
class Hardware:
    """One accelerator. Multiply by the GPU count for a tensor-parallel group (communication ignored)."""

    name: str
    peak_flops: float  # dense BF16 tensor-core FLOP/s, FP32 accumulate
    bandwidth_bytes_per_s: float  # peak memory bandwidth, bytes/s (decimal)
    memory_bytes: int  # nominal capacity, read as GiB
    description: str = ""

    @property
    def ridge_flops_per_byte(self) -> float:
        """Arithmetic intensity at which compute time equals memory time (the roofline's ridge point)."""
        return self.peak_flops / self.bandwidth_bytes_per_s

    def to_dict(self) -> dict[str, object]:
        out = dataclasses.asdict(self)
        out["memory_gib"] = self.memory_bytes / GIB
        out["ridge_flops_per_byte"] = self.ridge_flops_per_byte
        return out


HARDWARE: dict[str, Hardware] = {
    h.name: h
    for h in (
        Hardware("a100-40gb", 312e12, 1.555e12, 40 * GIB, "NVIDIA A100 40GB SXM"),
        Hardware("a100-80gb", 312e12, 2.039e12, 80 * GIB, "NVIDIA A100 80GB SXM"),
        Hardware("h100-sxm", 989e12, 3.35e12, 80 * GIB, "NVIDIA H100 SXM5 80GB"),
        Hardware("h100-pcie", 756e12, 2.0e12, 80 * GIB, "NVIDIA H100 PCIe 80GB"),
        Hardware("h200", 989e12, 4.8e12, 141 * GIB, "NVIDIA H200 SXM 141GB"),
        Hardware("l4", 121e12, 0.3e12, 24 * GIB, "NVIDIA L4 24GB"),
        Hardware("rtx4090", 165e12, 1.008e12, 24 * GIB, "NVIDIA GeForce RTX 4090 24GB"),
        Hardware("phone", 2e12, 50e9, 6 * GIB, "a typical phone: 6 GB LPDDR5 at ~50 GB/s, 2 TOPS int4"),
    )
}
ALIASES = {"a100": "a100-80gb", "h100": "h100-sxm", "4090": "rtx4090", "rtx-4090": "rtx4090"}


def get_hardware(spec: str | Hardware) -> Hardware:
    """A preset by name (`h100-sxm`, `a100`, ...) or custom values `tflops=312,tbps=2.0,gib=80`.

    Custom keys: `tflops` (dense peak, 1e12 FLOP/s), `tbps` (bandwidth, 1e12 B/s) or `gbps` (1e9 B/s),
    and `gib` or `gb` (capacity; `gb` is decimal). All three quantities are required.
    """
    if isinstance(spec, Hardware):
        return spec
    key = spec.strip().lower()
    key = ALIASES.get(key, key)
    if key in HARDWARE:
        return HARDWARE[key]
    if "=" in key:
        return _parse_custom(key)
    close = difflib.get_close_matches(key, list(HARDWARE) + list(ALIASES), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(HARDWARE)}"
    raise InputError(f"unknown hardware {spec!r} — {hint} (or give tflops=...,tbps=...,gib=...)")


def _parse_custom(spec: str) -> Hardware:
    values: dict[str, float] = {}
    for part in spec.split(","):
        name, _, raw = part.partition("=")
        try:
            values[name.strip()] = float(raw)
        except ValueError:
            raise InputError(
                f"hardware value {part!r} is not a number — write e.g. tflops=312,tbps=2,gib=80"
            ) from None
    peak = values.get("tflops")
    bandwidth = values["tbps"] * 1e12 if "tbps" in values else values.get("gbps", 0) * 1e9 or None
    memory = values["gib"] * GIB if "gib" in values else values.get("gb", 0) * GB or None
    unknown = set(values) - {"tflops", "tbps", "gbps", "gib", "gb"}
    if unknown or not peak or not bandwidth or not memory or min(values.values()) <= 0:
        raise InputError(
            f"custom hardware {spec!r} needs positive tflops, tbps (or gbps) and gib (or gb) — "
            "e.g. tflops=312,tbps=2.039,gib=80"
        )
    return Hardware("custom", peak * 1e12, bandwidth, int(memory), f"custom: {spec}")
