"""Faulty scene data is refused with one truthful line naming the file and the fix.

Blender faults use a copy of the generated demo scene, LLFF faults a copy (links and a rewritten
poses_bounds.npy) of the real fern, Multicam faults a small metadata.json over the demo's images.
"""

import json
import math
import os
import re
import shutil

import cv2
import numpy as np
import pytest

import datasets
import ray_utils
import train
from conftest import FERN, TINY_NET, needs_fern


def refused(match, fn, *args, **kwargs):
    """The DataError of fn(*args, **kwargs): it must match `match` (a regex) and be one line."""
    with pytest.raises(datasets.DataError, match=match) as e:
        fn(*args, **kwargs)
    msg = str(e.value)
    assert '\n' not in msg and msg == msg.strip(), msg
    return msg


def edit_meta(scene, split, fn):
    path = scene / f'transforms_{split}.json'
    meta = json.loads(path.read_text())
    fn(meta)
    path.write_text(json.dumps(meta))  # NaN and inf are written as JSON's NaN and Infinity


# ----------------------------------------------------------------------------
# 1. Blender cameras.


def _set(i, j, v):
    def fn(m):
        m['frames'][2]['transform_matrix'][i][j] = v

    return fn


def _zero_rotation(m):
    for row in m['frames'][2]['transform_matrix'][:3]:
        row[:3] = [0.0, 0.0, 0.0]


def _singular_rotation(m):  # the third axis a copy of the first
    for row in m['frames'][2]['transform_matrix'][:3]:
        row[2] = row[0]


def _mirrored(m):  # one axis negated: det R = -1
    for row in m['frames'][2]['transform_matrix'][:3]:
        row[0] = -row[0]


@pytest.mark.parametrize(
    'edit,phrase',
    [
        (_set(0, 0, float('nan')), 'has NaN or inf in its transform_matrix: fix the frame or re-download the scene'),
        (_set(1, 3, float('inf')), 'has NaN or inf in its transform_matrix'),
        (_set(3, 3, float('-inf')), 'has NaN or inf in its transform_matrix'),
        (_zero_rotation, 'has a degenerate rotation: the 3x3 rotation of its transform_matrix has determinant 0'),
        (_singular_rotation, 'has a degenerate rotation'),
        (_mirrored, 'is a mirrored camera: the 3x3 rotation of its transform_matrix has determinant -1 < 0'),
    ],
    ids=['nan', 'inf', 'inf-bottom-row', 'zero-rotation', 'singular-rotation', 'mirrored'],
)
def test_blender_bad_transform_matrix_names_the_frame(scene, edit, phrase):
    edit_meta(scene, 'train', edit)
    msg = refused(
        re.escape(f'transforms_train.json: frame 2 (./train/r_2) {phrase}'),
        datasets.get_dataset,
        'demo',
        str(scene),
        'train',
    )
    assert msg.startswith(str(scene / 'transforms_train.json'))
    datasets.get_dataset('demo', str(scene), 'test')  # the other splits still load


@pytest.mark.parametrize('angle', [float('nan'), 0.0, -0.69, math.pi, 4.0, float('inf')])
def test_blender_bad_camera_angle_x(scene, angle):
    edit_meta(scene, 'val', lambda m: m.update(camera_angle_x=angle))
    refused(
        re.escape(f'transforms_val.json: camera_angle_x is {float(angle)}, but it must be the horizontal field of view')
        + '.*between 0 and pi',
        datasets.get_dataset,
        'demo',
        str(scene),
        'val',
    )


@pytest.mark.parametrize('value', [7, None, ['./train/r_1'], {'path': 'r_1'}, True])
def test_blender_file_path_that_is_not_a_string(scene, value):
    def fn(m):
        m['frames'][1]['file_path'] = value

    edit_meta(scene, 'train', fn)
    refused(
        re.escape(f'transforms_train.json: frame 1 has file_path {value!r}, not a string: set it to the image path'),
        datasets.get_dataset,
        'demo',
        str(scene),
        'train',
    )


def test_train_py_prints_one_line_and_writes_nothing(scene, tmp_path, capsys):
    edit_meta(scene, 'train', _mirrored)
    log = tmp_path / 'run'
    with pytest.raises(SystemExit) as e:
        train.main(
            ['--dataset_name', 'demo', '--base_dir', str(scene), '--log_dir', str(log), '--device', 'cpu']
            + ['--max_steps', '1', '--eval_every', '0', '--render_every', '0', *TINY_NET]  # short, should it train
        )
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert err[0].startswith('train.py: error: ') and 'frame 2 (./train/r_2) is a mirrored camera' in err[0]
    assert not log.exists()


# ----------------------------------------------------------------------------
# 2. LLFF poses_bounds.npy (the real fern's, altered in a copy).


