"""The fused MLP kernels (fused_mlp.py, fused_kernels.py) compute model.MLP and its gradients under bf16 autocast.

On any machine: the weight packing, both chunk schedules and the gradient GEMMs (`fused_mlp.emulate`,
plain PyTorch) against the float32 MLP and autograd, with the bf16-autocast error as the yardstick;
the shapes they take; the one-line fallback; and (where Triton with Gluon is installed) that the
kernels compile for sm_90a, and the weight-gradient kernel in Triton's interpreter against float64. On a
Hopper GPU: the kernels themselves, the same way, and whole images."""

import math
import os
import subprocess
import sys

import pytest
import torch

import fused_mlp
import ray_utils
from config import ModelArgs
from conftest import REPO
from model import MLP, MipNeRF
from model360 import MipNeRF360
from runs import set_precision
from test_model import make_rays

hopper = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)), reason='needs a Hopper GPU'
)
NAMES = ('rgb', 'density') + fused_mlp.PARAMS


def default_mlp(device='cpu', seed=0):
    """The default mip-NeRF MLP with random biases too (they start at zero), so that all are checked."""
    torch.manual_seed(seed)
    mlp = MLP(96, 27, 8, 256, 4).to(device)
    with torch.no_grad():
        for name, p in mlp.named_parameters():
            if name.endswith('bias'):
                p.uniform_(-0.1, 0.1)
    return mlp


def inputs(rays, samples, device='cpu', seed=1):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(rays, samples, 96, device=device, generator=g)
    cond = torch.randn(rays, 27, device=device, generator=g)
    d_rgb = torch.randn(rays, samples, 3, device=device, generator=g)
    return x, cond, d_rgb, torch.randn(rays, samples, device=device, generator=g)


def reference(mlp, x, cond, d_rgb, d_density, autocast):
    """Outputs and parameter gradients of the plain MLP (float32 or bf16 autocast)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        rgb, density = mlp(x, cond)
    rgb, density = rgb.float(), density.float()
    grads = torch.autograd.grad((rgb, density), list(mlp.parameters()), (d_rgb, d_density))
    return [rgb.detach(), density.detach(), *grads]


def worst_ratio(mlp, case, got):
    """max over tensors of |got - fp32| / |autocast - fp32| (floored at half a bf16 step of the tensor's scale)."""
    ref, ac = reference(mlp, *case, False), reference(mlp, *case, True)
    ratios = {}
    for name, g, r, a in zip(NAMES, got, ref, ac):
        assert g.shape == r.shape and g.dtype == torch.float32, name
        floor = 2.0**-8 * r.abs().max().item()
        ratios[name] = (g - r).abs().max().item() / max((a - r).abs().max().item(), floor, 1e-12)
    return max(ratios.values()), ratios


@pytest.mark.parametrize('rays,samples', [(1, 128), (7, 37), (5, 128)])
def test_packing_schedules_and_gradient_gemms_compute_the_mlp(rays, samples):
    mlp = default_mlp()
    case = inputs(rays, samples)
    rgb, density, grads = fused_mlp.emulate(mlp, *case)
    worst, ratios = worst_ratio(mlp, case, [rgb, density, *grads])
    assert worst <= 2.5, ratios  # bf16 rounding as autocast's, float32 sums in another order
    assert all(torch.equal(a, b) for a, b in zip(fused_mlp.emulate(mlp, case[0], case[1]), (rgb, density)))


@pytest.mark.parametrize(
    'key,swap', [('w', (0, 1)), ('w', (18, 22)), ('w', (33, 34)), ('wt', (1, 2)), ('wt', (20, 30))]
)
def test_a_packing_mistake_is_caught(monkeypatch, key, swap):
    """The check above can fail: two chunks swapped (layer 0's; layer 5's h and x; the bottleneck's; the backward's)."""
    pack = fused_mlp.pack

    def bad(params, **kw):
        pk = pack(params, **kw)
        w = pk[key].view(-1, fused_mlp.WIDTH, fused_mlp.KC).clone()
        w[list(swap)] = w[list(swap[::-1])]
        return dict(pk, **{key: w.view(-1, fused_mlp.KC)})

    monkeypatch.setattr(fused_mlp, 'pack', bad)
    mlp = default_mlp()
    case = inputs(5, 40)
    rgb, density, grads = fused_mlp.emulate(mlp, *case)
    assert worst_ratio(mlp, case, [rgb, density, *grads])[0] > 5


def test_repacking_gathers_what_pack_builds():
    mlp = default_mlp()
    params = [p.detach() for p in mlp.parameters()]
    got, want = fused_mlp._Packer(params).fill(params), fused_mlp.pack(params)
    assert got.keys() == want.keys()
    for k in got:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k].reshape(got[k].shape)), k


