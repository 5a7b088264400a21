"""SamplingConfig: the sampling knobs (params section `sample`) and the CFG schedule names they accept.

No torch: the params loader (restok.config) imports this module, so a stage that only reads params does not
depend on the sampling code in restok.sampling or on the generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

CfgSchedule = Literal[
    "constant", "linear", "linear_re", "linear_constant", "triangular", "rectangular", "step", "cosine", "cosine_re"
]  # params sample.cfg_schedule: an enum in the schema
CFG_SCHEDULES = get_args(CfgSchedule)


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling knobs (params section `sample`); defaults are the reported setting (docs/method.md, generator §4)."""

    cfg_scale: float = 3.75
    cfg_schedule: CfgSchedule = "step"
    window_start: float = 0.25  # step: guidance from this ratio on; rectangular: window start (official 0.05)
    window_end: float = 1.0  # rectangular only
    peak: float = 0.5  # linear_constant and triangular
    min_cfg_scale: float = 1.0  # step and rectangular outside the window
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.95
    greedy: bool = False

    def __post_init__(self):
        if self.cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"sample.cfg_schedule={self.cfg_schedule!r}; allowed: {', '.join(CFG_SCHEDULES)}")
        if self.cfg_scale <= 0 or self.min_cfg_scale <= 0:
            raise ValueError(
                f"sample.cfg_scale and min_cfg_scale must be > 0, got {self.cfg_scale}, {self.min_cfg_scale}"
            )
        if not 0.0 <= self.window_start <= self.window_end or not 0.0 < self.peak < 1.0:
            raise ValueError(
                f"sample: need 0 <= window_start <= window_end and 0 < peak < 1, got "
                f"{self.window_start}, {self.window_end}, {self.peak}"
            )
        if self.temperature <= 0 or self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError(
                f"sample: need temperature > 0, top_k >= 0, 0 < top_p <= 1; got {self.temperature}, "
                f"{self.top_k}, {self.top_p}"
            )
