"""The one configuration object: command-line flags and `--config` files.

Every hyper-parameter is a flag; its default is the official release's
(google/mipnerf, `configs/*.gin`). The network's flags are the fields of
`ModelArgs`, declared once here and saved in every checkpoint. A `--config
FILE` (looked up as given, then under `configs/`) holds `flag = value` lines;
flags given on the command line override it, and both override the
per-dataset defaults (`datasets.DATASETS`).

    cfg = config.get_config()          # parse sys.argv, validate, exit on error
    cfg = config.get_config(['--dataset_name', 'demo', '--max_steps', '10'])

This module does not import torch: `--help` and a bad flag answer at once.
Only the checks that need the dataset table (defaults, the scene folder)
import `datasets`, after the flags themselves were found good.
"""

import dataclasses
import math
import os
import sys

import configargparse

import cli

REPO = os.path.dirname(os.path.abspath(__file__))


MODELS = ('mipnerf', 'mipnerf360')


def _field(default, help, per_dataset=False, **flag):
    """A ModelArgs field: its default, its flag's help, and whether datasets.DATASETS sets its default."""
    return dataclasses.field(default=default, metadata=dict(help=help, per_dataset=per_dataset, flag=flag))


@dataclasses.dataclass
class ModelArgs:
    """Everything needed to rebuild the network; saved in every checkpoint, one flag per field.

    The defaults are the official release's for Blender; fields marked
    per_dataset take the dataset's default when the flag is not given. The
    fields marked (360) serve mip-NeRF 360 only (`model = mipnerf360`);
    configs/360.txt holds multinerf's 360.gin values for the shared ones.
    """

    model: str = _field('mipnerf', 'model family: mip-NeRF (2021) or mip-NeRF 360 (2022)', choices=MODELS)
    num_samples: int = _field(128, 'samples (intervals) per level (360: of the NeRF level)')
    num_levels: int = _field(2, 'sampling levels (coarse + fine)')
    resample_padding: float = _field(0.01, 'padding added to the resampling weights')
    stop_level_grad: bool = _field(True, 'stop gradients between levels (none through the resampling)')
    use_viewdirs: bool = _field(True, 'condition colour on the view direction')
    lindisp: bool = _field(False, 'sample linearly in disparity', per_dataset=True)
    ray_shape: str = _field('cone', 'ray shape', per_dataset=True, choices=['cone', 'cylinder'])
    min_deg_point: int = _field(0, 'lowest IPE degree')
    max_deg_point: int = _field(16, 'IPE degrees are min_deg_point..max_deg_point-1')
    deg_view: int = _field(4, 'PE degrees of the view direction')
    density_noise: float = _field(0.0, 'std of Gaussian noise on raw density in training', per_dataset=True)
    density_bias: float = _field(-1.0, 'shift added to raw density before softplus')
    rgb_padding: float = _field(0.001, 'padding of the sigmoid colour')
    disable_integration: bool = _field(False, 'use PE of the means instead of IPE (ablation)')
    white_bkgd: bool = _field(True, 'composite onto white', per_dataset=True)
    net_depth: int = _field(8, 'trunk layers')
    net_width: int = _field(256, 'trunk width')
    net_depth_condition: int = _field(1, 'view-branch layers')
    net_width_condition: int = _field(128, 'view-branch width')
    skip_layer: int = _field(4, 'concatenate the input after every N-th trunk layer')
    init: str = _field('glorot', 'weight init: Glorot-uniform (mip-NeRF) or He-uniform (360)', choices=['glorot', 'he'])
    bottleneck_width: int = _field(0, '(360) width of the bottleneck before the view branch (0: the trunk width)')
    num_prop_samples: int = _field(64, '(360) samples per proposal level')
    prop_net_depth: int = _field(4, '(360) proposal MLP layers')
    prop_net_width: int = _field(256, '(360) proposal MLP width')
    dilation_multiplier: float = _field(0.5, '(360) dilation of the proposal histogram, relative to its intervals')
    dilation_bias: float = _field(0.0025, '(360) dilation of the proposal histogram, absolute (in s)')
    anneal_slope: float = _field(10.0, '(360) slope of the annealing of the proposal weights over training (0: off)')
    single_jitter: bool = _field(True, '(360) one jitter per ray instead of per sample')
    opaque_background: bool = _field(False, '(360) make the last interval opaque')

    @classmethod
    def from_config(cls, cfg):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(cfg).items() if k in names})


