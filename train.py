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
checkpoint is reloaded with half the learning rate.
"""
import copy
import dataclasses
import json
import os
import signal
import sys
import time

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import config as config_lib
import datasets
import ddp
from loss import level_weights, mipnerf_loss, mse_to_psnr, total_loss, weighted_mse
from model import CHECKPOINT_KEYS, MipNeRF, list_checkpoints, read_checkpoint
from scheduler import Schedule
from visualize import colorize_depth

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


# ----------------------------------------------------------------------------
# Checkpoints.

def checkpoint_path(log_dir, step):
    return os.path.join(log_dir, f'ckpt_{step:07d}.pt')


def save_checkpoint(path, state):
    """Write atomically: a temporary file in the same folder, flush, fsync, rename.

    On failure (a full disk, say) the temporary file is removed, earlier
    checkpoints are untouched, and the OSError propagates.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = path + '.tmp'
    try:
        with open(tmp, 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_training_checkpoint(path, device):
    """A checkpoint with everything a resume needs; ValueError with a one-line reason otherwise."""
    return read_checkpoint(path, device, CHECKPOINT_KEYS + ('optimizer', 'schedule'))


def prune_checkpoints(log_dir, keep):
    for old in list_checkpoints(log_dir)[:-keep]:
        os.remove(old)


def rng_state():
    state = {'cpu': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    # RNG states must be CPU byte tensors; torch.load(map_location=cuda) moved them.
    torch.set_rng_state(state['cpu'].cpu())
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state['cuda']])


def host_memory_mb():
    """Resident memory of this process in MB (Linux), or None."""
    try:
        with open('/proc/self/statm') as f:
            return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2 ** 20
    except (OSError, ValueError, IndexError):
        return None


# ----------------------------------------------------------------------------
# Steps and evaluation.

def train_step(model, optimizer, schedule, sampler, cfg, step):
    """One optimization step on a fresh batch of rays; `step` steps are done before it.

    The update uses the rate of step `step + 1`, as the official loop, which
    counts steps from 1 (the last update uses lr_final). Returns (loss, per-level PSNRs, gradient norm, finite). When the loss or
    the gradient is not finite, the parameters are left unchanged.
    """
    rays, target = sampler.sample()
    lossmult = torch.ones_like(rays.lossmult) if cfg.disable_multiscale_loss else rays.lossmult
    optimizer.zero_grad(set_to_none=True)
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) or not model.args.stop_level_grad:
        loss, _, psnrs = mipnerf_loss(model(rays), target, lossmult, cfg.coarse_loss_mult)
        loss.backward()
    else:
        # Level by level: no gradient flows between levels, so each level's loss is
        # backpropagated before the next level runs and only one level's activations are
        # held (half the memory). The gradient is the same sum as one backward of the total.
        mses = []
        for w, (rgb, *_) in zip(level_weights(model.args.num_levels, cfg.coarse_loss_mult), model.levels(rays)):
            mse = weighted_mse(rgb, target, lossmult)
            (w * mse).backward()
            mses.append(mse.detach())
        mses = torch.stack(mses)
        loss, psnrs = total_loss(mses, cfg.coarse_loss_mult), mse_to_psnr(mses)
    max_norm = cfg.grad_max_norm if cfg.grad_max_norm > 0 else float('inf')
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    finite = bool(torch.isfinite(loss.detach() + grad_norm))
    if finite:
        schedule.apply(optimizer, step + 1)
        optimizer.step()
    return loss.detach(), psnrs, grad_norm, finite


def eval_view_indices(n, eval_views):
    """`eval_views` evenly spaced test views (all of them for 0)."""
    if eval_views <= 0 or eval_views >= n:
        return list(range(n))
    return sorted({round(i * n / eval_views) for i in range(eval_views)})


@torch.no_grad()
def evaluate(model, data, indices, chunk):
    """Mean over the views of the per-view PSNR of the fine level."""
    psnrs = []
    for i in indices:
        rgb = model.render_image(data.rays_of_image(i), chunk)[0]
        psnrs.append(float(mse_to_psnr(((rgb - data.images[i].to(rgb.device)) ** 2).mean())))
    return sum(psnrs) / len(psnrs)


def level_names(n):
    return ['coarse', 'fine'] if n == 2 else [f'level{i}' for i in range(n)]


# ----------------------------------------------------------------------------

def fail(message):
    config_lib.fail('train.py', message)