def test_weight_gradients_split_over_rows_sum_to_the_whole():
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(16 * 4096, k, generator=g).to(torch.bfloat16) for k in (3, 5))
    whole = a.float().t() @ b.float()
    for split in (16, 1):  # each piece's bf16 product rounded: within a percent of the largest entry
        assert (fused_mlp._tn(a, b, split=split) - whole).abs().max() < 0.01 * whole.abs().max()


def interpreted(name, calls, tmp_path):
    """[`fused_kernels.<name>(*args)` for args in calls], run in Triton's interpreter on the CPU, in one
    subprocess (the variable is read when Triton is imported)."""
    torch.save(calls, tmp_path / 'in.pt')
    code = (
        'import sys, torch, fused_kernels; f = fused_kernels.' + name
        + '; torch.save([f(*a) for a in torch.load(sys.argv[1])], sys.argv[2])'
    )  # fmt: skip
    env = dict(os.environ, TRITON_INTERPRET='1')
    out = subprocess.run([sys.executable, '-c', code, str(tmp_path / 'in.pt'), str(tmp_path / 'out.pt')],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return torch.load(tmp_path / 'out.pt')


def test_the_weight_gradient_kernel_computes_every_product(tmp_path):
    """`fused_kernels.tn_sums` in Triton's interpreter (CPU), and `fused_mlp.tn_sums`, against float64, in the
    four calls `weight_grads` makes: blocks 1..8 (9 tiles of rows: 18 steps over 8 row ranges, so they
    differ in length), dz_0 and dz_5 against x (96 wide and n rows: the kernel reads zeros past both), dv
    against h_8, d_rgb (16 wide, n rows) against v (nonzero past n). Zero rows past n; every block at its
    own scale (a swapped or misplaced block shows)."""
    pytest.importorskip('triton.experimental.gluon.language.nvidia.hopper')
    npad, n, W = 9 * fused_mlp.BM, 1100, fused_mlp.WIDTH
    g = torch.Generator().manual_seed(0)
    H = torch.randn(9 * npad, W, generator=g).to(torch.bfloat16)
    DZ = (torch.randn(9, npad, W, generator=g) * torch.arange(1.0, 10.0).view(9, 1, 1) * 1e-3).to(torch.bfloat16)
    DZ[:, n:] = 0
    DZ = DZ.view(9 * npad, W)
    x = torch.randn(n, 96, generator=g).to(torch.bfloat16)
    DV = torch.randn(npad, 128, generator=g).to(torch.bfloat16)
    DV[n:] = 0
    V = torch.randn(npad, 128, generator=g).to(torch.bfloat16)
    d_rgb = torch.nn.functional.pad(torch.randn(n, 3, generator=g), (0, 13)).to(torch.bfloat16)
    calls = [
        (DZ, H, [(i + 1) * npad for i in range(8)], [i * npad for i in range(8)], npad),
        (DZ, x, (0, 5 * npad), (0, 0), npad),
        (DV, H, (0,), (8 * npad,), npad),
        (d_rgb, V, (0,), (0,), npad),
    ]
    got = interpreted('tn_sums', calls, tmp_path)
    for call, kernel in zip(calls, got):
        A, B, a_rows, b_rows, rows = call
        Az, Bz = (torch.cat([T.double(), T.new_zeros(rows, T.shape[1]).double()]) for T in (A, B))  # (zeros past)
        a = torch.stack([Az[i : i + rows] for i in a_rows])
        want = (a.transpose(1, 2) @ torch.stack([Bz[j : j + rows] for j in b_rows]), a.sum(1))
        for (dw, db), tol in ((kernel, 1e-5), (fused_mlp.tn_sums(*call), 1e-2)):
            for g_, ref in zip((dw, db), want):
                assert g_.dtype == torch.float32 and g_.shape == ref.shape
                err = (g_.double() - ref).abs().amax((1, 2) if g_.dim() == 3 else 1)
                assert (err <= tol * ref.abs().amax((1, 2) if ref.dim() == 3 else 1)).all(), (tol, err)


def test_the_ipe_kernel_reduces_large_arguments_exactly(tmp_path):
    """`fused_kernels.integrated_pos_enc` in Triton's interpreter (CPU) against float64, with means up to
    the range its argument reduction keeps exact (|mean| < 12 at 16 degrees, arguments to 3.9e5 radians)
    and variances from none to damping every degree: within the bf16 rounding of values in [-1, 1]. Its
    sm_90a build takes the GPU's sin.approx and cos.approx (the GPU test compares those)."""
    pytest.importorskip('triton.experimental.gluon.language.nvidia.hopper')
    import fused_kernels

    ptx = fused_kernels.compile_offline('ipe').asm['ptx']
    assert 'sin.approx.f32' in ptx and 'cos.approx.f32' in ptx
    g = torch.Generator().manual_seed(0)
    mean = (torch.rand(700, 3, generator=g) * 2 - 1) * torch.logspace(-3, math.log10(11.9), 700)[:, None]
    var = torch.rand(700, 3, generator=g) * torch.logspace(-12, 0, 700)[torch.randperm(700, generator=g)][:, None]
    got = interpreted('integrated_pos_enc', [(mean, var, 0, 16)], tmp_path)[0]
    y = mean.double()[:, None, :] * 2.0 ** torch.arange(16, dtype=torch.float64)[:, None]
    damp = torch.exp(-0.5 * var.double()[:, None, :] * 4.0 ** torch.arange(16, dtype=torch.float64)[:, None])
    ref = torch.cat([(damp * torch.sin(y)).reshape(700, -1), (damp * torch.cos(y)).reshape(700, -1)], -1)
    assert got.dtype == torch.bfloat16 and got.shape == ref.shape and y.abs().max() > 3e5
    assert (got.double() - ref).abs().max() <= 2**-8
    # The interpreter casts to bf16 by truncation (the GPU rounds): compare with the truncated float64 values.
    truncated = (ref.float().view(torch.int32) & ~0xFFFF).view(torch.float32).double()
    assert (got.double() != truncated).double().mean() < 0.01


def test_supported_shapes():
    assert fused_mlp.supports(MipNeRF(ModelArgs()).mlp) is None
    assert 'trunk' in fused_mlp.supports(MLP(96, 27, 4, 64, 2))
    assert 'skip' in fused_mlp.supports(MLP(96, 27, 8, 256, 3))
    assert 'view' in fused_mlp.supports(MLP(96, 0, 8, 256, 4))
    m360 = MipNeRF360(ModelArgs(model='mipnerf360'))
    assert all(fused_mlp.supports(m) is not None for m in m360.modules() if isinstance(m, MLP))


def test_no_kernel_off_hopper_and_one_line_saying_so(monkeypatch):
    mlp = default_mlp()
    lines = []
    assert not fused_mlp.usable(mlp, torch.device('cpu'), log=lines.append)
    assert lines == []  # the CPU never had the kernels: nothing to say
    if not torch.cuda.is_available():
        monkeypatch.setattr(fused_mlp, '_TOLD', set())
        cuda = torch.device('cuda')
        assert not fused_mlp.usable(mlp, cuda, log=lines.append)
        assert not fused_mlp.usable(mlp, cuda, log=lines.append)
        assert len(lines) == 1 and 'CUDA is not available' in lines[0] and 'plain bf16 MLP' in lines[0], lines
    assert not fused_mlp.usable(MLP(96, 27, 4, 64, 2), torch.device('cpu'), log=lines.append)


def test_bf16_model_on_cpu_takes_the_plain_path(monkeypatch):
    def boom(*a):
        raise AssertionError('a fused kernel was called on the CPU')

    monkeypatch.setattr(fused_mlp, 'forward', boom)
    monkeypatch.setattr(fused_mlp, 'integrated_pos_enc', boom)
    model = set_precision(MipNeRF(ModelArgs(num_samples=8)), 'bf16')
    model(make_rays((4,), 'cpu'))[-1][0].sum().backward()
    with torch.no_grad():
        model.eval()(make_rays((4,), 'cpu'))


@pytest.mark.parametrize(
    'which,save', [('fwd', False), ('fwd', True), ('bwd', False), ('dw', False), ('dwx', False), ('dwrgb', False)]
)
def test_kernels_compile_for_hopper(which, save):
    """Triton's bundled ptxas builds the kernels for sm_90a without a GPU, within a CTA's shared memory: TMA
    loads and wgmma (mma.sync for d_rgb's 16 rows, below wgmma's 64)."""
    pytest.importorskip('triton.experimental.gluon.language.nvidia.hopper')
    import fused_kernels

    k = fused_kernels.compile_offline(which, save)
    assert k.metadata.shared <= 232_448
    mma = 'mma.sync' if which == 'dwrgb' else 'wgmma.mma_async'
    assert mma in k.asm['ptx'] and 'cp.async.bulk.tensor' in k.asm['ptx']


@hopper
@pytest.mark.parametrize('rays,samples', [(1, 128), (7, 37), (300, 128), (4096, 128)])
def test_kernels_match_the_mlp_and_its_gradients(rays, samples):
    """One tile, a partial last tile, more tiles than SMs (the persistent loop), a training batch."""
    assert fused_mlp.problem(torch.device('cuda')) is None
    mlp = default_mlp('cuda')
    case = inputs(rays, samples, 'cuda')
    with torch.no_grad():
        inference = fused_mlp.forward(mlp, case[0], case[1])
    rgb, density = fused_mlp.forward(mlp, case[0], case[1])
    grads = torch.autograd.grad((rgb, density), list(mlp.parameters()), case[2:])
    assert all(torch.equal(a, b) for a, b in zip(inference, (rgb, density)))
    worst, ratios = worst_ratio(mlp, case, [rgb.detach(), density.detach(), *grads])
    assert worst <= 3, ratios


@hopper
def test_integrated_pos_enc_in_bf16_matches():
    g = torch.Generator(device='cuda').manual_seed(0)
    mean = torch.randn(5, 77, 3, device='cuda', generator=g) * 2
    var = torch.rand(5, 77, 3, device='cuda', generator=g) * torch.logspace(-8, 0, 77, device='cuda')[:, None]
    ref = ray_utils.integrated_pos_enc(mean, var, 0, 16)
    out = fused_mlp.integrated_pos_enc(mean, var, 0, 16)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    assert (out.float() - ref).abs().max() <= 2**-8  # the bf16 rounding of values in [-1, 1]
    assert (out.float() - ref.to(torch.bfloat16).float()).ne(0).float().mean() < 0.01


@hopper
def test_rendered_image_and_a_training_step_match_the_plain_bf16_mlp(monkeypatch):
    torch.manual_seed(0)
    model = MipNeRF(ModelArgs()).cuda()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))  # a non-trivial density everywhere
    rays = make_rays((24, 32), 'cuda')
    ref = model.render_image(rays)
    set_precision(model, 'bf16')
    assert fused_mlp.problem(torch.device('cuda')) is None  # (its probe runs the kernels once)
    calls = []
    forward = fused_mlp.forward
    monkeypatch.setattr(fused_mlp, 'forward', lambda *a: calls.append(1) or forward(*a))

    def step():  # the same stratified samples each time
        torch.manual_seed(1)
        model.zero_grad()
        loss = sum(((o[0] - 0.5) ** 2).mean() for o in model.train()(ray_utils.namedtuple_map(lambda r: r[0], rays)))
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    fast, fast_grads = model.render_image(rays), step()
    assert len(calls) == 4  # coarse and fine, rendering then training
    monkeypatch.setattr(fused_mlp, 'usable', lambda *a: False)
    plain, plain_grads = model.render_image(rays), step()
    for f, p, r in zip(fast, plain, ref):
        assert (f - r).abs().max() <= 2 * (p - r).abs().max() + 1e-3
    for f, p in zip(fast_grads, plain_grads):
        assert (f - p).norm() <= 0.05 * p.norm() + 1e-6


