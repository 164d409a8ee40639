"""The pieces of train.py's loop, each a function of one `TrainState`.

    state = setup(cfg)                    # data, model, optimizer, sampler, resume
    loss, psnrs, grad_norm, finite = state.stepper(state.step)  # train_step, or its CUDA graph
    log_scalars(state, ...); preview(state); evaluate(state, views); save(state); recover(state)

Under torchrun every rank runs the loop: each draws its own rays (seed +
rank), DistributedDataParallel averages the gradients, and rank 0 alone
logs, evaluates and writes checkpoints (`state.main`). Functions raise
`config.ConfigError` (or `datasets.DataError`) with a one-line message for
train.py to print.
"""

import argparse
import copy
import dataclasses
import json
import os
import sys
import time

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import cli
import config
import datasets
import ddp
import runs
import scenes
import vis
from loss import level_weights, mipnerf_loss, mse_to_psnr, total_loss, weighted_mse
from model import MipNeRF
from model360 import loss360
from scheduler import Schedule


@dataclasses.dataclass
class TrainState:
    """Everything the loop reads and changes, as multinerf's TrainState (plus the loop's clocks)."""

    cfg: argparse.Namespace
    model: MipNeRF  # the network: weights, rendering
    net: torch.nn.Module  # what trains: the model, or its DDP wrapper under torchrun
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    sampler: datasets.RaySampler
    device: torch.device
    main: bool  # rank 0: logs, evaluates, saves
    test_data: datasets.SceneData = None  # rank 0 only
    writer: SummaryWriter = None  # rank 0 only
    lock: cli.Lock = None  # rank 0: --log_dir is this run's
    step: int = 0
    initial: dict = None  # the state at the start, for a rollback before any checkpoint
    nonfinite: int = 0  # non-finite steps in a row
    pending: 'DeviceFlag' = None  # the last launched step's `finite`, not read yet (`settle`)
    stepper: 'Stepper' = None  # runs a step: `stepper(step)` as `train_step`
    rollbacks: int = 0  # reloads after non-finite steps
    saved_at: int = None  # the step of the last checkpoint this run wrote
    evaluated_at: int = None
    t_start: float = dataclasses.field(default_factory=time.time)
    eval_seconds: float = 0.0  # time spent rendering previews and evaluating
    resumed_seconds: float = 0.0  # training time before this process, from the resumed checkpoint
    window: list = dataclasses.field(default_factory=lambda: [time.time(), 0.0, 0])  # start, PSNR sum, steps

    def train_seconds(self, now=None):
        """Seconds of training in the run so far, over its resumes (what --max_minutes counts): the
        loop's time in this process, less previews and evaluations, plus the resumed checkpoint's."""
        return self.resumed_seconds + (time.time() if now is None else now) - self.t_start - self.eval_seconds


# ----------------------------------------------------------------------------
# Setting up and resuming.


def prepare_log_dir(cfg):
    """Make --log_dir before the data loads and lock it for this run; returns the `cli.Lock`.

    Refuses a file, an unwritable place, a folder another live run holds,
    or another run's checkpoints without --resume (a new run there would
    prune them and mix the two logs). Removes the partial checkpoint a
    crash may have left.
    """
    d = cfg.log_dir
    if os.path.exists(d) and not os.path.isdir(d):
        raise config.ConfigError(f'--log_dir {d} is a file: pass a folder')
    try:
        os.makedirs(d, exist_ok=True)
    except OSError as e:
        raise config.ConfigError(f'--log_dir {d}: cannot create it ({e.strerror}): pass a writable folder') from None
    if not os.access(d, os.W_OK | os.X_OK):
        raise config.ConfigError(f'--log_dir {d} is not writable: pass a writable folder')
    lock = cli.Lock(os.path.join(d, runs.LOCK))
    try:
        lock.acquire()
    except cli.Busy as e:
        raise config.ConfigError(f'--log_dir {d} is {e}: wait for that run to end, or pass another --log_dir') from None
    found = runs.list_checkpoints(d)
    if found and not cfg.resume:
        lock.release()
        raise config.ConfigError(
            f'--log_dir {d} already holds a run (latest {os.path.basename(found[-1])}): '
            'add --resume to continue it, or pass another --log_dir'
        )
    for path in runs.partial_checkpoints(d):
        print(f'removing {path}, a checkpoint a crash left half-written')
        os.remove(path)
    return lock


