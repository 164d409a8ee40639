"""Command-line helpers shared by the entry scripts (train.py, eval.py, visualize.py, extract_mesh.py).

Nothing here imports torch, so a script can parse and check its flags, and
answer `--help`, before the heavy modules load.

- `Parser`: argparse with one-line errors and no abbreviated flags; `fail`
  prints such a line and exits 2. Argument types: `str2bool`,
  `positive_int`, `positive_float`, `finite_float`.
- `prepare_out_dir`: make an output folder and check it is writable,
  remembering what was made so that a refusal leaves nothing behind
  (`remove_empty_dirs`).
- `atomic_output`: every file or folder a script writes goes through it (a
  temporary sibling, checked, then renamed into place).
- `stop_on_signals`: the one SIGINT/SIGTERM handler of all four scripts.
- `exception_line`: an exception as one line (its type and first line), for "cannot run here" reasons.
"""

import argparse
import contextlib
import fcntl
import math
import os
import shutil
import signal
import socket
import sys
import threading
import time

import configargparse


def fail(prog, message):
    """Exit with status 2 and one line, `prog: error: message`, as the parsers do."""
    sys.stderr.write(f'{prog}: error: {message}\n')
    sys.exit(2)


class HelpFormatter(configargparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None ones (per-dataset or 'the run's', which the help text says);
    numbers show as N (integers) and X (reals), so that each flag fits on its line."""

    def __init__(self, prog, **kwargs):
        kwargs.setdefault('max_help_position', 30)
        super().__init__(prog, **kwargs)

    def _get_default_metavar_for_optional(self, action):
        return {int: 'N', float: 'X'}.get(action.type, super()._get_default_metavar_for_optional(action))

    def _get_help_string(self, action):
        if action.default is None or action.default is configargparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


class Parser(configargparse.ArgumentParser):
    """One-line errors; no abbreviated flags (a typo in a config file must not set another flag)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault('allow_abbrev', False)
        kwargs.setdefault('add_config_file_help', False)
        kwargs.setdefault('add_env_var_help', False)
        kwargs.setdefault('formatter_class', HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        """One line, no usage block, exit status 2."""
        self.exit(2, f'{self.prog}: error: {message} (see --help)\n')


# ----------------------------------------------------------------------------
# Argument types.


def exception_line(e, limit=300):
    """`Type: first non-empty line of the message`, at most `limit` characters."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f'{type(e).__name__}: {lines[0] if lines else "no message"}'[:limit]


def str2bool(v):
    if isinstance(v, bool):
        return v
    if v.lower() in ('1', 'true', 'yes', 'on'):
        return True
    if v.lower() in ('0', 'false', 'no', 'off'):
        return False
    raise argparse.ArgumentTypeError(f'expected true or false, got {v!r}')


def positive_int(v):
    n = int(v)
    if n <= 0:
        raise argparse.ArgumentTypeError(f'must be positive, got {n}')
    return n


def positive_float(v):
    """A finite number > 0."""
    x = float(v)
    if not (math.isfinite(x) and x > 0):
        raise argparse.ArgumentTypeError(f'must be a positive number, got {v}')
    return x


def finite_float(v):
    x = float(v)
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f'must be a finite number, got {v}')
    return x


def add_bool(group, name, default, help):
    """`--name` (true), `--name true|false`."""
    group.add_argument(name, type=str2bool, nargs='?', const=True, default=default, metavar='BOOL', help=help)


# ----------------------------------------------------------------------------
# Output folders and files: made early, removed again when nothing was written.


def make_dirs(path):
    """os.makedirs(path, exist_ok=True); returns the folders it made, deepest first (also when it fails)."""
    made, d = [], os.path.abspath(path)
    while not os.path.lexists(d):
        made.append(d)
        d = os.path.dirname(d)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        remove_empty_dirs(made)
        raise
    return made


def remove_empty_dirs(folders):
    """Remove those of `folders` (deepest first) that exist and are empty."""
    for d in folders:
        try:
            if os.path.isdir(d):
                os.rmdir(d)
        except OSError:
            return


def remove_files(paths, prog):
    """Remove those of `paths` that exist; say so (prefixed by `prog`) when one cannot be."""
    for path in paths:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            sys.stderr.write(f'{prog}: could not remove {path}: {e.strerror}\n')


def prepare_out_dir(out_dir, probe, flag, hint, value=None):
    """Make `out_dir` and check that the file `probe` can be written there; returns the folders made.

    Raises ValueError with a one-line message naming `flag` (and its `value`,
    `out_dir` by default) and ending in `hint` when it cannot be.
    """
    made = []
    try:
        made = make_dirs(out_dir)
        with open(probe, 'wb'):
            pass
        os.remove(probe)
    except OSError as e:
        remove_empty_dirs(made)
        raise ValueError(f'{flag} {value or out_dir}: cannot write there ({e.strerror or e}); {hint}') from None
    return made


def partial_path(path):
    """`a/b.ext` -> `a/b.partial.ext` (`a/b` -> `a/b.partial`): where `atomic_output` writes first."""
    stem, ext = os.path.splitext(path.rstrip('/'))
    return f'{stem}.partial{ext}'


def fsync_dir(folder):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path, folder=False, check=None):
    """Write `path` through a temporary sibling that is renamed into place only when complete.

    Yields the temporary path (`partial_path(path)`; a fresh empty folder with
    `folder=True`), which the block writes. When the block returns, the
    output must exist (a file must not be empty) and pass `check(tmp)`, if
    given (which raises OSError when the output is incomplete); it is then
    flushed to disk and renamed over `path`, replacing an earlier one. When
    the block raises, or the output is missing or incomplete, the temporary
    is removed, `path` is left as it was, and the exception (an OSError for
    a missing output) propagates.
    """
    tmp = partial_path(path)
    _remove(tmp)
    if folder:
        os.makedirs(tmp)
    try:
        yield tmp
        if not os.path.exists(tmp) or (not folder and os.path.getsize(tmp) == 0):
            raise OSError(f'{path} was not written')
        if check is not None:
            check(tmp)
        if not folder:
            with open(tmp, 'rb+') as f:
                os.fsync(f.fileno())
        elif os.path.isdir(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def append_line(path, line):
    """Append one line to a text file through `atomic_output`: the file is whole before and after,
    never half a line (a full disk leaves it as it was and raises OSError)."""
    old = ''
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
    with atomic_output(path) as tmp, open(tmp, 'w') as f:
        f.write(old + line.rstrip('\n') + '\n')


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


# ----------------------------------------------------------------------------
# One writer at a time.


class Busy(Exception):
    """Another live process holds the lock; the message names it."""


class Lock:
    """An exclusive lock on `path` (a small file), held from `acquire` to `release`.

    The file holds the holder's pid, host, command and start time, which a
    refused process names. The lock is an advisory `flock`, which the kernel
    drops when its process dies: a lock file left by a killed process is
    taken over. `release` removes the file.
    """

    def __init__(self, path):
        self.path, self.fd = path, None

    def acquire(self):
        """Take the lock or raise Busy; OSError when the file cannot be made."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise Busy(f'in use by {self.holder()}') from None
            try:  # the file may have been released and removed between our open and our flock
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        info = f'pid {os.getpid()} on {socket.gethostname()} ({" ".join(sys.argv)[:200]}), since {time.ctime()}'
        try:  # who holds it, for the refusal's message; the lock holds even when a full disk keeps this out
            os.ftruncate(fd, 0)
            os.write(fd, info.encode())
        except OSError:
            pass
        self.fd = fd
        return self

    def holder(self):
        try:
            with open(self.path) as f:
                return f.read().strip() or 'another process'
        except OSError:
            return 'another process'

    def release(self):
        if self.fd is not None:
            try:
                os.remove(self.path)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def lock_path(path):
    """The lock file of an output (a file or a folder): `<path>.lock` beside it."""
    return path.rstrip('/') + '.lock'


# ----------------------------------------------------------------------------
# Signals.

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Stopped(BaseException):
    """SIGINT or SIGTERM arrived (a BaseException, like KeyboardInterrupt, so that nothing swallows it)."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self):
        return signal.Signals(self.signum).name

    @property
    def exit_code(self):
        """130 for Ctrl-C, 143 for SIGTERM."""
        return EXIT_CODES[self.signum]


class SignalState:
    """What `stop_on_signals` saw: `signum` of the first SIGINT or SIGTERM, or None; `defer` tells
    whether a first signal is only recorded (True) or raises `Stopped` at once (False)."""

    def __init__(self, defer):
        self.signum, self.defer = None, defer

    def stopped(self):
        return Stopped(self.signum or signal.SIGTERM)

    @contextlib.contextmanager
    def at_once(self):
        """Inside, a signal raises `Stopped` at once even when deferred (long renders in training);
        one that arrived before raises on entry."""
        if self.signum is not None:
            raise self.stopped()
        defer, self.defer = self.defer, False
        try:
            yield
        finally:
            self.defer = defer


@contextlib.contextmanager
def stop_on_signals(defer=False, prog=None, note='nothing written'):
    """Inside, SIGINT and SIGTERM stop the work; yields a `SignalState`.

    With `defer=False` the first signal raises `Stopped` at once, and further
    ones are ignored while cleanup runs. With `defer=True` (training, which
    finishes its step and saves) the first signal is only recorded in the
    state for the caller to poll (outside `state.at_once()`); a second Ctrl-C
    raises `Stopped` at once. With `prog`, a `Stopped` leaving the block
    becomes one line, `prog: stopped by SIGTERM; note`, and exit status 130
    or 143. Outside the main thread (signals cannot be caught there) it
    only yields.
    """
    state = SignalState(defer)
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def handler(signum, frame):
        first = state.signum is None
        if first:
            state.signum = signum
        if (first and not state.defer) or (not first and state.defer and signum == signal.SIGINT):
            raise Stopped(signum)

    previous = {s: signal.signal(s, handler) for s in EXIT_CODES}
    try:
        yield state
    except Stopped as e:
        if prog is None:
            raise
        sys.stderr.write(f'{prog}: stopped by {e.name}; {note}\n')
        sys.exit(e.exit_code)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
