"""End-to-end training on a tiny generated scene."""

import glob
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

import train
from conftest import REPO, demo_run_args, needs_cuda
from runs import load_checkpoint
from scheduler import learning_rate


def train_args(scene, log_dir, *extra):
    return demo_run_args(scene, log_dir, *'--batch_size 256 --lr_delay_steps 10 --log_every 10'.split(), *extra)


def read_eval(log_dir):
    with open(os.path.join(log_dir, 'eval.jsonl')) as f:
        return [json.loads(line) for line in f]


def test_training_lowers_the_loss_and_writes_logs(tiny_demo, tmp_path, capsys):
    log = tmp_path / 'run'
    train.main(
        train_args(
            tiny_demo,
            log,
            '--max_steps',
            '150',
            '--eval_every',
            '50',
            '--render_every',
            '50',
            '--save_every',
            '50',
            '--keep_checkpoints',
            '2',
        )
    )
    evals = read_eval(log)
    assert [e['step'] for e in evals] == [50, 100, 150]
    assert evals[-1]['psnr'] > evals[0]['psnr'] + 1.0 and evals[-1]['psnr'] > 15
    assert sorted(os.path.basename(p) for p in glob.glob(str(log / 'ckpt_*.pt'))) == [
        'ckpt_0000100.pt',
        'ckpt_0000150.pt',
    ]
    assert glob.glob(str(log / 'events.out.tfevents.*'))
    assert (log / 'config.txt').exists()
    model, ckpt = load_checkpoint(str(log / 'ckpt_0000150.pt'))
    assert ckpt['step'] == 150 and not model.training
    assert ckpt['config']['net_width'] == 32 and ckpt['model_args']['net_width'] == 32


