"""Evaluate a trained run on its test split: images and PSNR / SSIM (/ LPIPS).

    python eval.py --log_dir log/lego
    python eval.py --log_dir log/lego --ckpt log/lego/ckpt_0500000.pt --split val

Renders every image of the split deterministically, writes color_NNN.png,
depth_NNN.png and acc_NNN.png, and metrics.json with per-image and mean
metrics, into <log_dir>/eval_<split>_<step>/ (renamed into place when
complete), and prints a table. For Multicam scenes the table has one column
per scale, in the layout of the paper's multiscale table. LPIPS needs the
`lpips` package and its weights; without them a one-line note says so.
"""

import math
import os
import re

import cli
import config

PROG = 'eval.py'
SCALE_NAMES = ['Full Res.', '1/2 Res.', '1/4 Res.', '1/8 Res.']


def image_metrics(rgb, target, lpips_fn=None):
    """PSNR, SSIM, MSE (and LPIPS) of one rendered image against its target."""
    from loss import mse_to_psnr, ssim

    mse = float(((rgb - target) ** 2).mean())
    out = {'psnr': mse_to_psnr(mse) if mse > 0 else math.inf, 'ssim': ssim(rgb, target), 'mse': mse}
    if lpips_fn is not None and lpips_fn.available:
        out['lpips'] = lpips_fn(rgb, target)
    return out


def summarize(rows):
    """Mean of each metric over rows; PSNR as the mean of per-image PSNRs (as the paper)."""
    keys = [k for k in ('psnr', 'ssim', 'lpips', 'mse') if all(k in r for r in rows)]
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in keys}
    if 'lpips' in mean:
        from loss import average_error

        mean['avg_error'] = average_error(mean['psnr'], mean['ssim'], mean['lpips'])
    return mean


def format_table(metrics):
    """A markdown table: per image and mean, or per scale for Multicam."""
    has_lpips = 'lpips' in metrics['mean']
    if 'per_scale' in metrics:
        scales = sorted(metrics['per_scale'], key=int)
        cols = [(m, s) for m in ('psnr', 'ssim') + (('lpips',) if has_lpips else ()) for s in scales]
        head = ' | '.join(f'{m.upper()} {SCALE_NAMES[int(s)] if int(s) < 4 else s}' for m, s in cols)
        vals = ' | '.join(f'{metrics["per_scale"][s][m]:.{2 if m == "psnr" else 3}f}' for m, s in cols)
        if has_lpips:
            head += ' | Avg. error'
            vals += f' | {metrics["mean"]["avg_error"]:.4f}'
        return f'| {head} |\n|{"---|" * (len(cols) + has_lpips)}\n| {vals} |'
    lines = [
        '| image | PSNR | SSIM |' + (' LPIPS |' if has_lpips else ''),
        '|---|---|---|' + ('---|' if has_lpips else ''),
    ]
    for r in metrics['images'] + [dict(metrics['mean'], index='mean')]:
        lines.append(
            f'| {r["index"]} | {r["psnr"]:.2f} | {r["ssim"]:.4f} |' + (f' {r["lpips"]:.4f} |' if has_lpips else '')
        )
    return '\n'.join(lines)


def build_parser():
    p = config.run_parser('Evaluate a trained mip-NeRF on its test split.')
    p.add_argument('--split', default='test', help='split to evaluate')
    p.add_argument('--out_dir', default=None, help='output folder (default: <log_dir>/eval_<split>_<step>)')
    return p


def fail(message):
    cli.fail(PROG, message)


EVAL_FILE = re.compile(r'((color|acc|depth)_\d{3,}\.png|metrics\.json)$')


def check_out_dir(out_dir):
    """Refuse a folder that holds anything but an earlier evaluation (which is replaced when the
    new one is complete)."""
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            fail(f'--out_dir {out_dir} is a file: pass a folder')
        others = sorted(f for f in os.listdir(out_dir) if not EVAL_FILE.match(f))
        if others:
            fail(
                f'--out_dir {out_dir} holds other files ({", ".join(others[:3])}{", ..." if len(others) > 3 else ""}), '
                'which an evaluation would replace: pass a new or empty folder'
            )


