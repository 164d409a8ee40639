"""A run folder and its checkpoints, in one place.

A run folder (`--log_dir`) holds `config.txt`, `eval.jsonl`, TensorBoard
events and checkpoints `ckpt_<step>.pt`. A checkpoint is a dict:

    step, model_args (config.ModelArgs as a dict), config (every flag),
    model (weights); for a resume also optimizer, schedule, sampler and rng
    (this process's random streams), rank_states and world_size (torchrun).

Checkpoints are written atomically (`save_checkpoint`) and read with one-line
errors (`read_checkpoint`); `latest_checkpoint` falls back past unreadable
ones. `open_run` is what eval.py, visualize.py and extract_mesh.py need of a
run: the model, its config and, on request, a split of its scene.
"""

import argparse
import dataclasses
import os
import re

import torch

import cli
import config
import datasets
import ddp
from model import MLP, MipNeRF
from model360 import MipNeRF360

CHECKPOINT = re.compile(r'ckpt_\d+\.pt')
PARTIAL_CHECKPOINT = re.compile(r'ckpt_\d+(\.partial\.pt|\.pt\.tmp)')  # atomic_output's (and older versions')
LOCK = 'run.lock'  # held by the training run that owns the folder
MODEL_KEYS = ('step', 'model_args', 'config', 'model')
RESUME_KEYS = MODEL_KEYS + ('optimizer', 'schedule')


# ----------------------------------------------------------------------------
# Device and speed.


def resolve_device(name):
    """torch.device for --device (auto: CUDA when present); ConfigError when it is not here."""
    config.check_device_name(name)
    if name.startswith('cuda') and not torch.cuda.is_available():
        raise config.ConfigError(f'--device {name}: CUDA is not available here; use --device cpu or auto')
    return torch.device('cuda' if name == 'auto' and torch.cuda.is_available() else 'cpu' if name == 'auto' else name)


def set_precision(model, precision, compile=False):
    """The precision switches, set in one place: 'fp32' (exact float32 matrix products),
    'tf32' (TensorFloat-32 matrix products on CUDA) or 'bf16' (the MLP under bfloat16
    autocast; sampling, IPE and compositing stay float32); `compile` torch.compiles the MLP
    (and mip-NeRF's ray functions)."""
    if precision not in ('fp32', 'tf32', 'bf16'):
        raise ValueError(f'precision must be fp32, tf32 or bf16, got {precision!r}')
    model.bf16 = precision == 'bf16'
    torch.backends.cuda.matmul.allow_tf32 = precision == 'tf32'
    torch.backends.cudnn.allow_tf32 = precision == 'tf32'
    if compile:
        for mlp in (m for m in model.modules() if isinstance(m, MLP)):
            mlp.compile()
        if hasattr(model, 'compile_rays'):
            model.compile_rays()
    return model


def _probe(x):
    return x * 2 + 1


def compile_problem(device):
    """Why torch.compile cannot run on `device` on this machine, as one line, or None.

    It compiles and runs a tiny function there: the compiled MLP needs a working C++ compiler
    on CPUs and Triton (on a GPU it supports) on CUDA, which a machine may lack.
    """
    try:
        torch.compile(_probe, dynamic=False)(torch.ones(4, device=device))
    except Exception as e:  # any failure of the tool chain, reported in one line
        return cli.exception_line(e)
    return None


def build_optimizer(model, cfg):
    """Adam with the config's betas and epsilon (multinerf's 360 configs: eps 1e-6; mip-NeRF: 1e-8),
    fused: `train_utils.train_step` skips a non-finite step on the device through its `found_inf`."""
    return torch.optim.Adam(
        model.parameters(), lr=cfg.lr_init, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, fused=True
    )


def make_model(args, randomized=True):
    """The network of a `config.ModelArgs`: mip-NeRF or mip-NeRF 360 (`args.model`)."""
    return (MipNeRF360 if args.model == 'mipnerf360' else MipNeRF)(args, randomized=randomized)


def build_model(cfg):
    """The network of a config (randomized as --randomized), at its precision."""
    return set_precision(make_model(config.ModelArgs.from_config(cfg), cfg.randomized), cfg.precision, cfg.compile)


# ----------------------------------------------------------------------------
# Checkpoints.


def checkpoint_path(log_dir, step):
    return os.path.join(log_dir, f'ckpt_{step:07d}.pt')


def list_checkpoints(log_dir):
    """Checkpoints `ckpt_<step>.pt` in log_dir, oldest first."""
    if not os.path.isdir(log_dir):
        return []
    return [os.path.join(log_dir, n) for n in sorted(os.listdir(log_dir)) if CHECKPOINT.fullmatch(n)]