def test_tensorboard_has_scalars_and_images(tiny_demo, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = tmp_path / 'run'
    train.main(train_args(tiny_demo, log, '--max_steps', '20', '--render_every', '20', '--eval_every', '20'))
    acc = EventAccumulator(str(log), size_guidance={'images': 0})
    acc.Reload()
    tags = acc.Tags()
    assert {
        'train/loss',
        'train/psnr_coarse',
        'train/psnr_fine',
        'train/psnr_avg',
        'train/lr',
        'train/rays_per_sec',
        'test/psnr',
    } <= set(tags['scalars'])
    assert {'test/rgb', 'test/target', 'test/depth', 'test/acc'} <= set(tags['images'])
    lrs = acc.Scalars('train/lr')
    assert lrs[-1].step == 20
    assert lrs[-1].value == pytest.approx(5e-4, rel=1e-6)  # the 20th update, at lr_final


def test_resume_continues_the_schedule_and_is_exact_on_cpu(tiny_demo, tmp_path):
    common = ('--max_steps', '40', '--eval_every', '20', '--save_every', '20')
    straight, split = tmp_path / 'straight', tmp_path / 'split'
    train.main(train_args(tiny_demo, straight, *common))
    # Same run, stopped after 20 steps (a shorter --max_steps would change the schedule,
    # so stop by removing the last checkpoint and resuming from step 20).
    train.main(train_args(tiny_demo, split, *common))
    os.remove(split / 'ckpt_0000040.pt')
    events_before = glob.glob(str(split / 'events.out.tfevents.*'))
    train.main(train_args(tiny_demo, split, *common, '--resume'))
    a = torch.load(straight / 'ckpt_0000040.pt', weights_only=False)
    b = torch.load(split / 'ckpt_0000040.pt', weights_only=False)
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    assert read_eval(straight)[-1]['psnr'] == read_eval(split)[-1]['psnr']
    assert b['optimizer']['param_groups'][0]['lr'] == pytest.approx(learning_rate(40, 5e-3, 5e-4, 40, 10, 0.01))
    # The earlier event file is kept: logs are appended, never deleted.
    assert set(events_before) < set(glob.glob(str(split / 'events.out.tfevents.*')))


def test_max_minutes_counts_the_training_time_before_a_resume(tiny_demo, tmp_path, capsys):
    """The checkpoint carries the run's training seconds; a resume whose --max_minutes they already
    exceed trains no step (the clock does not restart), evaluates and saves."""
    log = tmp_path / 'run'
    t = time.time()
    train.main(train_args(tiny_demo, log, '--max_steps', '5', '--eval_every', '5'))
    wall = time.time() - t
    spent = torch.load(log / 'ckpt_0000005.pt', weights_only=False)['train_seconds']
    assert 0 < spent < wall
    assert read_eval(log)[-1]['train_seconds'] == pytest.approx(spent, abs=0.1)  # evaluated at the end, before saving
    capsys.readouterr()
    train.main(
        train_args(
            tiny_demo, log, '--max_steps', '1000', '--eval_every', '5', '--resume', '--max_minutes', f'{spent / 2 / 60}'
        )
    )
    assert f'--max_minutes {spent / 2 / 60:g} reached at step 5' in capsys.readouterr().out
    ckpt = torch.load(log / 'ckpt_0000005.pt', weights_only=False)
    assert [os.path.basename(p) for p in glob.glob(str(log / 'ckpt_*.pt'))] == ['ckpt_0000005.pt']
    assert ckpt['step'] == 5 and ckpt['train_seconds'] >= spent


def run_train(*args):
    return subprocess.run(
        [sys.executable, os.path.join(REPO, 'train.py'), *args], capture_output=True, text=True, timeout=300
    )


def test_resume_refuses_a_different_network_and_a_missing_path(tiny_demo, tmp_path):
    log = tmp_path / 'run'
    train.main(train_args(tiny_demo, log, '--max_steps', '5', '--eval_every', '0'))
    res = run_train(*train_args(tiny_demo, log, '--max_steps', '10', '--net_width', '48', '--resume'))
    assert res.returncode == 2 and 'different network (net_width: 32 there, 48 here)' in res.stderr
    assert 'Traceback' not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = run_train(*train_args(tiny_demo, log, '--resume', str(tmp_path / 'nope.pt')))
    assert res.returncode == 2 and 'no such checkpoint' in res.stderr
    assert not os.path.exists(log / 'ckpt_0000010.pt')


@pytest.mark.parametrize('device', ['cpu', pytest.param('cuda', marks=needs_cuda)])
def test_level_by_level_backward_equals_one_backward(tiny_demo, device):
    """train_step backpropagates each level's loss before the next level runs: the same gradient
    and loss as one backward of the total (bit for bit on CPU), with half the activations held."""
    import config as config_lib
    import datasets
    import runs
    import train_utils
    from scheduler import Schedule

    cfg = config_lib.get_config(train_args(tiny_demo, 'unused', '--device', device, '--randomized', 'false'))
    data = datasets.dataset_from_config(cfg, 'train')
    from loss import mipnerf_loss

    grads, losses = [], []
    for per_level in (True, False):
        torch.manual_seed(0)
        model = runs.build_model(cfg).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        sampler = datasets.RaySampler(data, 256, torch.device(device), seed=0)
        if per_level:
            loss, psnrs, _, finite = train_utils.train_step(model, opt, Schedule(cfg), sampler, cfg, 0)
            assert finite
        else:  # the reference: one backward of the total loss
            rays, target = sampler.sample()
            loss, _, psnrs = mipnerf_loss(model(rays), target, rays.lossmult, cfg.coarse_loss_mult)
            loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        losses.append((loss.detach(), psnrs))
    exact = device == 'cpu'
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=0 if exact else 1e-5, atol=0 if exact else 1e-7)
    torch.testing.assert_close(losses[0][0], losses[1][0], rtol=1e-7, atol=0)
    torch.testing.assert_close(losses[0][1], losses[1][1], rtol=1e-7, atol=0)