def main(argv=None):
    args = build_parser().parse_args(argv)
    import ddp
    import runs

    made, lock = [], None
    try:
        with cli.stop_on_signals(prog=PROG):  # Ctrl-C and SIGTERM: clean up, one line, exit 130 or 143
            try:
                model, cfg, ckpt, device, data = runs.open_run(args, args.split)
            except (FileNotFoundError, ValueError) as e:
                fail(e)
            args.out_dir = args.out_dir or os.path.join(args.log_dir, f'eval_{args.split}_{ckpt["step"]:07d}')
            if ddp.is_main():
                check_out_dir(args.out_dir)
            try:
                made, lock = runs.prepare_out_dir(
                    device,
                    os.path.dirname(os.path.abspath(args.out_dir)),
                    args.out_dir,
                    '--out_dir',
                    'pass a writable folder',
                    value=args.out_dir,
                )
            except ValueError as e:
                fail(e)
            run(args, model, data, ckpt, device)
    finally:
        if lock is not None:
            lock.release()
        cli.remove_empty_dirs(made)  # a folder made here stays only if it holds the evaluation
        ddp.cleanup()


def run(args, model, data, ckpt, device):
    """Render this rank's share of the split (images rank, rank + N, ...) and, on rank 0, write
    everything into --out_dir through `cli.atomic_output` (a .partial folder, then a rename)."""
    import json

    from tqdm import tqdm

    import ddp
    import vis
    from loss import LPIPS

    main, step = ddp.is_main(), ckpt['step']
    lpips_fn = LPIPS(device)
    if main and not lpips_fn.available:
        print(lpips_fn.note)
    mine = []
    for i in tqdm(
        range(ddp.rank(), len(data), ddp.world_size()),
        desc=f'eval {args.split}',
        dynamic_ncols=True,
        disable=None if main else True,
    ):
        rgb, distance, acc = model.render_image(data.rays_of_image(i), args.chunk)
        target = data.images[i].to(rgb.device)
        row = {'index': i, 'label': int(data.labels[i]), **image_metrics(rgb, target, lpips_fn)}
        pngs = {
            'color': vis.encode_png(vis.to_uint8(rgb)),
            'acc': vis.encode_png(vis.to_uint8(acc)),
            'depth': vis.encode_png(vis.colorize_depth(distance, float(data.near[i]), float(data.far[i]), acc)),
        }
        mine.append((row, pngs))
    gathered = ddp.gather(mine)
    if not main:
        return
    results = sorted((r for part in gathered for r in part), key=lambda r: r[0]['index'])
    rows = [row for row, _ in results]
    metrics = {'step': step, 'split': args.split, 'checkpoint': ckpt['path'], 'images': rows, 'mean': summarize(rows)}
    if not lpips_fn.available:
        metrics['lpips_note'] = lpips_fn.note
    labels = sorted({r['label'] for r in rows})
    if len(labels) > 1:
        metrics['per_scale'] = {str(s): summarize([r for r in rows if r['label'] == s]) for s in labels}
    try:
        with cli.atomic_output(args.out_dir, folder=True) as tmp:
            for row, pngs in results:
                for kind, data_bytes in pngs.items():
                    with open(os.path.join(tmp, f'{kind}_{row["index"]:03d}.png'), 'wb') as f:
                        f.write(data_bytes)
            with open(os.path.join(tmp, 'metrics.json'), 'w') as f:
                json.dump(metrics, f, indent=1)
    except OSError as e:
        fail(
            f'--out_dir {args.out_dir}: writing the evaluation failed ({e.strerror or e}): pass a writable '
            'folder with free space'
        )
    print(format_table(metrics))
    m = metrics['mean']
    print(
        f'{args.split} at step {step}: PSNR {m["psnr"]:.2f} dB, SSIM {m["ssim"]:.4f}'
        + (f', LPIPS {m["lpips"]:.4f}' if 'lpips' in m else '')
        + f' over {len(rows)} images; wrote {args.out_dir}'
    )


if __name__ == '__main__':
    main()
