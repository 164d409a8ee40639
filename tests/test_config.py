import glob
import os
import subprocess
import sys

import pytest

import config
import datasets
from conftest import REPO


def test_defaults_equal_the_official_release(tmp_path):
    cfg = config.get_config(['--base_dir', str(tmp_path)])
    official = dict(
        batch_size=4096,
        max_steps=1_000_000,
        lr_init=5e-4,
        lr_final=5e-6,
        lr_delay_steps=2500,
        lr_delay_mult=0.01,
        num_samples=128,
        num_levels=2,
        min_deg_point=0,
        max_deg_point=16,
        deg_view=4,
        resample_padding=0.01,
        coarse_loss_mult=0.1,
        net_depth=8,
        net_width=256,
        net_depth_condition=1,
        net_width_condition=128,
        skip_layer=4,
        density_bias=-1.0,
        rgb_padding=0.001,
        stop_level_grad=True,
        use_viewdirs=True,
        randomized=True,
        white_bkgd=True,
        near=2.0,
        far=6.0,
        ray_shape='cone',
        density_noise=0.0,
        lindisp=False,
        factor=0,
        disable_integration=False,
        batching='single_image',
    )
    assert {k: getattr(cfg, k) for k in official} == official


def test_dataset_defaults_and_overrides(tmp_path):
    cfg = config.get_config(['--dataset_name', 'llff', '--base_dir', str(tmp_path)])
    assert (cfg.near, cfg.far, cfg.ray_shape, cfg.density_noise, cfg.white_bkgd, cfg.factor, cfg.batching) == (
        0.0,
        1.0,
        'cylinder',
        1.0,
        False,
        4,
        'all_images',
    )
    cfg = config.get_config(
        [
            '--dataset_name',
            'llff',
            '--base_dir',
            str(tmp_path),
            '--ray_shape',
            'cone',
            '--white_bkgd',
            'true',
            '--density_noise',
            '0',
            '--batching',
            'single_image',
        ]
    )
    assert (cfg.ray_shape, cfg.white_bkgd, cfg.density_noise, cfg.batching) == ('cone', True, 0.0, 'single_image')
    cfg = config.get_config(['--dataset_name', 'multicam', '--base_dir', str(tmp_path)])
    assert cfg.batching == 'all_images'


def test_data_paths_and_log_dir(tmp_path):
    (tmp_path / 'nerf_synthetic' / 'ship').mkdir(parents=True)
    cfg = config.get_config(['--data_dir', str(tmp_path), '--scene', 'ship'])
    assert cfg.base_dir == str(tmp_path / 'nerf_synthetic' / 'ship')
    assert cfg.log_dir == os.path.join('log', 'ship')
    # A scene folder given directly names the run after itself, not after the dataset's default scene.
    (tmp_path / 'my_room').mkdir()
    cfg = config.get_config(['--config', '360.txt', '--base_dir', str(tmp_path / 'my_room') + os.sep])
    assert cfg.log_dir == os.path.join('log', 'my_room')


def test_config_file_is_read_and_flags_override_it(tmp_path):
    cfg_file = tmp_path / 'my.txt'
    cfg_file.write_text('dataset_name = demo\nnet_width = 64\nrandomized = false\nnear = 2.5\n')
    cfg = config.get_config(['--config', str(cfg_file)])
    assert (cfg.dataset_name, cfg.net_width, cfg.randomized, cfg.near, cfg.far) == ('demo', 64, False, 2.5, 6.0)
    cfg = config.get_config(['--config', str(cfg_file), '--net_width', '32', '--randomized'])
    assert (cfg.net_width, cfg.randomized) == (32, True)


def test_every_shipped_config_parses():
    files = sorted(glob.glob(os.path.join(REPO, 'configs', '*.txt')))
    assert {os.path.basename(f) for f in files} >= {'blender.txt', 'llff.txt', 'multicam.txt', 'demo.txt'}
    for f in files:
        cfg = config.get_config(['--config', os.path.basename(f)], need_data=False)
        assert cfg.dataset_name in datasets.DATASETS