def test_update_k_uses_the_rate_of_step_k(tiny_demo):
    """As the official loop, which counts steps from 1: the first update uses lr(1), the last lr_final."""
    import config as config_lib
    import datasets
    import runs
    import train_utils
    from scheduler import Schedule

    cfg = config_lib.get_config(train_args(tiny_demo, 'unused', '--max_steps', '40'))
    data = datasets.dataset_from_config(cfg, 'train')
    model = runs.build_model(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sampler = datasets.RaySampler(data, 16, 'cpu', seed=0)
    for done, expected in ((0, learning_rate(1, 5e-3, 5e-4, 40, 10, 0.01)), (39, 5e-4)):
        assert train_utils.train_step(model, opt, Schedule(cfg), sampler, cfg, done)[3]
        assert opt.param_groups[0]['lr'] == pytest.approx(expected)


def test_a_log_file_gets_lines_not_progress_bars(tiny_demo, tmp_path):
    """Output redirected to a file (not a terminal): no progress-bar redraws, one line per
    log_every and per evaluation, each on its own line."""
    log = tmp_path / 'run'
    res = run_train(*train_args(tiny_demo, log, '--max_steps', '30', '--eval_every', '15', '--log_every', '10'))
    assert res.returncode == 0, res.stderr
    assert '\r' not in res.stdout + res.stderr and 'it/s' not in res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert [ln.split(':')[0] for ln in lines if re.match(r'step \d+: loss', ln)] == ['step 10', 'step 20', 'step 30']
    assert [ln.split(':')[0] for ln in lines if re.match(r'step \d+: test PSNR', ln)] == ['step 15', 'step 30']
    assert lines[-1].startswith('done: 30 steps')


def test_a_nonfinite_step_leaves_parameters_and_adam_unchanged_without_a_host_read(tiny_demo, monkeypatch):
    """The fused Adam of runs.build_optimizer skips a non-finite update on the device (found_inf):
    parameters and Adam's moments and step count stay bit for bit; the next finite step updates."""
    import config as config_lib
    import datasets
    import runs
    import train_utils
    from scheduler import Schedule

    cfg = config_lib.get_config(train_args(tiny_demo, 'unused'))
    data = datasets.dataset_from_config(cfg, 'train')
    model = runs.build_model(cfg)
    opt = runs.build_optimizer(model, cfg)
    sampler = datasets.RaySampler(data, 64, 'cpu', seed=0)
    assert bool(train_utils.train_step(model, opt, Schedule(cfg), sampler, cfg, 0)[3])
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    moments = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()}
    real = sampler.sample

    def nan_target():  # a NaN in the target colours makes the loss NaN
        rays, target = real()
        return rays, target * float('nan')

    monkeypatch.setattr(sampler, 'sample', nan_target)
    finite = train_utils.train_step(model, opt, Schedule(cfg), sampler, cfg, 1)[3]
    assert isinstance(finite, torch.Tensor) and not bool(finite)
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]), n
        assert all(torch.equal(v, moments[n][k]) for k, v in opt.state[p].items()), n
    monkeypatch.setattr(sampler, 'sample', real)
    assert bool(train_utils.train_step(model, opt, Schedule(cfg), sampler, cfg, 1)[3])
    assert all(not torch.equal(p, params[n]) for n, p in model.named_parameters() if p.grad.abs().max() > 0)
    assert int(opt.state[next(model.parameters())]['step']) == 2


@pytest.mark.parametrize('device', ['cpu', pytest.param('cuda', marks=needs_cuda)])
def test_a_device_flag_reads_its_own_step_not_the_work_queued_after_it(device):
    """train.py reads a step's `finite` flag after launching the next step: the read must wait for the
    flag's own step only. On CUDA a plain bool() of the tensor waits for the whole stream."""
    import train_utils

    flags = [torch.tensor(v, device=device) for v in (True, False)]
    read = [train_utils.DeviceFlag(f) for f in flags]
    if device == 'cuda':
        stream = torch.cuda.current_stream()
        torch.cuda._sleep(2_000_000_000)  # about a second of queued work after the flags
        assert [bool(f) for f in read] == [True, False] and not stream.query()  # still busy: not waited for
        assert bool(flags[0]) and stream.query()  # the plain read waited for the queued work
    else:
        assert [bool(f) for f in read] == [True, False]


