"""Small numeric helpers shared by losses, evaluation and distributed code."""
from __future__ import annotations

import torch


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Promote half/bfloat16 to float32 (for reductions and statistics); keep float32/float64 as is."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
