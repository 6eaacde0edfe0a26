"""The machine figures are measured on: its CPU, the features that rank engines, versions."""

from __future__ import annotations

import os
import platform

from bsbr_export.versions import versions

# The CPU features that rank reduced-precision engines: bf16 and int8 matrix units and
# vector extensions (names as /proc/cpuinfo spells them).
RANKING_FEATURES = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_bf16", "amx_int8")


def machine_info() -> dict:
    """What the numbers were measured on."""
    return {
        "platform": platform.platform(),
        "processor": cpu_model() or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_features": cpu_features(),
        "versions": versions(),
    }


def cpu_features() -> list[str]:
    """Which of RANKING_FEATURES this CPU has (Linux; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    except OSError:
        return []
    return [f for f in RANKING_FEATURES if f in flags]


def cpu_model() -> str | None:
    """The CPU's marketing name (Linux), which `platform.processor()` leaves empty there."""
    try:
        with open("/proc/cpuinfo") as info:
            return next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), None)
    except OSError:
        return None


def bf16_missing() -> str | None:
    """Why this CPU cannot run bf16 matrix products natively (None when it can)."""
    if not {"avx512_bf16", "amx_bf16"} & set(cpu_features()):
        return "this CPU has neither AVX512_BF16 nor AMX-BF16: bf16 would be emulated, slower than fp32"
    return None
