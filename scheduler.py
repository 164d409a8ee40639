"""Learning-rate schedule of the official release: log-linear decay with a delayed warm-up."""

import math


def learning_rate(step, lr_init, lr_final, max_steps, lr_delay_steps=0, lr_delay_mult=1.0):
    """The learning rate at `step`, a pure function of the step.

    Log-linear interpolation from `lr_init` at step 0 to `lr_final` at
    `max_steps` (exponential decay). With `lr_delay_steps > 0` the rate is
    also scaled by a reverse-cosine ease from `lr_delay_mult` at step 0 to 1
    at `lr_delay_steps` and after.
    """
    if lr_delay_steps > 0:
        frac = min(max(step / lr_delay_steps, 0.0), 1.0)
        delay_rate = lr_delay_mult + (1 - lr_delay_mult) * math.sin(0.5 * math.pi * frac)
    else:
        delay_rate = 1.0
    t = min(max(step / max_steps, 0.0), 1.0)
    return delay_rate * math.exp(math.log(lr_init) * (1 - t) + math.log(lr_final) * t)


class Schedule:
    """`learning_rate` with the config's constants, times `scale`.

    `scale` is 1 unless training halved it after non-finite steps; it is the
    schedule's only state and is saved with checkpoints.
    """

    def __init__(self, cfg, scale=1.0):
        self.cfg, self.scale = cfg, scale

    def __call__(self, step):
        c = self.cfg
        return self.scale * learning_rate(step, c.lr_init, c.lr_final, c.max_steps, c.lr_delay_steps, c.lr_delay_mult)

    def apply(self, optimizer, step):
        """Set the optimizer's rate for `step`; returns it. A rate held in a tensor (train_utils.Stepper's
        CUDA graph reads it there) is filled in place."""
        lr = self(step)
        for group in optimizer.param_groups:
            if hasattr(group['lr'], 'fill_'):
                group['lr'].fill_(lr)
            else:
                group['lr'] = lr
        return lr

    def state_dict(self):
        return {'scale': self.scale}

    def load_state_dict(self, state):
        self.scale = state['scale']