# Flags that must be > 0, and flags that must be >= 0.
POSITIVE = (
    'batch_size',
    'max_steps',
    'num_samples',
    'num_levels',
    'net_depth',
    'net_width',
    'net_depth_condition',
    'net_width_condition',
    'chunk',
    'lr_init',
    'lr_final',
    'log_every',
    'keep_checkpoints',
    'max_nonfinite',
    'max_rollbacks',
    'llffhold',
    'lr_delay_mult',
    'num_prop_samples',
    'prop_net_depth',
    'prop_net_width',
    'adam_eps',
)
NON_NEGATIVE = (
    'bottleneck_width',
    'dilation_multiplier',
    'dilation_bias',
    'anneal_slope',
    'charb_padding',
    'interlevel_loss_mult',
    'distortion_loss_mult',
    'factor',
    'min_deg_point',
    'deg_view',
    'skip_layer',
    'lr_delay_steps',
    'coarse_loss_mult',
    'density_noise',
    'resample_padding',
    'render_every',
    'eval_every',
    'save_every',
    'eval_views',
    'grad_max_norm',
    'near',
    'max_minutes',
)
DATASET_NAMES = ('blender', 'llff', 'multicam', 'demo', '360', 'capture')  # datasets.DATASETS; a test checks they agree
USAGE = '%(prog)s [--config FILE] [--FLAG VALUE ...]'


class ConfigError(ValueError):
    """A bad flag or missing input; its message is the one-line fix."""


def _config_file_path(path):
    for candidate in (path, os.path.join(REPO, 'configs', path)):
        if os.path.isfile(candidate):
            return candidate
    return path  # configargparse reports it as missing


def _add_model_flags(group):
    for f in dataclasses.fields(ModelArgs):
        meta = f.metadata
        default = None if meta['per_dataset'] else f.default
        help = meta['help'] + (' (default: per dataset)' if meta['per_dataset'] else '')
        if f.type is bool or f.type == 'bool':
            cli.add_bool(group, f'--{f.name}', default, help)
        else:
            group.add_argument(
                f'--{f.name}',
                type={'int': int, 'float': float, 'str': str}.get(f.type, f.type),
                default=default,
                help=help,
                **meta['flag'],
            )


def build_parser():
    """The parser of train.py: every flag, grouped."""
    p = cli.Parser(
        description='Train mip-NeRF.',
        usage=USAGE,
        config_file_parser_class=configargparse.DefaultConfigFileParser,
        epilog='A --config file holds "flag = value" lines (configs/*.txt); flags on the command line '
        'override it, and both override the per-dataset defaults.',
    )
    p.add_argument(
        '--config', is_config_file=True, help='config file of "flag = value" lines (e.g. configs/blender.txt)'
    )

    g = p.add_argument_group('data')
    g.add_argument(
        '--dataset_name', default='blender', metavar='NAME', help=f'dataset loader: {", ".join(DATASET_NAMES)}'
    )
    g.add_argument(
        '--data_dir', default='data', help='folder holding nerf_synthetic/, nerf_llff_data/, nerf_multiscale/'
    )
    g.add_argument('--scene', default=None, help='scene folder under the dataset folder (lego, fern, ...)')
    g.add_argument('--base_dir', default=None, help='one scene folder, used instead of --data_dir/--scene')
    g.add_argument(
        '--factor', type=int, default=None, help='downsample images by this factor (0: full size; default: per dataset)'
    )
    g.add_argument('--near', type=float, default=None, help='near bound (default: per dataset)')
    g.add_argument('--far', type=float, default=None, help='far bound (default: per dataset)')
    g.add_argument('--llffhold', type=int, default=8, help='LLFF: every N-th image is a test image')

    _add_model_flags(p.add_argument_group('model (saved in checkpoints)'))

    g = p.add_argument_group('training')
    flag = g.add_argument
    flag('--batch_size', type=int, default=4096, help='rays per step')
    flag(
        '--batching',
        default=None,
        choices=['single_image', 'all_images'],
        help='draw each batch from one random image or from all pixels (default: per dataset)',
    )
    flag('--max_steps', type=int, default=1_000_000, help='training steps')
    flag('--lr_init', type=float, default=5e-4, help='learning rate at step 0')
    flag('--lr_final', type=float, default=5e-6, help='learning rate at max_steps')
    flag('--lr_delay_steps', type=int, default=2500, help='warm-up steps')
    flag('--lr_delay_mult', type=float, default=0.01, help='learning-rate multiplier at step 0 of the warm-up')
    flag('--coarse_loss_mult', type=float, default=0.1, help='weight of the coarse levels in the loss')
    flag('--charb_padding', type=float, default=0.001, help='(360) data term sqrt(error^2 + padding^2) (Charbonnier)')
    flag('--interlevel_loss_mult', type=float, default=1.0, help='(360) weight of the proposal (interlevel) loss')
    flag('--distortion_loss_mult', type=float, default=0.01, help='(360) weight of the distortion loss')
    flag('--adam_beta1', type=float, default=0.9, help="Adam's beta1")
    flag('--adam_beta2', type=float, default=0.999, help="Adam's beta2")
    flag('--adam_eps', type=float, default=1e-8, help="Adam's epsilon")
    flag('--grad_max_norm', type=float, default=0.0, help='clip the gradient norm (0: off)')
    flag(
        '--max_rollbacks',
        type=int,
        default=5,
        help='stop the run after this many reloads for non-finite steps (each halves the learning rate again)',
    )
    flag(
        '--max_nonfinite',
        type=int,
        default=5,
        help='after this many non-finite steps in a row, reload the last checkpoint and halve the learning rate',
    )
    cli.add_bool(g, '--randomized', True, 'stratified jitter and density noise in training')
    cli.add_bool(g, '--disable_multiscale_loss', False, 'ignore lossmult')
    flag(
        '--max_minutes',
        type=float,
        default=0.0,
        help="stop after this many minutes of training, counted over the run's resumes (0: no limit)",
    )
    flag('--seed', type=int, default=0, help='random seed')

    g = p.add_argument_group('device and speed')
    add_speed_flags(g, default_precision='fp32')
    cli.add_bool(g, '--compile', False, 'torch.compile the MLP')
    cli.add_bool(
        g, '--cuda_graph', True, 'replay the training step from one CUDA graph where it can (one CUDA device, mip-NeRF)'
    )

    g = p.add_argument_group('logging and checkpoints')
    flag = g.add_argument
    flag('--log_dir', default=None, help='run folder (default: log/<scene>)')
    flag('--log_every', type=int, default=100, help='steps between TensorBoard scalars')
    flag('--render_every', type=int, default=5000, help='steps between rendered test views in TensorBoard (0: never)')
    flag(
        '--eval_every',
        type=int,
        default=50000,
        help='steps between test-set PSNR, and at the end on all views (0: never)',
    )
    flag('--eval_views', type=int, default=0, help='test views used by eval_every, evenly spaced (0: all)')
    flag('--save_every', type=int, default=10000, help='steps between checkpoints (0: only at the end)')
    flag('--keep_checkpoints', type=int, default=5, help='checkpoints kept in log_dir')
    flag('--chunk', type=int, default=8192, help='rays per forward pass when rendering images')
    flag(
        '--resume',
        nargs='?',
        const='latest',
        default=None,
        metavar='CKPT',
        help='continue from the latest checkpoint in log_dir, or from CKPT',
    )
    flag(
        '--mesh_threshold',
        type=float,
        default=None,
        help='density of the surface for extract_mesh.py (default: chosen from the density field)',
    )
    return p


