"""The one configuration object: command-line flags and `--config` files.

Every hyper-parameter is a flag; its default is the official release's
(google/mipnerf, `configs/*.gin`). A `--config FILE` (looked up as given, then
under `configs/`) holds `flag = value` lines; flags given on the command
line override it, and both override the per-dataset defaults below.

    cfg = config.get_config()          # parse sys.argv, validate, exit on error
    cfg = config.get_config(['--dataset_name', 'demo', '--max_steps', '10'])
"""
import math
import os
import sys

import configargparse
import torch

REPO = os.path.dirname(os.path.abspath(__file__))

# Dataset name -> folder under --data_dir, the script that fetches it, default scene.
DATASETS = {
    'blender': ('nerf_synthetic', 'scripts/download_blender.sh', 'lego'),
    'llff': ('nerf_llff_data', 'scripts/download_llff.sh', 'fern'),
    'multicam': ('nerf_multiscale', 'scripts/download_multicam.sh', 'lego'),
    'demo': ('demo', None, ''),
}

# Per-dataset defaults (the official blender.gin / llff.gin / multiblender.gin);
# explicit flags and config files override them.
# Multicam draws from all images: its images differ in size, and the official
# single_image batching indexes every image with the first one's pixel count.
# The demo does too: its runs are a few thousand steps, where batches drawn from
# one view at a time leave colours visibly behind.
_BLENDER = dict(white_bkgd=True, near=2., far=6., factor=0, ray_shape='cone',
                density_noise=0., lindisp=False, batching='single_image')
DATASET_DEFAULTS = {
    'blender': _BLENDER,
    'multicam': dict(_BLENDER, batching='all_images'),
    'demo': dict(_BLENDER, batching='all_images'),   # short runs: batches mixed over all views train faster
    'llff': dict(white_bkgd=False, near=0., far=1., factor=4, ray_shape='cylinder',
                 density_noise=1., lindisp=False, batching='all_images'),
}

# Flags that must be > 0, and flags that must be >= 0.
POSITIVE = ('batch_size', 'max_steps', 'num_samples', 'num_levels', 'net_depth', 'net_width',
            'net_depth_condition', 'net_width_condition', 'chunk', 'lr_init', 'lr_final',
            'log_every', 'keep_checkpoints', 'max_nonfinite', 'llffhold', 'lr_delay_mult')
NON_NEGATIVE = ('factor', 'min_deg_point', 'deg_view', 'skip_layer', 'lr_delay_steps',
                'coarse_loss_mult', 'density_noise', 'resample_padding', 'render_every',
                'eval_every', 'save_every', 'eval_views', 'grad_max_norm', 'near', 'max_minutes')


class ConfigError(ValueError):
    """A bad flag or missing input; its message is the one-line fix."""


def str2bool(v):
    if isinstance(v, bool):
        return v
    if v.lower() in ('1', 'true', 'yes', 'on'):
        return True
    if v.lower() in ('0', 'false', 'no', 'off'):
        return False
    raise configargparse.ArgumentTypeError(f'expected true or false, got {v!r}')


def fail(prog, message):
    """Exit with status 2 and one line, `prog: error: message`, as the parsers do."""
    sys.stderr.write(f'{prog}: error: {message}\n')
    sys.exit(2)


