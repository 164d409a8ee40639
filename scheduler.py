"""Learning-rate schedule of the official release: log-linear decay with a delayed warm-up."""
import math

import torch


def learning_rate(step, lr_init, lr_final, max_steps, lr_delay_steps=0, lr_delay_mult=1.):
    """The learning rate at `step`, a pure function of the step.

    Log-linear interpolation from `lr_init` at step 0 to `lr_final` at
    `max_steps` (exponential decay). With `lr_delay_steps > 0` the rate is
    also scaled by a reverse-cosine ease from `lr_delay_mult` at step 0 to 1
    at `lr_delay_steps` and after.
    """
    if lr_delay_steps > 0:
        frac = min(max(step / lr_delay_steps, 0.), 1.)
        delay_rate = lr_delay_mult + (1 - lr_delay_mult) * math.sin(0.5 * math.pi * frac)
    else:
        delay_rate = 1.
    t = min(max(step / max_steps, 0.), 1.)
    return delay_rate * math.exp(math.log(lr_init) * (1 - t) + math.log(lr_final) * t)


def make_scheduler(optimizer, cfg):
    """A LambdaLR whose rate at step s is `learning_rate(s, ...)` from `cfg`.

    The optimizer's base rate must be `cfg.lr_init`; `scheduler.step()` is
    called once after each optimizer step.
    """
    def factor(step):
        return learning_rate(step, cfg.lr_init, cfg.lr_final, cfg.max_steps,
                             cfg.lr_delay_steps, cfg.lr_delay_mult) / cfg.lr_init
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