def close(state):
    """Let go of --log_dir (the run's lock); the end of every run, however it ends."""
    if state is not None and state.lock is not None:
        state.lock.release()


def setup(cfg):
    """Join the process group, check --log_dir, load the data, build the model and optimizer, resume.

    Returns the TrainState, or None when a resume finds nothing left to train.
    """
    device = ddp.setup(runs.resolve_device(cfg.device))
    lock = prepare_log_dir(cfg) if ddp.is_main() else None  # before anything slow: a refusal comes at once
    try:
        state = _setup(cfg, device)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    if state is None:
        if lock is not None:
            lock.release()
        return None
    state.lock = lock
    return state


def _setup(cfg, device):
    rank, main = ddp.rank(), ddp.is_main()
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    if main:
        if cfg.dataset_name == 'demo' and not os.path.isdir(cfg.base_dir):
            print(f'demo scene not found in {cfg.base_dir}: generating it (about half a minute)')
            scenes.make_demo_scene(cfg.base_dir)
        if cfg.lr_delay_steps >= cfg.max_steps:
            print(
                f'note: --lr_delay_steps {cfg.lr_delay_steps} >= --max_steps {cfg.max_steps}: the warm-up spans '
                f'the whole run (the rate starts at {cfg.lr_delay_mult:g} x lr_init); scale it down for short runs'
            )
    if cfg.compile:
        problem = runs.compile_problem(device)
        if problem:
            if main:
                print(f'--compile: torch.compile cannot run on {device} here ({problem}); training the plain MLP')
            cfg.compile = False
    ddp.barrier()
    train_data = datasets.dataset_from_config(cfg, 'train')
    model = runs.build_model(cfg).to(device)
    net = model
    if ddp.launched():
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None
        )
    state = TrainState(
        cfg,
        model,
        net,
        runs.build_optimizer(model, cfg),
        Schedule(cfg),
        datasets.RaySampler(train_data, cfg.batch_size, device, seed=cfg.seed + rank, batching=cfg.batching),
        device,
        main,
    )
    if rank:
        torch.manual_seed(cfg.seed + rank)  # this rank's own jitter and noise
    state.stepper = Stepper(net, state.optimizer, state.schedule, state.sampler, cfg, device)
    if not resume(state):
        return None
    state.initial = copy.deepcopy(runs.checkpoint(state))
    if main:
        state.test_data = datasets.dataset_from_config(cfg, 'test')
        try:
            config.save_config(cfg, os.path.join(cfg.log_dir, 'config.txt'))
        except OSError as e:
            raise config.ConfigError(
                f'--log_dir {cfg.log_dir}: cannot write config.txt ({e.strerror or e}): free some space there'
            ) from None
        state.writer = SummaryWriter(cfg.log_dir)  # appends: earlier runs' logs stay
        num_params = sum(p.numel() for p in model.parameters())
        print(
            f'{num_params:,} parameters, {len(train_data)} training views of {train_data.w}x{train_data.h}, '
            f'device {device}'
            + (f' x {ddp.world_size()} processes' if ddp.launched() else '')
            + f', logging to {cfg.log_dir}'
        )
    state.t_start = state.window[0] = time.time()
    return state


