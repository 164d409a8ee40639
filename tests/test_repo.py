"""The README's quickstart is what CI runs."""

import os
import re

from conftest import REPO


def quickstart_commands():
    readme = open(os.path.join(REPO, 'README.md')).read()
    section = readme.split('## Quickstart', 1)[1].split('\n## ', 1)[0]
    return re.findall(r'```bash\n(.*?)\n```', section, flags=re.S)


def test_quickstart_is_two_commands_and_ci_runs_the_test_one():
    commands = quickstart_commands()
    assert len(commands) == 2 and all('\n' not in c for c in commands)
    demo, tests = commands
    assert 'configs/demo.txt' in demo and 'pytest' in tests
    ci = open(os.path.join(REPO, '.ci', 'run')).read()
    assert tests in ci.splitlines()
