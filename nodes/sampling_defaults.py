"""One set of sampling defaults for every node that must match the user's KSampler.

Calibrate, QAT Fine-tune, Sensitivity Policy, Evaluate and the INT8 Sampler all sample the model to
measure or tune it; static scales, QAT targets and sensitivity rankings depend on cfg, scheduler and
steps (issue 15: defaults of cfg 7 / 8 / 1 / 3 and schedulers "simple" / "normal" gave scales for
settings nobody sampled with). The defaults are the host KSampler's own, so an untouched node measures
what an untouched KSampler samples.
"""
from __future__ import annotations

import comfy.samplers

STEPS = 20                                    # KSampler's default steps
CFG = 8.0                                     # KSampler's default cfg
SAMPLER = comfy.samplers.KSampler.SAMPLERS[0]      # KSampler's default: the first entry ("euler")
SCHEDULER = comfy.samplers.KSampler.SCHEDULERS[0]  # KSampler's default: the first entry ("simple")
MATCH_TIP = " Default = KSampler's; use what you will sample with."