def _tiny_training(tiny_demo, device, *extra):
    import config as config_lib
    import datasets
    import runs
    from scheduler import Schedule

    cfg = config_lib.get_config(train_args(tiny_demo, 'unused', '--device', str(device), *extra))
    torch.manual_seed(0)
    model = runs.build_model(cfg).to(device)
    opt = runs.build_optimizer(model, cfg)
    sampler = datasets.RaySampler(datasets.dataset_from_config(cfg, 'train'), 64, device, seed=0)
    return cfg, model, opt, Schedule(cfg), sampler


def test_the_step_graph_says_in_one_phrase_where_it_cannot_run(tiny_demo):
    import train_utils

    cfg, model, opt, schedule, sampler = _tiny_training(tiny_demo, 'cpu')
    cuda = torch.device('cuda')  # (only asked, never touched)
    assert train_utils.graph_problem(model, opt, cfg, cuda) is None
    assert train_utils.graph_problem(model, opt, cfg, torch.device('cpu')) == 'cpu is not a CUDA device'
    cfg.cuda_graph = False
    assert train_utils.graph_problem(model, opt, cfg, cuda) == 'off (--cuda_graph false)'
    cfg.cuda_graph = True
    plain = torch.optim.Adam(model.parameters())
    assert train_utils.graph_problem(model, plain, cfg, cuda) == 'the optimizer is not the fused Adam'
    cfg360, model360, opt360, _, _ = _tiny_training(tiny_demo, 'cpu', '--model', 'mipnerf360')
    assert 'depends on the step count' in train_utils.graph_problem(model360, opt360, cfg360, cuda)
    stepper = train_utils.Stepper(model, opt, schedule, sampler, cfg, torch.device('cpu'))
    assert stepper.problem and bool(stepper(0)[3]) and stepper.graph is None  # the plain step


def test_a_rate_in_a_tensor_is_filled_in_place_and_checkpoints_keep_floats(tiny_demo):
    import runs

    cfg, model, opt, schedule, _ = _tiny_training(tiny_demo, 'cpu')
    rate = opt.param_groups[0]['lr'] = torch.tensor(1.0)
    assert schedule.apply(opt, 3) == schedule(3) and opt.param_groups[0]['lr'] is rate
    assert rate.item() == pytest.approx(schedule(3)) and schedule(3) != 1.0
    saved = runs._plain_rates(opt.state_dict())
    assert saved['param_groups'][0]['lr'] == pytest.approx(schedule(3)) and opt.param_groups[0]['lr'] is rate


@needs_cuda
def test_the_step_graph_trains_as_the_plain_step(tiny_demo):
    """train_utils.Stepper on CUDA: warm-up steps, a capture, replays, a drop (as after a rollback) and a
    second capture give the plain step's losses and parameters, over steps whose rate changes (the
    delayed warm-up of 10 steps); each replay draws new rays."""
    import train_utils

    runs_ = []
    for graph in (False, True):
        cfg, model, opt, schedule, sampler = _tiny_training(tiny_demo, 'cuda', '--cuda_graph', str(graph).lower())
        stepper = train_utils.Stepper(model, opt, schedule, sampler, cfg, torch.device('cuda'))
        assert (stepper.problem is None) == graph
        losses = []
        for step in range(14):
            if step == 9:
                assert (stepper.graph is not None) == graph
                stepper.drop()
            losses.append(stepper(step)[0])
        runs_.append((torch.stack(losses).cpu(), [p.detach().cpu() for p in model.parameters()]))
    (plain_losses, plain_params), (graph_losses, graph_params) = runs_
    assert len(set(plain_losses.tolist())) == 14  # new rays every step
    torch.testing.assert_close(graph_losses, plain_losses, rtol=1e-5, atol=1e-7)
    for a, b in zip(graph_params, plain_params):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