def resume(state):
    """With --resume, restore the checkpoint it names (or the latest readable one). False when
    that checkpoint is already at --max_steps (nothing to train)."""
    cfg, skipped = state.cfg, []
    if not cfg.resume:
        return True
    if cfg.resume != 'latest':
        if not os.path.isfile(cfg.resume):
            raise config.ConfigError(
                f'--resume {cfg.resume}: no such checkpoint (omit the path to take the latest in --log_dir)'
            )
        try:
            ckpt = runs.read_checkpoint(cfg.resume, state.device, runs.RESUME_KEYS)
        except ValueError as e:
            raise config.ConfigError(f'--resume: {e}; pass an earlier one') from None
    else:
        try:
            ckpt = runs.latest_checkpoint(
                cfg.log_dir,
                state.device,
                runs.RESUME_KEYS,
                note=lambda m: print(f'--resume: {m.replace("taking", "trying")}') if state.main else None,
                skipped=skipped,
            )
        except ValueError as e:
            raise config.ConfigError(
                f'--resume: {e} (a resume needs {", ".join(runs.RESUME_KEYS)}): pass another --log_dir for a new '
                'run, or --resume FILE'
            ) from None
        if ckpt is None:
            print(f'--resume: no checkpoint in {cfg.log_dir} yet, starting from step 0')
            return True
    model_args = dataclasses.asdict(state.model.args)
    there = dict(ckpt['model_args'])
    if set(there) <= set(model_args):  # a checkpoint of an earlier version: its missing fields had their defaults
        there = dataclasses.asdict(config.ModelArgs(**there))
    if there != model_args:
        diff = ', '.join(
            f'{k}: {v} there, {model_args.get(k)} here' for k, v in there.items() if model_args.get(k) != v
        )
        raise config.ConfigError(
            f'--resume {ckpt["path"]}: the checkpoint has a different network ({diff}); '
            'pass the same model flags or another --log_dir'
        )
    later = [p for p in runs.list_checkpoints(cfg.log_dir) if p not in skipped and runs.step_of(p) > ckpt['step']]
    if later:
        raise config.ConfigError(
            f'--resume {ckpt["path"]} is at step {ckpt["step"]}, but --log_dir holds later checkpoints '
            f'({", ".join(os.path.basename(p) for p in later)}) that this run would overwrite: resume from the latest '
            '(plain --resume), or move them out of the folder'
        )
    ddp.barrier()  # every rank has read its checkpoint: the skipped ones can move out of the way
    if state.main:
        for path in skipped:  # kept, never overwritten by this run's checkpoints
            os.replace(path, path + '.skipped')
            print(f'--resume: kept {path} as {os.path.basename(path)}.skipped')
    runs.restore(state, ckpt, with_rng=True)
    state.resumed_seconds = ckpt.get('train_seconds', 0.0)  # (a rollback keeps the clock running: not in restore)
    if state.step >= cfg.max_steps:
        if state.main:
            print(
                f'{ckpt["path"]} is at step {state.step} and --max_steps is {cfg.max_steps}: '
                'nothing to train (raise --max_steps to go on)'
            )
        return False
    if state.main:
        print(f'resumed from {ckpt["path"]} at step {state.step}')
    return True


# ----------------------------------------------------------------------------
# A step.


def train_step(model, optimizer, schedule, sampler, cfg, step):
    """One optimization step on a fresh batch of rays; `step` steps are done before it.

    The update uses the rate of step `step + 1`, as the official loop, which
    counts steps from 1 (the last update uses lr_final). Returns (loss,
    per-level PSNRs, gradient norm, finite), device tensors: nothing waits
    for the device. When the loss or the gradient is not finite, the
    parameters and the optimizer's state are left unchanged.
    """
    schedule.apply(optimizer, step + 1)
    return _step(model, optimizer, sampler, cfg, step)