def test_saved_config_reads_back(tmp_path):
    cfg = config.get_config(['--config', 'demo.txt', '--lr_init', '3e-3', '--white_bkgd', 'false'])
    path = str(tmp_path / 'config.txt')
    config.save_config(cfg, path)
    again = config.get_config(['--config', path])
    assert vars(again) == {**vars(cfg), 'config': path}


@pytest.mark.parametrize(
    'args,needle',
    [
        (['--dataset_name', 'nosuch'], "invalid choice: 'nosuch'"),
        (['--data_dir', '/nonexistent', '--scene', 'lego'], 'scripts/download_blender.sh'),
        (['--dataset_name', 'llff', '--data_dir', '/nonexistent'], 'scripts/download_llff.sh'),
        (['--dataset_name', 'multicam', '--data_dir', '/nonexistent'], 'scripts/download_multicam.sh'),
        (['--dataset_name', 'demo', '--batch_size', '0'], '--batch_size must be positive'),
        (['--dataset_name', 'demo', '--net_width', '-3'], '--net_width must be positive'),
        (['--dataset_name', 'demo', '--near', '5', '--far', '3'], '--near (5.0) must be less than --far (3.0)'),
        (['--dataset_name', 'demo', '--min_deg_point', '5', '--max_deg_point', '2'], '--min_deg_point'),
        (['--dataset_name', 'demo', '--white_bkgd', 'maybe'], 'expected true or false'),
        (['--config', 'nosuch.txt'], 'nosuch.txt'),
    ],
)
def test_bad_flags_give_one_line_error(args, needle, capsys):
    with pytest.raises(SystemExit) as e:
        config.get_config(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and needle in err[0], err


def test_bad_flag_in_a_real_process_writes_nothing(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, 'train.py'),
            '--dataset_name',
            'demo',
            '--near',
            '5',
            '--far',
            '3',
            '--log_dir',
            str(tmp_path / 'run'),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and res.stderr.count('\n') == 1 and 'Traceback' not in res.stderr
    assert 'train.py: error: --near (5.0) must be less than --far (3.0)' in res.stderr
    assert not (tmp_path / 'run').exists() and not (tmp_path / 'data').exists()


def test_shipped_configs_hold_only_what_differs_from_the_defaults():
    """Each default lives in one place: a config file line that repeats the default is a second copy."""
    for f in sorted(glob.glob(os.path.join(REPO, 'configs', '*.txt'))):
        lines = [ln.split('=', 1) for ln in open(f).read().splitlines() if ln.strip() and not ln.startswith('#')]
        keys = {k.strip() for k, _ in lines}
        cfg = config.get_config(['--config', f], need_data=False)
        default = config.get_config(['--dataset_name', cfg.dataset_name], need_data=False)
        same = sorted(k for k in keys - {'dataset_name'} if getattr(cfg, k) == getattr(default, k))
        assert not same, f'{os.path.basename(f)} repeats the defaults of {same}'


def test_help_lists_the_datasets_of_datasets_py():
    assert set(config.DATASET_NAMES) == set(datasets.DATASETS)


@pytest.mark.parametrize('ray_shape,lindisp', [('cone', False), ('cylinder', False), ('cone', True)])
def test_a_far_that_overflows_is_refused_naming_one_that_works(ray_shape, lindisp):
    """The refusal names the largest round --far (1, 2 or 5 x 10^k) whose samples stay finite: it passes,
    and the next round value up (2 or 2.5 times it) overflows. (With --lindisp the last interval reaches
    --far: its limit, 2e6 at the defaults, is lower than without it, 5e7.)"""
    import re

    flags = ['--dataset_name', 'blender', '--ray_shape', ray_shape] + ['--lindisp'] * lindisp
    cfg = config.get_config(flags, need_data=False)
    cfg.far = 1e30
    with pytest.raises(config.ConfigError, match='--far 1e[+]30: samples that far overflow float32') as e:
        config.check_sampling_range(cfg)
    advised = float(re.search(r'pass a --far of at most ([0-9.e+]+)', str(e.value)).group(1))
    assert 1e3 < advised < 1e30 and f'{advised:.0e}'[0] in '125'
    cfg.far = advised
    config.check_sampling_range(cfg)
    cfg.far = advised * 2.5
    with pytest.raises(config.ConfigError):
        config.check_sampling_range(cfg)
