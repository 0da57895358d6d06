"""The CPU features that decide how onnxruntime runs INT8 on this machine.

On x86-64, onnxruntime's integer GEMMs multiply uint8 activations by int8 weights (U8S8).
With VNNI (AVX512-VNNI, AVX-VNNI) or AMX the products are accumulated in int32 directly.
Without it (plain AVX2, e.g. many AMD EPYC and pre-Cascade-Lake Intel parts) MLAS uses
``vpmaddubsw``, which adds pairs of u8*s8 products into a *saturating* int16: 255*127*2 =
64,770 > 32,767, so large activations meet large weights and the sum clips. That is what
moved the INT8 error of our small test model from 0.4 % (the QDQ model's own error) to 6-13 %
on an AVX2-only machine, whatever the onnxruntime version. ``reduce_range`` (7-bit weights,
255*63*2 = 32,130) removes the saturation; on VNNI machines it only costs precision.
"""
from __future__ import annotations

import functools
import platform
from dataclasses import dataclass

_X86 = {"x86_64", "amd64", "i386", "i686", "x86"}
# /proc/cpuinfo flag names and numpy's names for the same features
_VNNI_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8", "avx_vnni_int8"}
_NUMPY_VNNI = {"AVX512VNNI", "AVX5124VNNIW", "AVXVNNI"}


@dataclass(frozen=True)
class CpuFeatures:
    arch: str                 # platform.machine(), lower case
    flags: frozenset          # the INT8-relevant features found (avx2, avx512_vnni, avx_vnni, amx_int8, ...)
    source: str               # where the flags came from ("/proc/cpuinfo", "numpy", "none")

    @property
    def x86(self) -> bool:
        return self.arch in _X86

    @property
    def vnni(self) -> bool:
        return bool(self.flags & _VNNI_FLAGS)

    @property
    def u8s8_saturates(self) -> bool:
        """Whether onnxruntime's U8S8 integer kernels can saturate here (x86 without VNNI/AMX)."""
        return self.x86 and not self.vnni

    def describe(self) -> str:
        found = ", ".join(sorted(self.flags)) or "no AVX2/VNNI/AMX"
        verdict = ("U8S8 int16 accumulation saturates: reduce_range (7-bit weights) on" if self.u8s8_saturates
                   else "no U8S8 saturation: full-range weights")
        return f"{self.arch} ({found}; from {self.source}): {verdict}"

    def to_dict(self) -> dict:
        return {"arch": self.arch, "flags": sorted(self.flags), "source": self.source,
                "vnni": self.vnni, "u8s8_saturates": self.u8s8_saturates}


def _proc_flags() -> set[str] | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def _numpy_flags() -> set[str] | None:
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as feats
    except ImportError:
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as feats  # numpy < 2
        except ImportError:
            return None
    out = set()
    for k, v in feats.items():
        if v and k in _NUMPY_VNNI:
            out.add("avx512_vnni" if k.startswith("AVX512") else "avx_vnni")
        elif v and k == "AVX2":
            out.add("avx2")
    return out


@functools.lru_cache(maxsize=1)
def cpu_features() -> CpuFeatures:
    arch = platform.machine().lower()
    flags = _proc_flags()
    source = "/proc/cpuinfo"
    if flags is None:
        flags, source = _numpy_flags(), "numpy"
    if flags is None:
        flags, source = set(), "none"
    keep = {f for f in flags if f in _VNNI_FLAGS or f in ("avx2", "avx512f", "avx512bw")}
    return CpuFeatures(arch, frozenset(keep), source)


def default_reduce_range(features: CpuFeatures | None = None) -> bool:
    """onnxruntime's best INT8 setting for this CPU: reduce_range exactly where U8S8 saturates."""
    return (features or cpu_features()).u8s8_saturates
