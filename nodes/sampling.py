"""Sampling drivers: running the host's own sampler for measurements (sensitivity, attribution).

The nodes that measure layers need the inputs the model really sees when sampling: the host's CFG,
conditioning and model_sampling, along one trajectory. ``with_states`` walks a float Euler
trajectory inside ``comfy.sample.sample_custom`` with a custom sampler, records its (x, sigma)
states and hands ``body`` a function that re-evaluates the denoiser on any of them, so every
measurement sees identical inputs.
"""
from __future__ import annotations

import torch


def with_states(model, positive, negative, latent, seed, steps, cfg, scheduler, body):
    """Run ``body(evaluate, sigmas)`` inside the host sampler: ``evaluate(i)`` is the denoiser (host CFG and
    conditioning) at state i of one float Euler trajectory, the inputs the model really sees when sampling."""
    import comfy.sample
    import comfy.samplers
    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, seed)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).cpu()
    box = {}

    def sampler(denoiser, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}
        s_in = x.new_ones([x.shape[0]])
        states = []
        with torch.no_grad():
            for i in range(len(sigmas) - 1):
                states.append((x.clone(), sigmas[i]))
                d = denoiser(x, sigmas[i] * s_in, **extra_args)
                x = x + (x - d) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        box["r"] = body(lambda i: denoiser(states[i][0], states[i][1] * s_in, **extra_args),
                        [float(s) for _, s in states])
        return x

    comfy.sample.sample_custom(model, noise, cfg, comfy.samplers.KSAMPLER(sampler), sigmas, positive,
                               negative if negative is not None else positive, latent_image, seed=seed)
    return box["r"]


def with_fixed_run(model, positive, negative, latent, seed, steps, cfg, scheduler, body):
    """``body(run)``: ``run()`` evaluates the denoiser at every recorded state, concatenated."""
    return with_states(model, positive, negative, latent, seed, steps, cfg, scheduler,
                       lambda evaluate, sigmas: body(lambda: torch.cat([evaluate(i) for i in range(len(sigmas))])))
