"""Accelerators this project plans for and reports MFU on: peak bf16 FLOP/s and memory per device.

A "device" is what one rank drives: one GPU, or one GCD of an MI250X (each of its 2 dies is its
own device with 64 GiB, so 8 MI250X are 16 devices).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Device:
    key: str  # the name `ioe-train plan --device` takes
    name: str  # a substring of torch.cuda.get_device_name (ROCm reports the marketing name too)
    bf16_flops: float  # dense (no sparsity) peak bf16 FLOP/s of one device
    memory_gib: float  # nominal capacity (torch reports ~1% less: "80 GB" H100 = 79.1 GiB)
    compute_units: int = 0  # tells devices of one name apart by SMs / CUs per device; 0: any


# Most specific first: the first entry whose name (and compute units, where given) match wins.
DEVICES = (
    # ROCm names both "AMD Instinct MI250X/MI250"; an MI250X GCD has 110 CUs, an MI250 GCD 104.
    Device("mi250x", "MI250X/MI250", 191.5e12, 64, compute_units=110),
    Device("mi250", "MI250X/MI250", 181.0e12, 64, compute_units=104),
    Device("mi300x", "MI300X", 1307e12, 192),
    Device("mi300a", "MI300A", 980.6e12, 128),
    Device("gh200", "GH200", 989e12, 96),  # before "H200", which its name contains
    Device("h200-nvl", "H200 NVL", 835e12, 141),
    Device("h200", "H200", 989e12, 141),
    Device("h100-nvl", "H100 NVL", 835e12, 94),
    Device("h100-pcie", "H100 PCIe", 756e12, 80),
    Device("h100", "H100", 989e12, 80),  # SXM ("NVIDIA H100 80GB HBM3")
    Device("a100", "A100", 312e12, 80),  # the 80 GB part; give --device-gib 40 for the other
    Device("l40s", "L40S", 362e12, 48),
)
BY_KEY = {d.key: d for d in DEVICES}


def match_device(name: str, compute_units: int) -> Device | None:
    """The table entry of a device called `name` with `compute_units` SMs/CUs, or None."""
    for d in DEVICES:
        if d.name in name and d.compute_units in (0, compute_units):
            return d
    return None


def peak_flops(device: torch.device) -> float | None:
    """Peak bf16 FLOP/s of `device`, or None where unknown (CPU): MFU is then not logged."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    found = match_device(props.name, props.multi_processor_count)
    return found.bf16_flops if found else None