def add_speed_flags(group, default_precision):
    group.add_argument('--device', default='auto', help='auto (CUDA when present), cpu, cuda or cuda:N')
    group.add_argument(
        '--precision',
        default=default_precision,
        choices=['fp32', 'tf32', 'bf16'],
        help='matrix precision: fp32, tf32 (CUDA), or bf16 (the MLP under bfloat16 autocast; '
        'the rest float32)' + ('' if default_precision else "; default: the run's"),
    )


def run_parser(description, chunk=8192, data=True):
    """A parser with the flags shared by the scripts that use a trained run.

    --log_dir (the run; its latest checkpoint), --ckpt, --base_dir (when
    `data`), --chunk, --device and --precision; errors are one line, as for
    train.py; the caller adds its own flags.
    """
    p = cli.Parser(description=description, usage='%(prog)s --log_dir RUN [--FLAG VALUE ...]')
    g = p.add_argument_group('the run')
    g.add_argument('--log_dir', default=None, help='run folder (its latest readable checkpoint is used)')
    g.add_argument('--ckpt', default=None, help='a checkpoint file instead (outputs then go beside it)')
    if data:
        g.add_argument('--base_dir', default=None, help='scene folder, if it moved since training')
    g = p.add_argument_group('device and speed')
    g.add_argument('--chunk', type=cli.positive_int, default=chunk, help='rays or points per forward pass')
    add_speed_flags(g, default_precision=None)
    return p


def check_flags(cfg):
    """Raise ConfigError with a one-line fix for the first bad flag (before any dataset default is known)."""
    for k in POSITIVE:  # written so that nan fails too; inf is refused below
        if not getattr(cfg, k) > 0:
            raise ConfigError(f'--{k} must be positive, got {getattr(cfg, k)}')
    for k in NON_NEGATIVE:
        v = getattr(cfg, k)
        if v is not None and not v >= 0:
            raise ConfigError(f'--{k} must not be negative, got {v}')
    for k, v in sorted(vars(cfg).items()):
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f'--{k} must be a finite number, got {v}')
    if cfg.min_deg_point > cfg.max_deg_point:
        raise ConfigError(
            f'--min_deg_point ({cfg.min_deg_point}) must not exceed --max_deg_point ({cfg.max_deg_point})'
        )
    if cfg.near is not None and cfg.far is not None and cfg.near >= cfg.far:
        raise ConfigError(f'--near ({cfg.near}) must be less than --far ({cfg.far})')
    if cfg.dataset_name not in DATASET_NAMES:
        raise ConfigError(
            f"--dataset_name: invalid choice: '{cfg.dataset_name}' (choose from "
            + ', '.join(f"'{n}'" for n in DATASET_NAMES)
            + ')'
        )
    check_device_name(cfg.device)