def prepare_log_dir(cfg):
    """Make --log_dir before the data loads; refuse a file, an unwritable place, or another run's
    checkpoints without --resume (a new run there would prune them and mix the two logs)."""
    d = cfg.log_dir
    if os.path.exists(d) and not os.path.isdir(d):
        fail(f'--log_dir {d} is a file: pass a folder')
    found = list_checkpoints(d) if os.path.isdir(d) else []
    if found and not cfg.resume:
        fail(f'--log_dir {d} already holds a run (latest {os.path.basename(found[-1])}): '
             'add --resume to continue it, or pass another --log_dir')
    try:
        os.makedirs(d, exist_ok=True)
    except OSError as e:
        fail(f'--log_dir {d}: cannot create it ({e.strerror}): pass a writable folder')
    if not os.access(d, os.W_OK | os.X_OK):
        fail(f'--log_dir {d} is not writable: pass a writable folder')


def resolve_resume(cfg, device):
    """The checkpoint to resume from (dict) or None; falls back past unreadable ones for 'latest'."""
    if not cfg.resume:
        return None
    if cfg.resume != 'latest':
        if not os.path.isfile(cfg.resume):
            fail(f'--resume {cfg.resume}: no such checkpoint (omit the path to take the latest in --log_dir)')
        try:
            return load_training_checkpoint(cfg.resume, device)
        except ValueError as e:
            fail(f'--resume: {e}; pass an earlier one')
    for path in reversed(list_checkpoints(cfg.log_dir)):
        try:
            return load_training_checkpoint(path, device)
        except ValueError as e:
            print(f'--resume: {e}; trying the one before')
    print(f'--resume: no checkpoint in {cfg.log_dir} yet, starting from step 0')
    return None


def main(argv=None):
    """Parse flags and train; SIGINT and SIGTERM ask the loop to save and stop."""
    cfg = config_lib.get_config(argv)
    existed = os.path.isdir(cfg.log_dir)
    stop = {'signal': None}

    def on_signal(signum, frame):
        if stop['signal'] is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt       # a second Ctrl-C stops at once
        stop['signal'] = signum
    previous_handlers = {s: signal.signal(s, on_signal) for s in EXIT_CODES}
    try:
        run(cfg, stop)
    except SystemExit as e:   # a refusal before anything was written leaves no empty --log_dir behind
        if e.code not in (0, None) and not existed and os.path.isdir(cfg.log_dir) and not os.listdir(cfg.log_dir):
            os.rmdir(cfg.log_dir)
        raise
    finally:
        for s, h in previous_handlers.items():
            signal.signal(s, h)
        ddp.cleanup()