def _step(model, optimizer, sampler, cfg, step):
    """`train_step` at the optimizer's current rate (what `Stepper` captures)."""
    rays, target = sampler.sample()
    lossmult = torch.ones_like(rays.lossmult) if cfg.disable_multiscale_loss else rays.lossmult
    optimizer.zero_grad(set_to_none=True)
    ddp_wrapped = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    args = (model.module if ddp_wrapped else model).args
    if args.model == 'mipnerf360':
        levels, history = model(rays, train_frac=step / cfg.max_steps, history=True)
        loss, mse = loss360(
            levels, history, target, lossmult, cfg.charb_padding, cfg.interlevel_loss_mult, cfg.distortion_loss_mult
        )
        loss.backward()
        psnrs = mse_to_psnr(mse.detach())[None]  # the final level's: the proposals render no colour
    elif ddp_wrapped or not args.stop_level_grad:
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
    grad_norm = clip_gradients(model.module if ddp_wrapped else model, cfg.grad_max_norm)
    finite = torch.isfinite(loss.detach() + grad_norm)
    if all(group.get('fused') for group in optimizer.param_groups):
        # No host read: a fused optimizer (runs.build_optimizer's Adam) skips the update
        # (parameters, moments, step count) on the device when found_inf is 1, as under a
        # GradScaler. The loop reads `finite` a step later.
        optimizer.found_inf = (~finite).float()
        optimizer.step()
    elif finite:  # any other optimizer: decided on the host
        optimizer.step()
    return loss.detach(), psnrs, grad_norm, finite


def clip_gradients(model, max_norm):
    """Clip the gradient of each of the model's MLPs to norm `max_norm` on its own (0: no clipping),
    as multinerf's `clip_gradients`: a global clip would let the NeRF MLP's gradient, ~100 times the
    proposal MLP's, shrink the proposal's far below Adam's epsilon. Returns the norm of the whole
    gradient before clipping.
    """
    norms = []
    for mlp in model.children():
        params = [p for p in mlp.parameters() if p.grad is not None]
        if params:  # no clip asked (the mip-NeRF default): the norm alone, no pass over the gradients
            norms.append(torch.nn.utils.get_total_norm([p.grad for p in params]))
            if max_norm > 0:
                torch.nn.utils.clip_grads_with_norm_(params, max_norm, norms[-1])
    return torch.linalg.vector_norm(torch.stack(norms))


class Stepper:
    """`train_step` as the loop and the benchmark call it: `stepper(step)`, the same arguments and results.

    On one CUDA device (no DDP), for mip-NeRF (the 360 model's step depends on the step count) with
    the fused Adam and `--cuda_graph` (default on), the step is replayed from one CUDA graph: the host
    launches one graph instead of about a thousand kernels (sampling, both levels' forward and
    backward, clipping, Adam), and the device does not wait between them. The first `WARMUP` calls
    run eagerly on a side stream (compilation, lazy state); the next one captures the step and
    replays it. At capture the learning rate becomes a device tensor, filled before each replay; the sampler's
    generator is registered with the graph, so each replay draws new rays. The results are copies
    (the graph's own are overwritten by the next replay). `runs.restore` (a rollback, a resume)
    drops the graph, which holds the optimizer state it replaces: the next call captures again. A
    capture that fails says so in one line and the run goes on without the graph.
    """

    WARMUP = 3

    def __init__(self, net, optimizer, schedule, sampler, cfg, device):
        self.args = (net, optimizer, schedule, sampler, cfg)
        self.problem = graph_problem(net, optimizer, cfg, device)
        self.graph = self.outputs = None
        self.calls = 0

    def drop(self):
        self.graph = self.outputs = None
        self.calls = 0

    def __call__(self, step):
        net, optimizer, schedule, sampler, cfg = self.args
        if self.problem:
            return train_step(net, optimizer, schedule, sampler, cfg, step)
        schedule.apply(optimizer, step + 1)  # (fills the rate tensors that the graph reads)
        if self.graph is None:
            self.calls += 1
            if self.calls <= self.WARMUP:
                main, side = torch.cuda.current_stream(sampler.device), torch.cuda.Stream(sampler.device)
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    out = _step(net, optimizer, sampler, cfg, step)
                main.wait_stream(side)
                for t in out:  # (made on the side stream, read on this one)
                    t.record_stream(main)
                return out
            self._capture(step)
            if self.graph is None:  # (the rate is set: the plain step without a second schedule.apply)
                return _step(net, optimizer, sampler, cfg, step)
        self.graph.replay()
        return tuple(t.clone() for t in self.outputs)

    def _capture(self, step):
        net, optimizer, _, sampler, cfg = self.args
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(sampler.generator)
        for group in optimizer.param_groups:  # (a rate loaded by a resume or rollback is a float)
            group['capturable'] = True
            if not torch.is_tensor(group['lr']):
                group['lr'] = torch.tensor(float(group['lr']), device=sampler.device)
        try:
            with torch.cuda.graph(graph):
                outputs = _step(net, optimizer, sampler, cfg, step)
        except RuntimeError as e:
            self.problem = f'capturing the step failed ({(str(e).splitlines() or [type(e).__name__])[0]})'
            print(f'--cuda_graph: {self.problem}; training without the graph')
            return
        finally:  # (checkpoints keep the plain flag; replays do not read it)
            for group in optimizer.param_groups:
                group['capturable'] = False
        self.graph, self.outputs = graph, outputs