def check_device_name(name):
    if name not in ('auto', 'cpu') and not name.startswith('cuda'):
        raise ConfigError(f'--device must be auto, cpu, cuda or cuda:N, got {name!r}')


def check_resolved(cfg, need_data=True):
    """The checks that need the per-dataset defaults filled in."""
    if cfg.near >= cfg.far:
        raise ConfigError(f'--near ({cfg.near}) must be less than --far ({cfg.far})')
    if cfg.lindisp and cfg.near <= 0:
        raise ConfigError('--lindisp needs --near > 0')
    check_sampling_range(cfg)
    if need_data and cfg.dataset_name != 'demo' and not os.path.isdir(cfg.base_dir):
        import datasets  # torch: only once the flags are known to be good

        folder, script = datasets.DATASETS[cfg.dataset_name].folder, datasets.DATASETS[cfg.dataset_name].script
        parent = os.path.dirname(os.path.normpath(cfg.base_dir))
        scenes = (
            sorted(d for d in os.listdir(parent) if os.path.isdir(os.path.join(parent, d)))
            if os.path.isdir(parent) and os.path.basename(parent) == folder
            else []
        )
        if scenes:
            raise ConfigError(
                f'scene folder {cfg.base_dir} not found; {parent} has: {", ".join(scenes)} '
                '(pass one of them with --scene)'
            )
        raise ConfigError(
            f'scene folder {cfg.base_dir} not found: run {script} (or pass --data_dir/--scene/--base_dir)'
        )


def _samples_are_finite(cfg, far):
    """Whether one ray's frustum Gaussians between cfg.near and `far` stay finite in float32."""
    import torch  # only once the flags are known to be good

    import ray_utils

    one = torch.ones(1, 1)
    _, (mean, cov) = ray_utils.sample_along_rays(
        torch.zeros(1, 3),
        torch.tensor([[0.0, 0.0, -1.0]]),
        1e-3 * one,
        cfg.num_samples,
        cfg.near * one,
        far * one,
        False,
        cfg.lindisp,
        cfg.ray_shape,
    )
    return bool(torch.isfinite(mean).all() and torch.isfinite(cov).all())


def check_sampling_range(cfg):
    """Refuse --near/--far whose samples overflow float32 (a cone's frustum variances grow as t^4), naming
    the largest round --far (1, 2 or 5 x 10^k) that works with the other sampling flags."""
    if _samples_are_finite(cfg, cfg.far):
        return
    fits = (f for f in (m * 10.0**k for k in range(30, -4, -1) for m in (5, 2, 1)) if cfg.near < f < cfg.far)
    best = next((f for f in fits if _samples_are_finite(cfg, f)), None)
    fix = f'pass a --far of at most {best:g}' if best else 'pass a smaller --near and --far'
    raise ConfigError(
        f"--far {cfg.far:g}: samples that far overflow float32 (their Gaussians' variances grow with a power of "
        f'the distance); {fix} (in scene units, with these --near, --num_samples, --lindisp and --ray_shape)'
    )


def get_config(argv=None, need_data=True, prog=None):
    """Parse, check the flags, fill per-dataset defaults, check the rest; on error print one line and exit 2."""
    parser = build_parser()
    if prog:
        parser.prog = prog
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, a in enumerate(argv):  # --config resolves under configs/ too
        if a == '--config' and i + 1 < len(argv):
            argv[i + 1] = _config_file_path(argv[i + 1])
        elif a.startswith('--config='):
            argv[i] = '--config=' + _config_file_path(a.split('=', 1)[1])
    cfg = parser.parse_args(argv)
    try:
        check_flags(cfg)
        import datasets  # torch: only once the flags are known to be good

        datasets.apply_defaults(cfg)
        check_resolved(cfg, need_data)
    except ConfigError as e:
        parser.error(str(e))
    return cfg


def save_config(cfg, path):
    """Write the resolved config as a file that --config reads back (atomically)."""
    lines = []
    for k, v in sorted(vars(cfg).items()):
        if v is None or k in ('config', 'resume'):
            continue
        lines.append(f'{k} = {str(v).lower() if isinstance(v, bool) else v}')
    with cli.atomic_output(path) as tmp, open(tmp, 'w') as f:
        f.write('\n'.join(lines) + '\n')