def partial_checkpoints(log_dir):
    """Temporary checkpoint files in log_dir: what a crash or kill -9 mid-save left behind."""
    if not os.path.isdir(log_dir):
        return []
    return [os.path.join(log_dir, n) for n in sorted(os.listdir(log_dir)) if PARTIAL_CHECKPOINT.fullmatch(n)]


def save_checkpoint(path, state):
    """Write atomically (a temporary file, fsynced, renamed): a crash or a full disk at any moment
    leaves earlier checkpoints intact. On failure the temporary file is removed and an OSError
    propagates (torch's zip writer reports a full disk as a RuntimeError, raised as an OSError)."""
    try:
        with cli.atomic_output(path) as tmp, open(tmp, 'wb') as f:
            torch.save(state, f)
            f.flush()
    except RuntimeError as e:
        raise OSError(str(e).splitlines()[0] if str(e) else 'torch.save failed') from None


def prune_checkpoints(log_dir, keep):
    for old in list_checkpoints(log_dir)[:-keep]:
        os.remove(old)


def read_checkpoint(path, device='cpu', keys=MODEL_KEYS):
    """torch.load a checkpoint written by train.py, with its 'path' added; ValueError with a one-line
    reason otherwise."""
    if not os.path.isfile(path):
        if os.path.isdir(path):
            raise ValueError(f'checkpoint {path} is a folder, not a checkpoint')
        if os.path.lexists(path):
            raise ValueError(f'checkpoint {path} is a broken symbolic link')
        raise FileNotFoundError(f'checkpoint {path} does not exist')
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # truncated, empty, not a checkpoint, ...
        reason = str(e).splitlines()[0][:80] if str(e) else ''
        raise ValueError(
            f'checkpoint {path} is unreadable ({type(e).__name__}{": " + reason if reason else ""})'
        ) from None
    missing = [k for k in keys if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f'{path} is not a checkpoint of train.py (no {", ".join(missing)})')
    ckpt['path'] = path
    return ckpt


def latest_checkpoint(log_dir, device='cpu', keys=MODEL_KEYS, note=print, skipped=None):
    """The newest readable checkpoint in log_dir (dict) that has `keys`, or None when there is none at all.

    An unreadable one (a crash mid-copy, a full disk, a folder or a broken
    link in its place) is skipped, with a note, and appended to `skipped`;
    ValueError when none of them will do.
    """
    found = list_checkpoints(log_dir)
    for i, path in enumerate(reversed(found)):
        try:
            return read_checkpoint(path, device, keys)
        except ValueError as e:
            if i == len(found) - 1:
                raise ValueError(f'{e}; no checkpoint in {log_dir} will do') from None
            note(f'{e}; taking the one before')
            if skipped is not None:
                skipped.append(path)
    return None


def step_of(path):
    """The step in a checkpoint's name, ckpt_<step>.pt."""
    return int(re.search(r'ckpt_(\d+)\.pt$', path).group(1))


def load_model(ckpt, device='cpu'):
    """The network of a checkpoint dict, in eval mode on `device`; ValueError if this code's differs."""
    try:
        model = make_model(config.ModelArgs(**ckpt['model_args']), randomized=False)
        model.load_state_dict(ckpt['model'])
    except (TypeError, RuntimeError) as e:
        raise ValueError(
            f"checkpoint {ckpt['path']} does not match this code's network "
            f'({type(e).__name__}: {str(e).splitlines()[0][:80]})'
        ) from None
    return model.to(device).eval()


def load_checkpoint(path, device='cpu'):
    """Rebuild the model from a checkpoint file: (model in eval mode on `device`, checkpoint dict)."""
    ckpt = read_checkpoint(path, device)
    return load_model(ckpt, device), ckpt


def load_run(path, device='cpu'):
    """A trained run from its folder (latest readable checkpoint) or a checkpoint file.

    Returns (model in eval mode, the run's config as a Namespace, checkpoint dict).
    """
    if os.path.isdir(path):
        ckpt = latest_checkpoint(path, device)
        if ckpt is None:
            raise FileNotFoundError(f'no checkpoint (ckpt_*.pt) in {path}: train first, or pass a checkpoint file')
    elif not os.path.exists(path):
        raise FileNotFoundError(f'{path} does not exist: pass a run folder (--log_dir) or a checkpoint file (--ckpt)')
    else:
        ckpt = read_checkpoint(path, device)
    return load_model(ckpt, device), argparse.Namespace(**ckpt['config']), ckpt