def graph_problem(net, optimizer, cfg, device):
    """Why `Stepper` cannot capture the step as a CUDA graph (one phrase), or None."""
    if device.type != 'cuda':
        return f'{device} is not a CUDA device'
    if not cfg.cuda_graph:
        return 'off (--cuda_graph false)'
    if isinstance(net, torch.nn.parallel.DistributedDataParallel):
        return 'DDP (several processes)'
    if net.args.model != 'mipnerf':
        return f'the {net.args.model} step depends on the step count'
    if not all(group.get('fused') for group in optimizer.param_groups):
        return 'the optimizer is not the fused Adam'
    return None


class DeviceFlag:
    """A one-element bool tensor, copied to the host as soon as the device has computed it: `bool()`
    then waits for the work queued before it only. (`bool()` of a CUDA tensor copies on its stream,
    so it waits for everything launched since too: read after the next step was launched, the step
    before's flag waited for that next step as well, and the device idled while the host launched
    the one after.)"""

    def __init__(self, flag):
        self.event = None
        if flag.device.type == 'cuda':
            self.host = torch.empty((), dtype=torch.bool, pin_memory=True)
            self.host.copy_(flag.reshape(()), non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(flag.device))  # the copy's stream (--device cuda:1, say)
        else:
            self.host = flag

    def __bool__(self):
        if self.event is not None:
            self.event.synchronize()
        return bool(self.host)


def settle(state, then=None):
    """Book the pending step's `finite` flag and make `then` (the step just launched, or None) the
    pending one. Called while the device runs the next step, or at once before anything that reads
    the step count. A non-finite step was skipped on the device: it does not count, and after
    --max_nonfinite in a row the run rolls back (`recover`, which also drops `then`: it was launched
    from the parameters that the rollback replaces). Returns the change in the step count."""
    finite, state.pending = state.pending, then
    if finite is None:
        return 0
    if bool(finite):
        state.nonfinite = 0
        return 0
    state.step -= 1
    state.nonfinite += 1
    if state.main:
        state.writer.add_scalar('train/nonfinite_skipped', state.nonfinite, state.step)
        tqdm.write(f'step {state.step}: non-finite loss or gradient; step skipped ({state.nonfinite} in a row)')
    if state.nonfinite < state.cfg.max_nonfinite:
        return -1
    state.pending = None
    return recover(state) - 1


class Diverged(Exception):
    """Training cannot get past non-finite steps; the message says what to try."""


