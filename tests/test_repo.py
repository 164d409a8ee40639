"""The repository's rules: the README's quickstart is what CI runs, and one room per job."""

import ast
import glob
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

ENTRY_SCRIPTS = {'train', 'eval', 'visualize', 'extract_mesh'}
PROJECT = {os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(REPO, '*.py'))} | {'scripts'}


def quickstart_commands():
    readme = open(os.path.join(REPO, 'README.md')).read()
    section = readme.split('## Quickstart', 1)[1].split('\n## ', 1)[0]
    return re.findall(r'```bash\n(.*?)\n```', section, flags=re.S)


def test_quickstart_is_two_commands_and_ci_runs_the_test_one():
    commands = quickstart_commands()
    assert len(commands) == 2 and all('\n' not in c for c in commands)
    demo, tests = commands
    assert 'configs/demo.txt' in demo and 'pytest' in tests
    assert os.path.isfile(os.path.join(REPO, 'configs', 'demo.txt'))
    ci = open(os.path.join(REPO, '.ci', 'run')).read()
    assert tests in ci.splitlines()


def imports(path):
    """The top-level names of the modules a file imports, anywhere in it (also inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names |= {a.name.split('.')[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split('.')[0])
    return names


def project_imports(path):
    """The project modules a file imports."""
    return imports(path) & PROJECT


def python_files():
    """The top-level modules and scripts/."""
    return glob.glob(os.path.join(REPO, '*.py')) + glob.glob(os.path.join(REPO, 'scripts', '*.py'))


def test_no_module_imports_an_entry_script():
    """Library modules never import an entry script; entry scripts never import each other."""
    files = python_files()
    assert len(files) > 15
    for path in files:
        me = os.path.splitext(os.path.basename(path))[0]
        bad = project_imports(path) & (ENTRY_SCRIPTS | {'scripts'}) - {me}
        assert not bad, f'{os.path.relpath(path, REPO)} imports {sorted(bad)}'


def test_only_the_capture_script_imports_pycolmap():
    """pycolmap is optional: training, rendering and every library module run without it."""
    users = {os.path.relpath(path, REPO) for path in python_files() if 'pycolmap' in imports(path)}
    assert users == {os.path.join('scripts', 'process_capture.py')}


def test_model_imports_nothing_of_the_project_but_ray_utils_and_its_kernel():
    assert project_imports(os.path.join(REPO, 'model.py')) == {'ray_utils', 'fused_mlp'}
    assert project_imports(os.path.join(REPO, 'fused_mlp.py')) == {'cli', 'model', 'fused_kernels'}  # the last 2 lazily
    assert project_imports(os.path.join(REPO, 'fused_kernels.py')) == {'fused_mlp'}


@pytest.mark.parametrize('script', sorted(ENTRY_SCRIPTS))
@pytest.mark.parametrize('flags', [['--help'], ['--no_such_flag'], ['--chunk', '0']])
def test_flags_answer_before_torch_loads(script, flags):
    """--help and a bad flag answer without importing torch (which takes seconds on a small CPU)."""
    code = (
        'import runpy, sys\n'
        f'sys.argv = [{script + ".py"!r}] + {flags!r}\n'
        'try:\n'
        f'    runpy.run_path({os.path.join(REPO, script + ".py")!r}, run_name="__main__")\n'
        'except SystemExit as e:\n'
        '    print("exit", e.code, "torch" in sys.modules)\n'
    )
    res = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=60, cwd=REPO)
    last = res.stdout.strip().splitlines()[-1]
    expected = 0 if flags == ['--help'] else 2
    assert last == f'exit {expected} False', (res.stdout[-500:], res.stderr[-500:])
    if expected:
        assert res.stderr.count('\n') == 1 and res.stderr.startswith(f'{script}.py: error: ')