def run(cfg, stop):
    """Train with the config `cfg`; `stop['signal']` set by a handler ends the loop cleanly.

    Under torchrun every rank runs this: each draws its own rays (seed +
    rank), DistributedDataParallel averages the gradients, and rank 0 alone
    logs, evaluates and writes checkpoints.
    """
    device = ddp.setup(config_lib.resolve_device(cfg.device))
    rank, main = ddp.rank(), ddp.is_main()
    torch.manual_seed(cfg.seed)          # the same initial weights on every rank

    if main:
        prepare_log_dir(cfg)   # before anything slow: a refusal comes at once
    if cfg.dataset_name == 'demo' and not os.path.isdir(cfg.base_dir) and main:
        from scripts.make_demo import make_demo_scene
        print(f'demo scene not found in {cfg.base_dir}: generating it (about half a minute)')
        make_demo_scene(cfg.base_dir)
    if main and cfg.lr_delay_steps >= cfg.max_steps:
        print(f'note: --lr_delay_steps {cfg.lr_delay_steps} >= --max_steps {cfg.max_steps}: the warm-up spans the '
              f'whole run (the rate starts at {cfg.lr_delay_mult:g} x lr_init); scale it down for short runs')
    ddp.barrier()
    try:
        train_data = datasets.dataset_from_config(cfg, 'train')
        test_data = datasets.dataset_from_config(cfg, 'test') if main else None
    except datasets.DataError as e:
        fail(e)

    model = MipNeRF.from_config(cfg).to(device)
    reason = model.fused_reason(device)
    if cfg.kernels == 'triton' and reason:
        fail(f'--kernels triton: {reason}; use --kernels torch')
    if main and reason is None:
        print('MLP: fused Triton kernels (bf16)')
    if cfg.compile:
        model.mlp.compile()
    net = model
    if ddp.launched():
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)
    optimizer = model.watch_optimizer(torch.optim.Adam(model.parameters(), lr=cfg.lr_init))
    schedule = Schedule(cfg)
    sampler = datasets.RaySampler(train_data, cfg.batch_size, device, seed=cfg.seed + rank,
                                  batching=cfg.batching)
    if rank:
        torch.manual_seed(cfg.seed + rank)   # this rank's own jitter and noise
    model_args = dataclasses.asdict(model.args)
    step = 0

    def restore(ckpt, with_rng):
        model.load_state_dict(ckpt['model'])
        optimizer.load_state_dict(ckpt['optimizer'])
        schedule.load_state_dict(ckpt['schedule'])
        if with_rng:
            states = ckpt.get('rank_states') or [{'sampler': ckpt['sampler'], 'rng': ckpt['rng']}]
            if len(states) == ddp.world_size():
                sampler.load_state_dict(states[rank]['sampler'])
                set_rng_state(states[rank]['rng'])
            else:   # a different number of processes: fresh streams, distinct per rank and step
                sampler.generator.manual_seed(cfg.seed + rank + 1000003 * ckpt['step'])
                torch.manual_seed(cfg.seed + rank + 1000003 * ckpt['step'])
        return ckpt['step']

    ckpt = resolve_resume(cfg, device)
    if ckpt is not None:
        if ckpt['model_args'] != model_args:
            diff = ', '.join(f'{k}: {v} there, {model_args.get(k)} here'
                             for k, v in ckpt['model_args'].items() if model_args.get(k) != v)
            fail(f'--resume {ckpt["path"]}: the checkpoint has a different network ({diff}); '
                 'pass the same model flags or another --log_dir')
        step = restore(ckpt, with_rng=True)
        if step >= cfg.max_steps:
            if main:
                print(f'{ckpt["path"]} is at step {step} and --max_steps is {cfg.max_steps}: '
                      'nothing to train (raise --max_steps to go on)')
            return
        if main:
            print(f'resumed from {ckpt["path"]} at step {step}')
    initial = copy.deepcopy({'step': step, 'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                             'schedule': schedule.state_dict()})
    if main:
        os.makedirs(cfg.log_dir, exist_ok=True)
        config_lib.save_config(cfg, os.path.join(cfg.log_dir, 'config.txt'))

    def save(step):
        """Save (rank 0) and prune; on an OSError keep going and say so. Returns whether it saved.

        Every rank calls it: the ranks' sampler and RNG states are gathered so
        that a resume with as many processes continues their streams exactly.
        """
        states = ddp.gather({'sampler': sampler.state_dict(), 'rng': rng_state()})
        if not main:
            return True
        path = checkpoint_path(cfg.log_dir, step)
        try:
            save_checkpoint(path, {
                'step': step, 'model_args': model_args, 'config': vars(cfg), 'model': model.state_dict(),
                'optimizer': optimizer.state_dict(), 'schedule': schedule.state_dict(),
                'sampler': states[0]['sampler'], 'rng': states[0]['rng'],
                'rank_states': states if len(states) > 1 else None, 'world_size': len(states)})
        except OSError as e:
            previous = list_checkpoints(cfg.log_dir)
            tqdm.write(f'could not save {path}: {e}; '
                       + (f'{previous[-1]} is intact' if previous else 'no earlier checkpoint exists'))
            return False
        prune_checkpoints(cfg.log_dir, cfg.keep_checkpoints)
        return True

    def evaluate_and_log(step, indices, t_eval):
        psnr = evaluate(model, test_data, indices, cfg.chunk)
        writer.add_scalar('test/psnr', psnr, step)
        with open(eval_log, 'a') as f:   # seconds since this process started
            f.write(json.dumps({'step': step, 'psnr': psnr, 'views': len(indices),
                                'wall_seconds': round(time.time() - t_start, 1),
                                'train_seconds': round(t_eval - t_start - eval_seconds, 1)}) + '\n')
        tqdm.write(f'step {step}: test PSNR {psnr:.2f} dB over {len(indices)} views ({time.time() - t_eval:.1f} s)')

    writer = SummaryWriter(cfg.log_dir) if main else None  # appends: earlier runs' logs stay
    if main:
        num_params = sum(p.numel() for p in model.parameters())
        print(f'{num_params:,} parameters, {len(train_data)} training views of {train_data.w}x{train_data.h}, '
              f'device {device}' + (f' x {ddp.world_size()} processes' if ddp.launched() else '')
              + f', logging to {cfg.log_dir}')
    eval_log = os.path.join(cfg.log_dir, 'eval.jsonl')
    t_start = time.time()
    t_window, window_psnr, window_steps = time.time(), 0., 0
    eval_seconds = 0.   # time spent rendering for TensorBoard and evaluation
    nonfinite, saved_at, evaluated_at = 0, None, None

    model.train()
    pbar = tqdm(total=cfg.max_steps, initial=step, dynamic_ncols=True, desc='train', disable=not main)
    while True:
        # One decision for all ranks: a signal anywhere, or the time budget spent.
        out_of_time = main and cfg.max_minutes > 0 and time.time() - t_start - eval_seconds > 60 * cfg.max_minutes
        signalled, out_of_time = ddp.any_rank([stop['signal'] is not None, out_of_time], device)
        if step >= cfg.max_steps or signalled or out_of_time:
            break
        loss, psnrs, grad_norm, finite = train_step(net, optimizer, schedule, sampler, cfg, step)
        if not finite:
            nonfinite += 1
            if main:
                writer.add_scalar('train/nonfinite_skipped', nonfinite, step)
                tqdm.write(f'step {step}: non-finite loss or gradient; step skipped ({nonfinite} in a row)')
            if nonfinite >= cfg.max_nonfinite:
                found = list_checkpoints(cfg.log_dir)
                source = found[-1] if found else 'the initial state'
                back = restore(load_training_checkpoint(found[-1], device) if found else initial, with_rng=False)
                schedule.scale *= 0.5
                if main:
                    tqdm.write(f'{nonfinite} non-finite steps in a row: reloaded {source} (step {back}) and '
                               f'halved the learning rate (now {schedule.scale:g} x the schedule)')
                pbar.update(back - step)
                step, nonfinite = back, 0
            continue
        nonfinite = 0
        step += 1
        pbar.update(1)
        window_psnr = window_psnr + psnrs[-1]
        window_steps += 1

        if main and (step % cfg.log_every == 0 or step == cfg.max_steps):
            rays_per_sec = window_steps * cfg.batch_size * ddp.world_size() / (time.time() - t_window)
            avg_psnr = float(window_psnr) / window_steps
            writer.add_scalar('train/loss', loss.item(), step)
            for name, p in zip(level_names(len(psnrs)), psnrs.tolist()):
                writer.add_scalar(f'train/psnr_{name}', p, step)
            writer.add_scalar('train/psnr_avg', avg_psnr, step)
            writer.add_scalar('train/lr', optimizer.param_groups[0]['lr'], step)
            writer.add_scalar('train/grad_norm', grad_norm.item(), step)
            writer.add_scalar('train/rays_per_sec', rays_per_sec, step)
            rss = host_memory_mb()
            if rss is not None:
                writer.add_scalar('train/host_memory_mb', rss, step)
            pbar.set_postfix(loss=f'{loss.item():.4f}', psnr=f'{avg_psnr:.2f}', rays_s=f'{rays_per_sec:,.0f}')
            t_window, window_psnr, window_steps = time.time(), 0., 0

        t_eval = time.time()
        if main and cfg.render_every and step % cfg.render_every == 0:
            i = (step // cfg.render_every) % len(test_data)
            rgb, distance, acc = model.render_image(test_data.rays_of_image(i), cfg.chunk)
            writer.add_image('test/rgb', rgb.clamp(0, 1).cpu(), step, dataformats='HWC')
            writer.add_image('test/target', test_data.images[i], step, dataformats='HWC')
            writer.add_image('test/depth', colorize_depth(distance, cfg.near, cfg.far, acc), step, dataformats='HWC')
            writer.add_image('test/acc', acc.clamp(0, 1).cpu(), step, dataformats='HW')
        if main and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
            evaluate_and_log(step, eval_view_indices(len(test_data), cfg.eval_views), t_eval)
            evaluated_at = step
        dt = time.time() - t_eval
        eval_seconds += dt
        t_window += dt   # keep rendering time out of rays/s

        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
            saved_at = step if save(step) else None
    pbar.close()

    if signalled:
        saved = saved_at == step or save(step)
        if main:
            name = signal.Signals(stop['signal'] or signal.SIGTERM).name
            print(f'{name}: stopped at step {step}' + (f', saved {checkpoint_path(cfg.log_dir, step)}' if saved else '')
                  + '; continue with the same command plus --resume')
            writer.close()
        sys.exit(EXIT_CODES[stop['signal'] or signal.SIGTERM])
    if out_of_time and main:
        tqdm.write(f'--max_minutes {cfg.max_minutes:g} reached at step {step}')
    if main and cfg.eval_every and evaluated_at != step:   # the end: all test views
        evaluate_and_log(step, eval_view_indices(len(test_data), 0), time.time())
    saved = saved_at == step or save(step)
    if main:
        writer.close()
        if not saved:
            sys.stderr.write(f'train.py: error: the final checkpoint could not be saved to {cfg.log_dir} (see above)\n')
            sys.exit(1)
        print(f'done: {step} steps, checkpoint in {cfg.log_dir}')


if __name__ == '__main__':
    main()