def recover(state):
    """After --max_nonfinite non-finite steps in a row: reload the latest readable checkpoint (or
    the initial state) and halve the learning rate again (the halvings compound); every rank does
    the same. Returns the steps gone back (<= 0); Diverged after --max_rollbacks rollbacks."""
    cfg = state.cfg
    state.rollbacks += 1
    if state.rollbacks > cfg.max_rollbacks:
        raise Diverged(
            f'the loss or gradient stayed non-finite through {cfg.max_rollbacks} rollbacks (--max_rollbacks), the '
            f'learning rate down to {state.schedule.scale:g} x the schedule: check the data for NaN pixels or '
            'cameras, or lower --lr_init'
        )
    try:
        ckpt = runs.latest_checkpoint(cfg.log_dir, state.device, runs.RESUME_KEYS, note=lambda m: None)
    except ValueError:
        ckpt = None
    scale, back = state.schedule.scale * 0.5, state.step
    runs.restore(state, ckpt or state.initial, with_rng=False)
    state.schedule.scale = scale
    if state.main:
        tqdm.write(
            f'{state.nonfinite} non-finite steps in a row: reloaded {ckpt["path"] if ckpt else "the initial state"}'
            f' (step {state.step}) and halved the learning rate (now {scale:g} x the schedule)'
        )
    state.nonfinite = 0
    return state.step - back


# ----------------------------------------------------------------------------
# Logging, previews, evaluation, saving (rank 0, except save, which gathers from every rank).


def level_names(n):
    return {1: ['fine'], 2: ['coarse', 'fine']}.get(n) or [f'level{i}' for i in range(n)]


def log_scalars(state, loss, psnrs, grad_norm, bar):
    """TensorBoard scalars and the progress bar's figures over the steps since the last call."""
    t0, psnr_sum, steps = state.window
    rays_per_sec = steps * state.cfg.batch_size * ddp.world_size() / (time.time() - t0)
    avg_psnr = float(psnr_sum) / steps
    w, step = state.writer, state.step
    w.add_scalar('train/loss', loss.item(), step)
    for name, p in zip(level_names(len(psnrs)), psnrs.tolist()):
        w.add_scalar(f'train/psnr_{name}', p, step)
    w.add_scalar('train/psnr_avg', avg_psnr, step)
    w.add_scalar('train/lr', state.optimizer.param_groups[0]['lr'], step)
    w.add_scalar('train/grad_norm', grad_norm.item(), step)
    w.add_scalar('train/rays_per_sec', rays_per_sec, step)
    if bar.disable:  # not a terminal (a log file): one line per log_every instead of a bar
        print(
            f'step {step}: loss {loss.item():.4f}, train PSNR {avg_psnr:.2f} dB, {rays_per_sec:,.0f} rays/s', flush=True
        )
    else:
        bar.set_postfix(loss=f'{loss.item():.4f}', psnr=f'{avg_psnr:.2f}', rays_s=f'{rays_per_sec:,.0f}')
    state.window = [time.time(), 0.0, 0]