def checkpoint(state, rank_states=None):
    """The checkpoint of a train_utils.TrainState; `rank_states`: every rank's sampler and RNG states
    (ddp.gather), which a resume with as many processes continues exactly."""
    c = {
        'step': state.step,
        'model_args': dataclasses.asdict(state.model.args),
        'config': vars(state.cfg),
        'model': state.model.state_dict(),
        'optimizer': _plain_rates(state.optimizer.state_dict()),
        'schedule': state.schedule.state_dict(),
        'train_seconds': state.train_seconds(),  # --max_minutes counts on from it after a resume
    }
    if rank_states is not None:
        c.update(
            sampler=rank_states[0]['sampler'],
            rng=rank_states[0]['rng'],
            rank_states=rank_states if len(rank_states) > 1 else None,
            world_size=len(rank_states),
        )
    return c


def _plain_rates(optimizer_state):
    """An optimizer's state_dict with its rates as floats (train_utils.Stepper keeps them in device tensors)."""
    for group in optimizer_state['param_groups']:  # (state_dict's groups are copies)
        if torch.is_tensor(group['lr']):
            group['lr'] = group['lr'].item()
    return optimizer_state


def restore(state, ckpt, with_rng):
    """Load a checkpoint into a TrainState; with `with_rng`, also this rank's random streams
    (fresh, distinct streams when the checkpoint was written by another number of processes)."""
    state.model.load_state_dict(ckpt['model'])
    state.optimizer.load_state_dict(ckpt['optimizer'])
    if state.stepper is not None:  # its CUDA graph holds the optimizer state just replaced
        state.stepper.drop()
    for group in state.optimizer.param_groups:  # checkpoints before the fused optimizer say foreach
        group.update(fused=True, foreach=None)
    state.schedule.load_state_dict(ckpt['schedule'])
    state.step = ckpt['step']
    if with_rng:
        rank, seed = ddp.rank(), state.cfg.seed
        states = ckpt.get('rank_states') or [{'sampler': ckpt['sampler'], 'rng': ckpt['rng']}]
        if len(states) == ddp.world_size():
            state.sampler.load_state_dict(states[rank]['sampler'])
            set_rng_state(states[rank]['rng'])
        else:
            state.sampler.generator.manual_seed(seed + rank + 1000003 * ckpt['step'])
            torch.manual_seed(seed + rank + 1000003 * ckpt['step'])


# ----------------------------------------------------------------------------
# Random streams.


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


# ----------------------------------------------------------------------------
# What the output scripts need of a run.


def open_run(args, split=None):
    """What a script needs from a trained run, given `config.run_parser` flags.

    Joins the torchrun process group if there is one, rebuilds the model and
    config from the checkpoint at the run's precision (or --precision) and,
    with `split`, loads that split of the scene (from --base_dir if given).
    Returns (model, cfg, ckpt, device, data); raises FileNotFoundError or
    ValueError (ConfigError, DataError) with a one-line message.
    """
    if not args.log_dir and not args.ckpt:
        raise ValueError('pass the run with --log_dir RUN_FOLDER (or a checkpoint with --ckpt FILE)')
    if not args.log_dir:
        args.log_dir = os.path.dirname(os.path.abspath(args.ckpt))
    device = ddp.setup(resolve_device(args.device))
    model, cfg, ckpt = load_run(args.ckpt or args.log_dir, device)
    set_precision(model, args.precision or getattr(cfg, 'precision', 'fp32'))
    if getattr(args, 'base_dir', None):
        cfg.base_dir = args.base_dir
    data = datasets.dataset_from_config(cfg, split) if split else None
    return model, cfg, ckpt, device, data


def prepare_out_dir(device, out_dir, output, flag, hint, value=None):
    """Make `out_dir` and lock `output` in it for this process (rank 0), agreed across ranks.

    `cli.prepare_out_dir` checks that `output`'s temporary file can be
    written; `cli.Lock` on `<output>.lock` keeps a second process from
    writing the same output at the same time. Returns (folders made, lock)
    on rank 0 and ([], None) elsewhere. When either fails, rank 0 raises
    ValueError with the one-line reason (naming the lock's holder) and the
    other ranks exit with status 2, so that no rank renders for nothing.
    """
    made, lock, problem = [], None, None
    if ddp.is_main():
        try:
            made = cli.prepare_out_dir(out_dir, cli.partial_path(output), flag, hint, value)
            lock = cli.Lock(cli.lock_path(output)).acquire()
        except ValueError as e:
            problem = e
        except cli.Busy as e:
            cli.remove_empty_dirs(made)
            problem = ValueError(f'{output} is being written: {e}; wait for it to end, or pass another {flag}')
    if ddp.any_rank([problem is not None], device)[0]:
        if problem is not None:
            raise problem
        raise SystemExit(2)
    return made, lock
