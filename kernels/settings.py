"""The memory step's compute settings: kernel dispatch (ATLAS_KERNELS), the kernels' products
(ATLAS_KERNEL_PRECISION) and the reference's Newton-Schulz (ATLAS_NS_PRECISION)."""

from __future__ import annotations

import functools
from typing import Literal, get_args

from pydantic_settings import BaseSettings, SettingsConfigDict

Precision = Literal["tf32", "tf32x3", "ieee"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
NsPrecision = Literal["fp32", "bf16"]


class KernelSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ATLAS_", extra="ignore")

    #: auto: the fused kernels on CUDA, the reference elsewhere; on: wherever Triton runs (also the
    #: CPU interpreter, TRITON_INTERPRET=1); off: always the reference.
    kernels: Literal["auto", "on", "off"] = "auto"
    #: The kernels' fp32 products: tf32 (10-bit mantissa operands, fp32 accumulation), tf32x3
    #: (about fp32, three tf32 products) or ieee (fp32 FMA, slowest).
    kernel_precision: Precision = "tf32"
    #: The reference chunk step's Newton-Schulz on an fp32 momentum: fp32, or bf16 as Muon runs it
    #: (2.5-4x faster products where the CPU has bf16 matrix units, AMX or AVX512-BF16; slower where
    #: it has none). The fused kernels follow kernel_precision instead; float64 stays float64.
    ns_precision: NsPrecision = "fp32"


@functools.cache
def kernel_settings() -> KernelSettings:
    """The process's settings, read from the environment once (`kernel_settings.cache_clear()`
    re-reads them)."""
    return KernelSettings()