@hopper
def test_kernels_see_every_optimizer_step():
    """The fused Adam step updates the weights in place (without bumping their versions): repacked each call.

    (On an H100 the outputs grew from about 2 to 18 and 2,736 over two such steps; the kernel stayed
    within a bf16 step of `emulate`, which stale weights would not.)"""
    mlp = default_mlp('cuda')
    opt = torch.optim.Adam(mlp.parameters(), lr=1e-2, fused=True)
    x, cond, d_rgb, d_density = inputs(3, 128, 'cuda')
    for _ in range(2):
        opt.zero_grad()
        torch.autograd.backward(fused_mlp.forward(mlp, x, cond), (d_rgb, d_density))
        opt.step()
        with torch.no_grad():
            got, want = fused_mlp.forward(mlp, x, cond), fused_mlp.emulate(mlp, x, cond)
        assert all((a - b).abs().max() <= 2**-6 * b.abs().max() for a, b in zip(got, want))


@hopper
def test_the_probe_passes_when_first_asked_while_rendering(monkeypatch):
    """eval.py and visualize.py first ask inside the renderer's no_grad; the probe takes a gradient all the same."""
    monkeypatch.setattr(fused_mlp, '_device_problem', fused_mlp._device_problem.__wrapped__)
    with torch.no_grad():
        assert fused_mlp.problem(torch.device('cuda')) is None


@hopper
def test_the_probe_leaves_the_callers_random_streams_alone(monkeypatch):
    """The probe runs during the first training step: it must not move the sampling's random streams."""
    monkeypatch.setattr(fused_mlp, '_device_problem', fused_mlp._device_problem.__wrapped__)
    cpu, cuda = torch.get_rng_state(), torch.cuda.get_rng_state()
    assert fused_mlp.problem(torch.device('cuda')) is None
    assert torch.equal(cpu, torch.get_rng_state()) and torch.equal(cuda, torch.cuda.get_rng_state())