class _HelpFormatter(configargparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None ones (per-dataset or 'the run's', which the help text says)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is configargparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


class _Parser(configargparse.ArgumentParser):
    """One-line errors; no abbreviated flags (a typo in a config file must not set another flag)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault('allow_abbrev', False)
        kwargs.setdefault('add_config_file_help', False)
        kwargs.setdefault('add_env_var_help', False)
        kwargs.setdefault('formatter_class', _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        """One line, no usage block, exit status 2."""
        self.exit(2, f'{self.prog}: error: {message} (see --help)\n')


def _config_file_path(path):
    for candidate in (path, os.path.join(REPO, 'configs', path)):
        if os.path.isfile(candidate):
            return candidate
    return path  # configargparse reports it as missing


def build_parser():
    p = _Parser(description='mip-NeRF in PyTorch', config_file_parser_class=configargparse.DefaultConfigFileParser,
                epilog='A --config file holds "flag = value" lines (configs/*.txt); flags on the command line '
                       'override it, and both override the per-dataset defaults.')
    flag = p.add_argument

    def boolean(name, default, help):
        flag(name, type=str2bool, nargs='?', const=True, default=default, metavar='BOOL', help=help)

    flag('--config', is_config_file=True, help='config file of "flag = value" lines (e.g. configs/blender.txt)')

    g = p.add_argument_group('data')
    g.add_argument('--dataset_name', default='blender', choices=sorted(DATASETS), help='dataset loader')
    g.add_argument('--data_dir', default='data', help='folder holding nerf_synthetic/, nerf_llff_data/, nerf_multiscale/')
    g.add_argument('--scene', default=None, help='scene folder under the dataset folder (lego, fern, ...)')
    g.add_argument('--base_dir', default=None, help='one scene folder, used instead of --data_dir/--scene')
    g.add_argument('--factor', type=int, default=None, help='downsample images by this factor (0: full size)')
    g.add_argument('--white_bkgd', type=str2bool, nargs='?', const=True, default=None, metavar='BOOL',
                   help='composite onto white (default: per dataset)')
    g.add_argument('--near', type=float, default=None, help='near bound (default: per dataset)')
    g.add_argument('--far', type=float, default=None, help='far bound (default: per dataset)')
    g.add_argument('--llffhold', type=int, default=8, help='LLFF: every N-th image is a test image')

    g = p.add_argument_group('model')
    flag = g.add_argument
    flag('--num_samples', type=int, default=128, help='samples per level')
    flag('--num_levels', type=int, default=2, help='sampling levels (coarse + fine)')
    flag('--resample_padding', type=float, default=0.01, help='padding added to the resampling weights')
    boolean('--stop_level_grad', True, 'stop gradients between levels')
    boolean('--use_viewdirs', True, 'condition colour on the view direction')
    g.add_argument('--lindisp', type=str2bool, nargs='?', const=True, default=None, metavar='BOOL',
                   help='sample linearly in disparity (default: per dataset)')
    flag('--ray_shape', default=None, choices=['cone', 'cylinder'], help='ray shape (default: per dataset)')
    flag('--min_deg_point', type=int, default=0, help='lowest IPE degree')
    flag('--max_deg_point', type=int, default=16, help='IPE degrees are min_deg_point..max_deg_point-1')
    flag('--deg_view', type=int, default=4, help='PE degrees of the view direction')
    flag('--density_noise', type=float, default=None, help='std of Gaussian noise on raw density in training')
    flag('--density_bias', type=float, default=-1., help='shift added to raw density before softplus')
    flag('--rgb_padding', type=float, default=0.001, help='padding of the sigmoid colour')
    boolean('--disable_integration', False, 'use PE of the means instead of IPE (ablation)')
    flag('--net_depth', type=int, default=8, help='trunk layers')
    flag('--net_width', type=int, default=256, help='trunk width')
    flag('--net_depth_condition', type=int, default=1, help='view-branch layers')
    flag('--net_width_condition', type=int, default=128, help='view-branch width')
    flag('--skip_layer', type=int, default=4, help='concatenate the input after every N-th trunk layer')

    g = p.add_argument_group('training')
    flag = g.add_argument
    flag('--batch_size', type=int, default=4096, help='rays per step')
    flag('--batching', default=None, choices=['single_image', 'all_images'],
         help='draw each batch from one random image or from all pixels (default: per dataset)')
    flag('--max_steps', type=int, default=1_000_000, help='training steps')
    flag('--lr_init', type=float, default=5e-4, help='learning rate at step 0')
    flag('--lr_final', type=float, default=5e-6, help='learning rate at max_steps')
    flag('--lr_delay_steps', type=int, default=2500, help='warm-up steps')
    flag('--lr_delay_mult', type=float, default=0.01, help='learning-rate multiplier at step 0 of the warm-up')
    flag('--coarse_loss_mult', type=float, default=0.1, help='weight of the coarse levels in the loss')
    flag('--grad_max_norm', type=float, default=0., help='clip the gradient norm (0: off)')
    flag('--max_nonfinite', type=int, default=5,
         help='after this many non-finite steps in a row, reload the last checkpoint and halve the learning rate')
    boolean('--randomized', True, 'stratified jitter and density noise in training')
    boolean('--disable_multiscale_loss', False, 'ignore lossmult')
    flag('--max_minutes', type=float, default=0., help='stop after this many minutes of training (0: no limit)')
    flag('--seed', type=int, default=0, help='random seed')
    flag('--device', default='auto', help='auto (CUDA when present), cpu, cuda or cuda:N')
    flag('--precision', default='fp32', choices=['fp32', 'tf32', 'bf16'],
         help='matrix precision: fp32, tf32 (CUDA), or bf16 (MLP under bfloat16 autocast; the rest float32)')
    flag('--kernels', default='torch', choices=['torch', 'triton'],
         help='MLP implementation: torch, or triton (fused Triton kernels; needs --precision bf16, CUDA and '
              'Triton; faster than eager bf16, slower than --compile: misc/benchmarks.md)')
    boolean('--compile', False, 'torch.compile the MLP (the plain PyTorch one)')

    g = p.add_argument_group('logging and checkpoints')
    flag = g.add_argument
    flag('--log_dir', default=None, help='run folder (default: log/<scene>)')
    flag('--log_every', type=int, default=100, help='steps between TensorBoard scalars')
    flag('--render_every', type=int, default=5000, help='steps between rendered test views in TensorBoard (0: never)')
    flag('--eval_every', type=int, default=50000, help='steps between test-set PSNR, and at the end on all views (0: never)')
    flag('--eval_views', type=int, default=0, help='test views used by eval_every, evenly spaced (0: all)')
    flag('--save_every', type=int, default=10000, help='steps between checkpoints (0: only at the end)')
    flag('--keep_checkpoints', type=int, default=5, help='checkpoints kept in log_dir')
    flag('--chunk', type=int, default=8192, help='rays per forward pass when rendering images')
    flag('--resume', nargs='?', const='latest', default=None, metavar='CKPT',
         help='continue from the latest checkpoint in log_dir, or from CKPT')
    return p


def positive_int(v):
    n = int(v)
    if n <= 0:
        raise configargparse.ArgumentTypeError(f'must be positive, got {n}')
    return n


def run_parser(description, chunk=8192, data=True):
    """A parser with the flags shared by the scripts that use a trained run.

    --log_dir (the run; its latest checkpoint), --ckpt, --base_dir (when
    `data`), --chunk and --device; errors are one line, as for train.py.
    """
    p = _Parser(description=description)
    p.add_argument('--log_dir', default=None, help='run folder (its latest readable checkpoint is used)')
    p.add_argument('--ckpt', default=None, help='a checkpoint file instead (outputs then go beside it)')
    if data:
        p.add_argument('--base_dir', default=None, help='scene folder, if it moved since training')
    p.add_argument('--chunk', type=positive_int, default=chunk, help='rays or points per forward pass')
    p.add_argument('--device', default='auto', help='auto, cpu, cuda or cuda:N')
    p.add_argument('--precision', default=None, choices=['fp32', 'tf32', 'bf16'],
                   help="matrix precision for rendering (default: the run's)")
    p.add_argument('--kernels', default=None, choices=['torch', 'triton'],
                   help="MLP implementation (default: the run's)")
    return p


def apply_dataset_defaults(cfg):
    for k, v in DATASET_DEFAULTS[cfg.dataset_name].items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    folder, _, scene = DATASETS[cfg.dataset_name]
    if cfg.scene is None:
        cfg.scene = scene
    if cfg.base_dir is None:
        cfg.base_dir = os.path.join(cfg.data_dir, folder, *([cfg.scene] if cfg.scene else []))
    if cfg.log_dir is None:
        cfg.log_dir = os.path.join('log', cfg.scene or cfg.dataset_name)
    return cfg


def validate(cfg, need_data=True):
    """Raise ConfigError with a one-line fix for the first problem found."""
    for k in POSITIVE:   # written so that nan fails too; inf is refused below
        if not getattr(cfg, k) > 0:
            raise ConfigError(f'--{k} must be positive, got {getattr(cfg, k)}')
    for k in NON_NEGATIVE:
        if not getattr(cfg, k) >= 0:
            raise ConfigError(f'--{k} must not be negative, got {getattr(cfg, k)}')
    for k, v in sorted(vars(cfg).items()):
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f'--{k} must be a finite number, got {v}')
    if cfg.min_deg_point > cfg.max_deg_point:
        raise ConfigError(f'--min_deg_point ({cfg.min_deg_point}) must not exceed --max_deg_point ({cfg.max_deg_point})')
    if cfg.near >= cfg.far:
        raise ConfigError(f'--near ({cfg.near}) must be less than --far ({cfg.far})')
    if cfg.lindisp and cfg.near <= 0:
        raise ConfigError('--lindisp needs --near > 0')
    if need_data and cfg.dataset_name != 'demo' and not os.path.isdir(cfg.base_dir):
        folder, script, _ = DATASETS[cfg.dataset_name]
        parent = os.path.dirname(os.path.normpath(cfg.base_dir))
        scenes = sorted(d for d in os.listdir(parent) if os.path.isdir(os.path.join(parent, d))) \
            if os.path.isdir(parent) and os.path.basename(parent) == folder else []
        if scenes:
            raise ConfigError(f'scene folder {cfg.base_dir} not found; {parent} has: {", ".join(scenes)} '
                              '(pass one of them with --scene)')
        raise ConfigError(f'scene folder {cfg.base_dir} not found: run {script} (or pass --data_dir/--scene/--base_dir)')
    validate_device(cfg.device)


def validate_device(name):
    if name not in ('auto', 'cpu') and not name.startswith('cuda'):
        raise ConfigError(f'--device must be auto, cpu, cuda or cuda:N, got {name!r}')
    if name.startswith('cuda') and not torch.cuda.is_available():
        raise ConfigError(f'--device {name}: CUDA is not available here; use --device cpu or auto')


def get_config(argv=None, need_data=True):
    """Parse, fill per-dataset defaults, validate; on error print one line and exit 2."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, a in enumerate(argv):  # --config resolves under configs/ too
        if a == '--config' and i + 1 < len(argv):
            argv[i + 1] = _config_file_path(argv[i + 1])
        elif a.startswith('--config='):
            argv[i] = '--config=' + _config_file_path(a.split('=', 1)[1])
    cfg = apply_dataset_defaults(parser.parse_args(argv))
    try:
        validate(cfg, need_data)
    except ConfigError as e:
        parser.error(str(e))
    return cfg


def resolve_device(name):
    """torch.device for --device (auto: CUDA when present)."""
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    return torch.device(name)


def save_config(cfg, path):
    """Write the resolved config as a file that --config reads back."""
    lines = []
    for k, v in sorted(vars(cfg).items()):
        if v is None or k in ('config', 'resume'):
            continue
        lines.append(f'{k} = {str(v).lower() if isinstance(v, bool) else v}')
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    os.replace(tmp, path)
