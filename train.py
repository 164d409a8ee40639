"""Train mip-NeRF.

    python train.py --config configs/demo.txt          # the built-in demo scene
    python train.py --config configs/blender.txt --scene lego
    python train.py --config configs/blender.txt --scene lego --resume

One loop with named cadences: `log_every` (TensorBoard scalars, progress
bar), `render_every` (a rendered test view in TensorBoard), `eval_every`
(PSNR over the test views) and `save_every` (checkpoint). Checkpoints carry
the model arguments and the config, so every script rebuilds the model from
them.
"""
import dataclasses
import json
import os
import sys
import time

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import config as config_lib
import datasets
from loss import mipnerf_loss, mse_to_psnr
from model import MipNeRF, list_checkpoints
from scheduler import make_scheduler
from visualize import colorize_depth


# ----------------------------------------------------------------------------
# Checkpoints.

def checkpoint_path(log_dir, step):
    return os.path.join(log_dir, f'ckpt_{step:07d}.pt')


def save_checkpoint(path, state):
    """Write atomically: a temporary file in the same folder, fsync, rename."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = path + '.tmp'
    with open(tmp, 'wb') as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune_checkpoints(log_dir, keep):
    for old in list_checkpoints(log_dir)[:-keep]:
        os.remove(old)


def rng_state():
    state = {'cpu': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state['cpu'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


# ----------------------------------------------------------------------------
# Evaluation.

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


# ----------------------------------------------------------------------------

def fail(message):
    sys.stderr.write(f'train.py: error: {message}\n')
    sys.exit(2)


def main(argv=None):
    cfg = config_lib.get_config(argv)
    device = config_lib.resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)

    if cfg.dataset_name == 'demo' and not os.path.isdir(cfg.base_dir):
        from scripts.make_demo import make_demo_scene
        print(f'demo scene not found in {cfg.base_dir}: generating it (about half a minute)')
        make_demo_scene(cfg.base_dir)
    try:
        train_data = datasets.dataset_from_config(cfg, 'train')
        test_data = datasets.dataset_from_config(cfg, 'test')
    except datasets.DataError as e:
        fail(e)

    model = MipNeRF.from_config(cfg).to(device)
    if cfg.compile:
        model.mlp.compile()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr_init)
    scheduler = make_scheduler(optimizer, cfg)
    sampler = datasets.RaySampler(train_data, cfg.batch_size, device, seed=cfg.seed)
    step = 0

    if cfg.resume:
        path = cfg.resume
        if path == 'latest':
            found = list_checkpoints(cfg.log_dir)
            path = found[-1] if found else None
            if path is None:
                print(f'--resume: no checkpoint in {cfg.log_dir} yet, starting from step 0')
        elif not os.path.isfile(path):
            fail(f'--resume {path}: no such checkpoint (omit the path to take the latest in --log_dir)')
        if path is not None:
            ckpt = torch.load(path, map_location=device, weights_only=False)
            if ckpt['model_args'] != dataclasses.asdict(model.args):
                diff = {k: v for k, v in ckpt['model_args'].items() if dataclasses.asdict(model.args).get(k) != v}
                fail(f'--resume {path}: the checkpoint has a different network ({diff}); '
                     'pass the same model flags or another --log_dir')
            model.load_state_dict(ckpt['model'])
            optimizer.load_state_dict(ckpt['optimizer'])
            scheduler.load_state_dict(ckpt['scheduler'])
            sampler.load_state_dict(ckpt['sampler'])
            set_rng_state(ckpt['rng'])
            step = ckpt['step']
            print(f'resumed from {path} at step {step}')
    os.makedirs(cfg.log_dir, exist_ok=True)
    config_lib.save_config(cfg, os.path.join(cfg.log_dir, 'config.txt'))

    def save(step):
        save_checkpoint(checkpoint_path(cfg.log_dir, step), {
            'step': step, 'model_args': dataclasses.asdict(model.args), 'config': vars(cfg),
            'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
            'scheduler': scheduler.state_dict(), 'sampler': sampler.state_dict(), 'rng': rng_state()})
        prune_checkpoints(cfg.log_dir, cfg.keep_checkpoints)

    writer = SummaryWriter(cfg.log_dir)  # appends: earlier runs' logs stay
    num_params = sum(p.numel() for p in model.parameters())
    print(f'{num_params:,} parameters, {len(train_data)} training views of {train_data.w}x{train_data.h}, '
          f'device {device}, logging to {cfg.log_dir}')
    eval_log = os.path.join(cfg.log_dir, 'eval.jsonl')
    t_start = time.time()
    t_window, window_psnr, window_steps = time.time(), 0., 0
    eval_seconds = 0.   # time spent rendering for TensorBoard and evaluation

    model.train()
    pbar = tqdm(total=cfg.max_steps, initial=step, dynamic_ncols=True, desc='train')
    try:
        while step < cfg.max_steps:
            rays, target = sampler.sample()
            lossmult = torch.ones_like(rays.lossmult) if cfg.disable_multiscale_loss else rays.lossmult
            levels = model(rays)
            loss, mses, psnrs = mipnerf_loss(levels, target, lossmult, cfg.coarse_loss_mult)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_max_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_max_norm)
            lr = optimizer.param_groups[0]['lr']   # the rate of this step
            optimizer.step()
            scheduler.step()
            step += 1
            pbar.update(1)
            window_psnr = window_psnr + psnrs[-1]
            window_steps += 1

            if step % cfg.log_every == 0 or step == cfg.max_steps:
                rays_per_sec = window_steps * cfg.batch_size / (time.time() - t_window)
                avg_psnr = float(window_psnr) / window_steps
                writer.add_scalar('train/loss', loss.item(), step)
                for name, p in zip(level_names(len(psnrs)), psnrs.tolist()):
                    writer.add_scalar(f'train/psnr_{name}', p, step)
                writer.add_scalar('train/psnr_avg', avg_psnr, step)
                writer.add_scalar('train/lr', lr, step)
                writer.add_scalar('train/rays_per_sec', rays_per_sec, step)
                pbar.set_postfix(loss=f'{loss.item():.4f}', psnr=f'{avg_psnr:.2f}', rays_s=f'{rays_per_sec:,.0f}')
                t_window, window_psnr, window_steps = time.time(), 0., 0

            t_eval = time.time()
            if cfg.render_every and step % cfg.render_every == 0:
                i = (step // cfg.render_every) % len(test_data)
                rgb, distance, acc = model.render_image(test_data.rays_of_image(i), cfg.chunk)
                writer.add_image('test/rgb', rgb.clamp(0, 1).cpu(), step, dataformats='HWC')
                writer.add_image('test/target', test_data.images[i], step, dataformats='HWC')
                writer.add_image('test/depth', colorize_depth(distance, cfg.near, cfg.far, acc), step, dataformats='HWC')
                writer.add_image('test/acc', acc.clamp(0, 1).cpu(), step, dataformats='HW')

            out_of_time = cfg.max_minutes > 0 and t_eval - t_start - eval_seconds > 60 * cfg.max_minutes
            last = step == cfg.max_steps or out_of_time
            if cfg.eval_every and (step % cfg.eval_every == 0 or last):
                # A subset of views (--eval_views) during training; all of them at the end.
                indices = eval_view_indices(len(test_data), 0 if last else cfg.eval_views)
                psnr = evaluate(model, test_data, indices, cfg.chunk)
                writer.add_scalar('test/psnr', psnr, step)
                with open(eval_log, 'a') as f:   # seconds since this process started
                    f.write(json.dumps({'step': step, 'psnr': psnr, 'views': len(indices),
                                        'wall_seconds': round(time.time() - t_start, 1),
                                        'train_seconds': round(t_eval - t_start - eval_seconds, 1)}) + '\n')
                tqdm.write(f'step {step}: test PSNR {psnr:.2f} dB over {len(indices)} views '
                           f'({time.time() - t_eval:.1f} s)')
            dt = time.time() - t_eval
            eval_seconds += dt
            t_window += dt   # keep rendering time out of rays/s

            if (cfg.save_every and step % cfg.save_every == 0) or last:
                save(step)
            if out_of_time:
                tqdm.write(f'--max_minutes {cfg.max_minutes:g} reached at step {step}')
                break
    except KeyboardInterrupt:
        save(step)
        pbar.close()
        print(f'\ninterrupted: saved step {step} to {cfg.log_dir}; continue with the same command plus --resume')
        sys.exit(130)
    pbar.close()
    writer.close()
    print(f'done: {step} steps, checkpoint in {cfg.log_dir}')


def level_names(n):
    return ['coarse', 'fine'] if n == 2 else [f'level{i}' for i in range(n)]


if __name__ == '__main__':
    main()
