import json
import os
import signal
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), 'shared')
sys.path.insert(0, ROOT)

os.environ.setdefault('HF_HUB_OFFLINE', '1')  # tests never touch the network


def write_image_folder(root, train=8, val=3, classes=3, seed=0, varied_sizes=False, shape=(32, 32)):
    """A tiny ImageFolder (root/train/c<k>/*.png, root/val/...) whose classes differ in brightness; images of
    `shape` (height, width), or of one height per class with varied_sizes."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split, n in [('train', train), ('val', val)]:
        for c in range(classes):
            folder = os.path.join(root, split, f'c{c}')
            os.makedirs(folder)
            for i in range(n):
                size = (36 + 4 * c, 40, 3) if varied_sizes else (*shape, 3)
                pixels = (rng.random(size) * 80 + 60 * c).astype('uint8')
                Image.fromarray(pixels).save(os.path.join(folder, f'{i}.png'))
    return str(root)


def shared_path(*parts):
    """A file of ../shared, or skip the test with the reason when ../shared is absent; a failure instead with
    WS_REQUIRE_SHARED=1 (CI, which has ../shared beside the checkout: a moved folder must not skip silently)."""
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        message = f'needs {path} (the ../shared folder beside the checkout); absent here'
        if os.environ.get('WS_REQUIRE_SHARED') == '1':
            pytest.fail(message + ' and WS_REQUIRE_SHARED=1')
        pytest.skip(message)
    return path


def run_script(*args, cwd=ROOT, env=None, timeout=600):
    """Run one of the project's scripts in a fresh interpreter; returns the CompletedProcess."""
    full_env = dict(os.environ, PYTHONWARNINGS='ignore', **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def run_torchrun(*args, timeout=600, grace=60):
    """run_script('-m', 'torch.distributed.run', *args), except that past the timeout torchrun gets SIGTERM,
    which it passes on to its workers: they run in sessions of their own, which killing torchrun would leave
    running (holding a GPU for whatever runs next); `grace` seconds later, SIGKILL. Its output goes to files: a worker left holding a pipe
    cannot block the test."""
    with tempfile.TemporaryDirectory(prefix='torchrun_') as tmp:  # torchrun leaves a torchelastic_* folder in it
        with open(os.path.join(tmp, 'out'), 'w+') as out, open(os.path.join(tmp, 'err'), 'w+') as err:
            proc = subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', *args], cwd=ROOT, stdout=out,
                                    stderr=err, env=dict(os.environ, PYTHONWARNINGS='ignore', TMPDIR=tmp))
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _stop_torchrun(proc, grace)
                err.seek(0)
                raise AssertionError(f'torchrun ran past {timeout} s and was stopped: {err.read()[-2000:]}') from None
            except BaseException:  # pytest-timeout's or Ctrl-C's interruption: no worker may outlive the test
                _stop_torchrun(proc, grace)
                raise
            out.seek(0)
            err.seek(0)
            return subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())


def _stop_torchrun(proc, grace):
    """SIGTERM, which torchrun passes on to its workers; past `grace` seconds, or if interrupted meanwhile, SIGKILL to
    torchrun and to each worker (in sessions of their own, they would outlive it) that is still the process it
    was (its id is not reused by another since)."""
    workers = child_processes(proc.pid)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except BaseException as e:
        proc.kill()
        for pid, started in workers.items():
            if _stat(pid)[1] == started:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        proc.wait()
        if not isinstance(e, subprocess.TimeoutExpired):
            raise


def child_processes(pid):
    """{process id: its start time} of the processes whose parent is `pid` (Linux's /proc)."""
    kids = {}
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            parent, started = _stat(int(entry))
            if parent == pid:
                kids[int(entry)] = started
    return kids


def _stat(pid):
    """(parent's process id, start time in clock ticks since boot) of a process; (None, None) when it is gone."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            fields = f.read().rsplit(')', 1)[1].split()  # the fields after the command's name
        return int(fields[1]), int(fields[19])
    except (OSError, ValueError, IndexError):
        return None, None


def log_lines(folder, drop_timing=True):
    """A run's log.txt records, without the timing fields that differ between identical runs."""
    with open(os.path.join(folder, 'log.txt')) as f:
        lines = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if not (drop_timing and k in ('epoch_seconds', 'images_per_sec'))}
            for r in lines]


def final_weights(folder, epoch):
    import torch
    return torch.load(os.path.join(folder, f'checkpoint-{epoch}.pth'), weights_only=True)


def checkpoint_names(folder):
    return {f for f in os.listdir(folder) if f.startswith('checkpoint-')} if os.path.isdir(folder) else set()


def kill_after_checkpoint(args, folder, extra_seconds=0.0, timeout=120):
    """Start `python *args`, wait until it has written a checkpoint into `folder` that was not there before,
    then `extra_seconds` more, and SIGKILL it (no clean-up of any kind runs). True if it was still running
    to be killed, False if it had ended by itself; a run that failed by itself fails the test with its stderr."""
    import time
    before = checkpoint_names(folder)
    with tempfile.TemporaryFile() as stderr:
        child = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            deadline = time.time() + timeout
            while time.time() < deadline and child.poll() is None and checkpoint_names(folder) <= before:
                time.sleep(0.005)
            time.sleep(extra_seconds)
        finally:  # also when the test is interrupted (pytest-timeout): the run must not outlive it
            running = child.poll() is None
            if running:
                child.send_signal(signal.SIGKILL)
            child.wait()
        if not running and child.returncode != 0:
            stderr.seek(0)
            raise AssertionError(f'the run failed before it could be killed (exit status {child.returncode}): '
                                 + stderr.read().decode(errors='replace')[-2000:])
    return running


def free_port():
    """A TCP port nobody listens on now (torchrun's --master_port)."""
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def expect_cli_error(main_fn, argv, capsys, *needles):
    """An expected mistake, in process, through the same utils.run_cli that the CLIs use: a non-zero exit
    and one error line naming the problem (argparse's usage errors included). Returns that line."""
    import utils
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        utils.run_cli(main_fn, argv)
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if 'error' in line.lower()]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def assert_clean_failure(proc, *needles):
    """An expected mistake: non-zero exit, no traceback, one error line naming the problem."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert 'Traceback' not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if 'error' in line.lower()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
