"""Train mip-NeRF.

    python train.py --config configs/demo.txt          # the built-in demo scene
    python train.py --config configs/blender.txt --scene lego
    python train.py --config configs/blender.txt --scene lego --resume

One loop with named cadences: `log_every` (TensorBoard scalars, progress
bar), `render_every` (a rendered test view in TensorBoard), `eval_every`
(PSNR over the test views) and `save_every` (checkpoint). Checkpoints carry
the model arguments and the config, so every script rebuilds the model from
them; they are written atomically and the last `keep_checkpoints` are kept.
Ctrl-C and SIGTERM save a checkpoint and stop; a step whose loss or gradient
is not finite is skipped, and after `max_nonfinite` of them in a row the last
checkpoint is reloaded with half the learning rate. The loop's pieces are in
train_utils.py; torch loads only once the flags are known to be good.
"""

import os
import sys
import time

import cli
import config

PROG = 'train.py'


def main(argv=None):
    """Parse flags and train; SIGINT and SIGTERM ask the loop to save and stop."""
    cfg = config.get_config(argv, prog=PROG)
    existed = os.path.isdir(cfg.log_dir)
    import datasets
    import ddp
    import train_utils as tu

    try:
        try:
            with cli.stop_on_signals(defer=True) as signals:
                run(cfg, signals)
        except (config.ConfigError, datasets.DataError) as e:
            cli.fail(PROG, e)
        except tu.Diverged as e:
            sys.stderr.write(f'{PROG}: error: {e}\n')
            sys.exit(1)
        except cli.Stopped as e:  # a second Ctrl-C: stop at once, without saving
            sys.stderr.write(f'{PROG}: stopped at once by a second {e.name}; the last checkpoint is kept\n')
            sys.exit(e.exit_code)
    except SystemExit as e:  # a refusal before anything was written leaves no empty --log_dir behind
        if e.code not in (0, None) and not existed and os.path.isdir(cfg.log_dir) and not os.listdir(cfg.log_dir):
            os.rmdir(cfg.log_dir)
        raise
    finally:
        ddp.cleanup()  # after the DDP wrapper is gone (ddp.cleanup says why)


def run(cfg, signals):
    """Train with the config `cfg`; a signal recorded in `signals` ends the loop cleanly."""
    import train_utils as tu

    state = tu.setup(cfg)
    if state is None:
        return
    try:
        code = loop(state, signals)
    finally:
        tu.close(state)  # --log_dir is free again
    if code:
        sys.exit(code)


def loop(state, signals):
    """The training loop with its cadences; returns the exit code (train_utils.finish)."""
    import torch
    from tqdm import tqdm

    import ddp
    import train_utils as tu

    cfg, main = state.cfg, state.main
    bar = tqdm(
        total=cfg.max_steps, initial=state.step, desc='train', dynamic_ncols=True, disable=None if main else True
    )  # None: off when the output is not a terminal
    while True:
        # One decision for all ranks: a signal anywhere, or the time budget spent.
        out_of_time = main and cfg.max_minutes > 0 and state.train_seconds() > 60 * cfg.max_minutes
        signalled, out_of_time = ddp.any_rank([signals.signum is not None, out_of_time], state.device)
        if state.step >= cfg.max_steps or signalled or out_of_time:
            bar.update(tu.settle(state))  # the last step's flag, before finish saves
            break
        loss, psnrs, grad_norm, finite = state.stepper(state.step)
        state.step += 1  # counted now, taken back by settle if it was not finite
        bar.update(1)
        state.window[1:] = [state.window[1] + torch.where(finite, psnrs[-1], 0.0), state.window[2] + 1]  # no sync
        # The step before is done or nearly: read its flag while the device works on this one.
        bar.update(tu.settle(state, then=tu.DeviceFlag(finite)))
        if due(cfg, state.step):  # what follows reads the step count: this step's flag first
            bar.update(tu.settle(state))
        step = state.step
        if main and (step % cfg.log_every == 0 or step == cfg.max_steps):
            tu.log_scalars(state, loss, psnrs, grad_norm, bar)
        if main:  # a signal stops a render at once; the loop then saves and stops
            t = time.time()
            if cfg.render_every and step % cfg.render_every == 0:
                tu.interruptible(signals, tu.preview, state)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
                tu.interruptible(signals, tu.evaluate, state, cfg.eval_views)
            state.eval_seconds += time.time() - t
            state.window[0] += time.time() - t  # keep rendering time out of rays/s
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
            tu.save(state)
    bar.close()
    return tu.finish(state, signals, signalled, out_of_time)


def due(cfg, step):
    """Whether step `step` logs, renders, evaluates or saves, or is the last."""
    cadences = (cfg.log_every, cfg.render_every, cfg.eval_every, cfg.save_every)
    return step >= cfg.max_steps or any(every and step % every == 0 for every in cadences)


if __name__ == '__main__':
    main()