def preview(state):
    """A rendered test view, its target, depth and opacity in TensorBoard."""
    cfg, data, step = state.cfg, state.test_data, state.step
    i = (step // cfg.render_every) % len(data)
    rgb, distance, acc = state.model.render_image(data.rays_of_image(i), cfg.chunk)
    w = state.writer
    w.add_image('test/rgb', rgb.clamp(0, 1).cpu(), step, dataformats='HWC')
    w.add_image('test/target', data.images[i], step, dataformats='HWC')
    w.add_image('test/depth', vis.colorize_depth(distance, cfg.near, cfg.far, acc), step, dataformats='HWC')
    w.add_image('test/acc', acc.clamp(0, 1).cpu(), step, dataformats='HW')


def eval_view_indices(n, eval_views):
    """`eval_views` evenly spaced test views (all of them for 0)."""
    if eval_views <= 0 or eval_views >= n:
        return list(range(n))
    return sorted({round(i * n / eval_views) for i in range(eval_views)})


@torch.no_grad()
def mean_psnr(model, data, indices, chunk):
    """Mean over the views of the per-view PSNR of the fine level."""
    psnrs = []
    for i in indices:
        rgb = model.render_image(data.rays_of_image(i), chunk)[0]
        psnrs.append(float(mse_to_psnr(((rgb - data.images[i].to(rgb.device)) ** 2).mean())))
    return sum(psnrs) / len(psnrs)


def evaluate(state, eval_views):
    """Test PSNR over `eval_views` views (0: all) into TensorBoard, eval.jsonl and the console."""
    t = time.time()
    cfg, step = state.cfg, state.step
    indices = eval_view_indices(len(state.test_data), eval_views)
    psnr = mean_psnr(state.model, state.test_data, indices, cfg.chunk)
    state.writer.add_scalar('test/psnr', psnr, step)
    path = os.path.join(cfg.log_dir, 'eval.jsonl')
    try:
        cli.append_line(
            path,
            json.dumps(
                {
                    'step': step,
                    'psnr': psnr,
                    'views': len(indices),
                    'wall_seconds': round(time.time() - state.t_start, 1),  # this process's
                    'train_seconds': round(state.train_seconds(t), 1),  # the run's, over its resumes
                }
            ),
        )
    except OSError as e:
        tqdm.write(f'could not write {path} ({e.strerror or e}); training goes on')
    tqdm.write(f'step {step}: test PSNR {psnr:.2f} dB over {len(indices)} views ({time.time() - t:.1f} s)')
    state.evaluated_at = step


def save(state):
    """Save (rank 0) and prune; on an OSError keep going and say so. Returns whether it saved.

    Every rank calls it: the ranks' sampler and RNG states are gathered so
    that a resume with as many processes continues their streams exactly.
    """
    rank_states = ddp.gather({'sampler': state.sampler.state_dict(), 'rng': runs.rng_state()})
    if state.main:
        path = runs.checkpoint_path(state.cfg.log_dir, state.step)
        try:
            runs.save_checkpoint(path, runs.checkpoint(state, rank_states))
        except OSError as e:
            previous = runs.list_checkpoints(state.cfg.log_dir)
            tqdm.write(
                f'could not save {path}: {e}; '
                + (f'{previous[-1]} is intact' if previous else 'no earlier checkpoint exists')
            )
            return False
        runs.prune_checkpoints(state.cfg.log_dir, state.cfg.keep_checkpoints)
    state.saved_at = state.step  # on every rank: the end of the run saves again on all of them or none
    return True


def interruptible(signals, fn, *args):
    """fn(*args), which a SIGINT or SIGTERM stops at once (a long render, an evaluation); the
    signal stays recorded in `signals` for the loop to save and stop. Nothing runs when one is
    already pending."""
    try:
        with signals.at_once():
            fn(*args)
    except cli.Stopped:
        pass


def finish(state, signals, signalled, out_of_time):
    """The end of a run. After a signal: save and return its exit code (130, 143). Otherwise:
    evaluate on all test views (a signal stops it, as above), save the final checkpoint, and return
    0 (1 if it could not be saved)."""
    cfg, main, step = state.cfg, state.main, state.step
    if out_of_time and main and not signalled:
        print(f'--max_minutes {cfg.max_minutes:g} reached at step {step}')
    if main and not signalled and cfg.eval_every and state.evaluated_at != step:  # the end: all test views
        t = time.time()
        interruptible(signals, evaluate, state, 0)
        state.eval_seconds += time.time() - t  # not training time (the final checkpoint's train_seconds)
    if signalled or signals.signum is not None:
        saved = state.saved_at == step or save(state)
        stop = signals.stopped()
        if main:
            print(
                f'{stop.name}: stopped at step {step}'
                + (f', saved {runs.checkpoint_path(cfg.log_dir, step)}' if saved else '')
                + '; continue with the same command plus --resume'
            )
            state.writer.close()
        return stop.exit_code
    saved = state.saved_at == step or save(state)
    if main:
        state.writer.close()
        if not saved:
            sys.stderr.write(f'train.py: error: the final checkpoint could not be saved to {cfg.log_dir} (see above)\n')
            return 1
        print(f'done: {step} steps, checkpoint in {cfg.log_dir}')
    return 0