@pytest.fixture
def fern(tmp_path):
    """tmp_path/fern: images_4 and images_8 linked to the real fern, a copy of poses_bounds.npy."""
    if not os.path.isdir(FERN):
        pytest.skip(f'real fern scene not found at {os.path.normpath(FERN)}')
    dst = tmp_path / 'fern'
    dst.mkdir()
    for d in ('images_4', 'images_8'):
        os.symlink(os.path.join(FERN, d), dst / d)
    shutil.copy(os.path.join(FERN, 'poses_bounds.npy'), dst / 'poses_bounds.npy')
    return dst


def _poses_bounds(fern, edit):
    arr = np.load(fern / 'poses_bounds.npy')
    edit(arr)
    np.save(fern / 'poses_bounds.npy', arr)


def test_llff_unreadable_poses_bounds(fern):
    path = fern / 'poses_bounds.npy'
    data = path.read_bytes()
    path.write_bytes(b'')
    refused(re.escape(f'{path} is empty (0 bytes): re-download the scene'), datasets.load_llff_poses, str(fern), 8)
    for bad in (data[:100], data[: len(data) // 2], b'not a numpy file at all'):
        path.write_bytes(bad)
        refused(
            re.escape(f'{path} is not a numpy array (') + '.*' + re.escape('): re-download the scene'),
            datasets.load_llff_poses,
            str(fern),
            8,
        )


def _nan(a):
    a[3, 7] = np.nan


def _inf_bound(a):
    a[4, 16] = np.inf


def _zero_near(a):
    a[5, 15] = 0.0


def _negative_far(a):
    a[6, 16] = -1.0


def _zero_focal(a):
    a[2, 14] = 0.0


def _negative_focal(a):
    a[9, 14] = -a[9, 14]


def _zero_pose_rotation(a):  # columns 0-2 of the 3x5 pose
    a[7, [0, 1, 2, 5, 6, 7, 10, 11, 12]] = 0.0


def _mirrored_pose(a):
    a[11, [0, 5, 10]] *= -1


@needs_fern
@pytest.mark.parametrize(
    'edit,phrase',
    [
        (_nan, 'image 3 (image003.png) has NaN or inf in its row (its pose or bounds)'),
        (_inf_bound, 'image 4 (image004.png) has NaN or inf in its row'),
        (_zero_near, 'image 5 (image005.png) has non-positive depth bounds (0, '),
        (_negative_far, 'image 6 (image006.png) has non-positive depth bounds ('),
        (_zero_focal, 'image 2 (image002.png) has focal length 0 (poses[:, 2, 4]); it must be positive'),
        (_negative_focal, 'image 9 (image009.png) has focal length -3260.53 (poses[:, 2, 4]); it must be positive'),
        (_zero_pose_rotation, 'image 7 (image007.png) has a degenerate rotation: the 3x3 rotation of its pose'),
        (_mirrored_pose, 'image 11 (image011.png) is a mirrored camera: the 3x3 rotation of its pose has determinant'),
    ],
    ids=['nan', 'inf', 'zero-near', 'negative-far', 'zero-focal', 'negative-focal', 'zero-rotation', 'mirrored'],
)
def test_llff_bad_poses_bounds_name_the_image(fern, edit, phrase):
    _poses_bounds(fern, edit)
    path = fern / 'poses_bounds.npy'
    msg = refused(re.escape(f'{path}: {phrase}'), datasets.get_dataset, 'llff', str(fern), 'train', factor=8)
    assert msg.endswith('re-download the scene')
    # Called alone (no image names), it names the index.
    bare = re.sub(r' \(image\d+\.png\)', '', phrase)
    refused(re.escape(f'{path}: {bare}'), datasets.load_llff_poses, str(fern), 8)


@needs_fern
def test_llff_full_resolution_missing_names_the_factors_there_are(fern):
    msg = refused(
        re.escape(f'{fern / "images"} is missing (--factor 0 reads the full-resolution images); ')
        + re.escape('fern has images_4, images_8: pass --factor 4 or --factor 8'),
        datasets.get_dataset,
        'llff',
        str(fern),
        'train',
        factor=0,
    )
    assert 'there is no' not in msg
    refused(
        'fern has images_4, images_8: pass --factor 4 or --factor 8',
        datasets.get_dataset,
        'llff',
        str(fern),
        'test',
        factor=1,
    )
    os.remove(fern / 'images_4')
    refused('fern has images_8: pass --factor 8$', datasets.get_dataset, 'llff', str(fern), 'train', factor=0)
    os.remove(fern / 'images_8')
    refused(
        re.escape(f'{fern / "images"} is missing (--factor 0 reads the full-resolution images): re-download the scene'),
        datasets.get_dataset,
        'llff',
        str(fern),
        'train',
        factor=0,
    )
    # factor > 1 with neither images_N nor images/: the message of before.
    refused(
        re.escape(f'{fern / "images_2"} is missing and there is no {fern / "images"} to make it from'),
        datasets.get_dataset,
        'llff',
        str(fern),
        'train',
        factor=2,
    )


# ----------------------------------------------------------------------------
# 3. Multicam: a metadata.json over the demo's images.


def _multicam(scene):
    meta = json.loads((scene / 'transforms_train.json').read_text())
    frames = meta['frames'][:4]
    focal = 0.5 * 32 / math.tan(0.5 * meta['camera_angle_x'])
    m = {
        'file_path': [f['file_path'][2:] + '.png' for f in frames],
        'cam2world': [f['transform_matrix'] for f in frames],
        'pix2cam': [ray_utils.pinhole_pix2cam(focal, 32, 32).tolist()] * len(frames),
        'width': [32] * len(frames),
        'height': [32] * len(frames),
        'lossmult': [1.0] * len(frames),
        'near': [2.0] * len(frames),
        'far': [6.0] * len(frames),
        'label': [0] * len(frames),
    }
    return {'train': m}


def _c2w_nan(m):
    m['cam2world'][1][0][2] = float('nan')


def _c2w_inf(m):
    m['cam2world'][1][2][3] = float('inf')


def _c2w_mirrored(m):
    for row in m['cam2world'][1][:3]:
        row[1] = -row[1]


def _pix2cam_nan(m):
    m['pix2cam'][1] = [[float('nan'), 0, 0], [0, -1, 0], [0, 0, -1]]


def _pix2cam_inf(m):
    m['pix2cam'][1] = [[0.1, 0, float('-inf')], [0, -0.1, 1.6], [0, 0, -1]]


def _focal_zero(m):
    m['pix2cam'][1] = [[0.0, 0, -1.6], [0, -0.1, 1.6], [0, 0, -1]]


def _focal_negative(m):
    m['pix2cam'][1] = [[-0.25, 0, 4.0], [0, -0.25, 4.0], [0, 0, -1]]


@pytest.mark.parametrize(
    'edit,phrase',
    [
        (_c2w_nan, 'has NaN or inf in its cam2world'),
        (_c2w_inf, 'has NaN or inf in its cam2world'),
        (_c2w_mirrored, 'is a mirrored camera: the 3x3 rotation of its cam2world'),
        (_pix2cam_nan, 'has NaN or inf in its pix2cam'),
        (_pix2cam_inf, 'has NaN or inf in its pix2cam'),
        (_focal_zero, 'has a non-positive focal length: pix2cam[0][0] is 0 '),
        (_focal_negative, 'has a non-positive focal length: pix2cam[0][0] is -0.25 '),
    ],
    ids=['c2w-nan', 'c2w-inf', 'c2w-mirrored', 'pix2cam-nan', 'pix2cam-inf', 'focal-zero', 'focal-negative'],
)
def test_multicam_bad_cameras_name_the_image(scene, edit, phrase):
    meta = _multicam(scene)
    (scene / 'metadata.json').write_text(json.dumps(meta))
    data = datasets.get_dataset('multicam', str(scene), 'train')  # the good one loads
    assert len(data) == 4 and data.sizes[0] == (32, 32)
    edit(meta['train'])
    (scene / 'metadata.json').write_text(json.dumps(meta))
    msg = refused(
        re.escape(f"metadata.json: image 1 (train/r_1.png) of split 'train' {phrase}"),
        datasets.get_dataset,
        'multicam',
        str(scene),
        'train',
    )
    assert msg.endswith('re-run scripts/convert_blender_data.py')


# ----------------------------------------------------------------------------
# 4. Truthful messages.


def _folder(p):
    os.remove(p)
    os.mkdir(p)


def _dangling(p):
    os.remove(p)
    os.symlink(p.parent / 'nowhere.png', p)


def _loop(p):
    os.remove(p)
    os.symlink(p.parent / 'r_3_b.png', p)
    os.symlink(p, p.parent / 'r_3_b.png')


def _self_loop(p):
    os.remove(p)
    os.symlink(p.name, p)


@pytest.mark.parametrize(
    'make,phrase',
    [
        (os.remove, 'is missing: re-download or regenerate the scene'),
        (_folder, 'is a folder, not an image: replace it with an image, or re-download or regenerate the scene'),
        (_dangling, 'is a broken symbolic link (to '),
        (_loop, 'is a symbolic-link loop: replace the link with the real image, or re-download'),
        (_self_loop, 'is a symbolic-link loop: '),
    ],
    ids=['missing', 'folder', 'dangling-link', 'link-loop', 'self-loop'],
)
def test_image_path_faults_say_what_the_path_is(scene, make, phrase):
    path = scene / 'train' / 'r_3.png'
    make(path)
    named = os.path.join(str(scene), './train/r_3.png')  # as the json spells it
    msg = refused(re.escape(f'image {named} {phrase}'), datasets.get_dataset, 'demo', str(scene), 'train')
    assert ('is missing' in msg) == (make is os.remove)
    if make is _dangling:
        assert msg.endswith(
            f'(to {path.parent / "nowhere.png"}): restore its target, or re-download or regenerate the scene'
        )


def test_missing_split_lists_only_readable_transforms(scene):
    os.remove(scene / 'transforms_test.json')
    os.remove(scene / 'transforms_val.json')
    os.symlink(scene / 'gone.json', scene / 'transforms_val.json')  # a dangling link
    (scene / 'transforms_extra.json').mkdir()  # a folder
    os.symlink('transforms_loop.json', scene / 'transforms_loop.json')  # a loop
    refused(
        re.escape(f'{scene / "transforms_test.json"} is missing; the scene has the splits train: re-download it'),
        datasets.get_dataset,
        'demo',
        str(scene),
        'test',
    )
    # The split asked for is itself not a file: that is said, not 'is missing'.
    refused(
        re.escape(f'{scene / "transforms_val.json"} is a broken symbolic link (to {scene / "gone.json"}); ')
        + re.escape('the scene has the splits train: restore its target, or re-download the scene'),
        datasets.get_dataset,
        'demo',
        str(scene),
        'val',
    )
    refused(
        re.escape(f'{scene / "transforms_extra.json"} is a folder, not a file; the scene has the splits train'),
        datasets.get_dataset,
        'demo',
        str(scene),
        'extra',
    )
    refused(
        re.escape(f'{scene / "transforms_loop.json"} is a symbolic-link loop; the scene has the splits train'),
        datasets.get_dataset,
        'demo',
        str(scene),
        'loop',
    )
    os.remove(scene / 'transforms_train.json')  # transforms_*.json entries remain, none a readable file
    refused(
        re.escape(f'{scene / "transforms_test.json"} is missing, and transforms_extra.json, transforms_loop.json, ')
        + re.escape('transforms_val.json are not a readable file: re-download the scene'),
        datasets.get_dataset,
        'demo',
        str(scene),
        'test',
    )
    os.rmdir(scene / 'transforms_extra.json')
    os.remove(scene / 'transforms_loop.json')
    os.remove(scene / 'transforms_val.json')
    refused('is not a Blender scene \\(no transforms_\\*.json\\)', datasets.get_dataset, 'demo', str(scene), 'test')


def test_images_without_alpha_get_one_note_per_split(scene, capsys):
    for i in (0, 5, 9):
        p = str(scene / 'train' / f'r_{i}.png')
        cv2.imwrite(p, cv2.imread(p, cv2.IMREAD_UNCHANGED)[..., :3])
    capsys.readouterr()
    data = datasets.get_dataset('demo', str(scene), 'train')
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f'note: 3 of 20 images in {scene / "train"} have no alpha channel: used as they are, '
        'the white background is not composited onto them'
    ]
    assert data.images.shape == (20, 32, 32, 3)
    datasets.get_dataset('demo', str(scene), 'test')  # every image has alpha: no note
    datasets.get_dataset('demo', str(scene), 'train', white_bkgd=False)  # no background composited: no note
    assert capsys.readouterr().out == ''
    p = str(scene / 'test' / 'r_1.png')
    cv2.imwrite(p, cv2.imread(p, cv2.IMREAD_UNCHANGED)[..., :3])
    datasets.get_dataset('demo', str(scene), 'test')
    assert capsys.readouterr().out.splitlines() == [
        f'note: 1 of 3 images in {scene / "test"} has no alpha channel: used as they are, '
        'the white background is not composited onto them'
    ]


def test_sizes_are_compared_before_downsampling(scene):
    p = os.path.join(str(scene), './test/r_1.png')
    big = cv2.resize(cv2.imread(p, cv2.IMREAD_UNCHANGED), (33, 33), interpolation=cv2.INTER_AREA)
    cv2.imwrite(p, big)
    for factor in (0, 2):  # at --factor 2 both become 16x16: still refused
        refused(
            re.escape(f'image {p} has size (33, 33), but {os.path.join(str(scene), "./test/r_0.png")} has (32, 32): ')
            + 'all images of a split must have the same size',
            datasets.get_dataset,
            'demo',
            str(scene),
            'test',
            factor=factor,
        )
    assert datasets.get_dataset('demo', str(scene), 'val', factor=2).images.shape == (2, 16, 16, 3)
