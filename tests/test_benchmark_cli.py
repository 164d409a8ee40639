"""scripts/benchmark.py on bad input: one line on stderr, exit status 2, no traceback; its flags and --quick."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from scripts import benchmark

SCRIPT = os.path.join(REPO, 'scripts', 'benchmark.py')

# name -> (arguments, the flag the error must name). All fail before any timing.
BAD = {
    'cuda_missing': (['--device', 'cuda'], '--device'),
    'device_invalid': (['--device', 'gpu'], '--device'),
    'base_dir_missing': (['--device', 'cpu', '--base_dir', '{tmp}/no_such_scene'], '--base_dir'),
    'grid_size_1': (['--device', 'cpu', '--grid_size', '1'], '--grid_size'),
    'steps_0': (['--device', 'cpu', '--steps', '0'], '--steps'),
}


@pytest.fixture(scope='module')
def bad_runs(tmp_path_factory):
    """Every bad case, started at once (each process only imports torch and parses its flags)."""
    tmp = str(tmp_path_factory.mktemp('bench'))
    procs = {}
    for name, (argv, _) in BAD.items():
        if name == 'cuda_missing' and torch.cuda.is_available():
            continue  # it would run the benchmark
        procs[name] = subprocess.Popen(
            [sys.executable, SCRIPT] + [a.format(tmp=tmp) for a in argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=120)
        out[name] = (p.returncode, stdout, stderr)
    return out


@pytest.mark.parametrize('name', list(BAD))
def test_bad_input_is_one_line(name, bad_runs):
    if name not in bad_runs:
        pytest.skip('CUDA is available here')
    rc, stdout, stderr = bad_runs[name]
    flag = BAD[name][1]
    assert rc == 2, stderr
    assert 'Traceback' not in stderr + stdout
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith('benchmark.py: error:'), stderr
    assert flag in lines[0], stderr
    assert stdout == ''


@pytest.mark.parametrize(
    'argv, flag',
    [
        (['--variants', 'fp32,fp16'], '--variants'),
        (['--variants', 'bf16+fast'], '--variants'),
        (['--warmup', '-1'], '--warmup'),
        (['--quick', '--batch_size', '0'], '--batch_size'),
        (['--num_samples', '0'], '--num_samples'),
        (['--image_size', '-8'], '--image_size'),
        (['--chunk', '-1'], '--chunk'),
        (['--net_width', 'wide'], '--net_width'),
    ],
)
def test_bad_flag_in_process(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        benchmark.parse_args(argv)
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('benchmark.py: error:') and flag in lines[0], lines


def sizes(args):
    return {k: getattr(args, k) for k in benchmark.SIZES}


def test_quick_defaults_and_explicit_flags_win():
    assert sizes(benchmark.parse_args([])) == dict(
        batch_size=4096, num_samples=128, net_width=256, image_size=800, grid_size=256, chunk=8192, steps=20, warmup=5
    )
    assert sizes(benchmark.parse_args(['--quick'])) == dict(
        batch_size=256, num_samples=16, net_width=64, image_size=32, grid_size=16, chunk=8192, steps=3, warmup=1
    )
    args = benchmark.parse_args(['--quick', '--batch_size', '128', '--steps', '2', '--warmup', '0'])
    assert (args.batch_size, args.steps, args.warmup, args.num_samples, args.grid_size) == (128, 2, 0, 16, 16)
    # Explicit flags win whichever side of --quick they are on.
    assert benchmark.parse_args(['--batch_size', '512', '--quick']).batch_size == 512


def test_every_flag_has_help_with_its_default():
    parser = benchmark.build_parser()
    formatter = parser.formatter_class('benchmark.py')
    for action in parser._actions:
        if action.dest == 'help':
            continue
        assert action.help, action.option_strings
        # The formatter appends non-None defaults; None ones are described in the text itself.
        entry = formatter._get_help_string(action)
        assert 'default' in entry and entry.count('(default:') == 1, (action.option_strings, entry)
