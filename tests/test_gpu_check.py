"""scripts/gpu_check.sh without a GPU: the CUDA tests skip, the benchmark is left out, and the report still
holds versions, device 'none', each part's status and pytest's counts."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, assert_clean_failure, run_script


def gpu_check(out, **env):
    full_env = {k: v for k, v in os.environ.items() if k != 'WS_CUDA_TEST_DEVICE'}
    full_env.update(PYTHON=sys.executable, **env)
    return subprocess.run(['bash', 'scripts/gpu_check.sh', '--no-benchmark', str(out)], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_gpu_check_without_gpu_reports_versions_and_skipped_cuda_tests(tmp_path):
    if torch.cuda.is_available():
        pytest.skip('a CUDA device is present: the CUDA tests would run')
    collected = subprocess.run([sys.executable, '-m', 'pytest', '--collect-only', '-q', '-m', 'cuda',
                                '-p', 'no:cacheprovider', 'tests/test_cuda.py'], cwd=ROOT, capture_output=True,
                               text=True, timeout=120).stdout
    n = sum('test_cuda.py::' in line for line in collected.splitlines())
    out = tmp_path / 'check'
    proc = gpu_check(out)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((out / 'gpu_check.json').read_text())
    assert report['versions']['torch'] == torch.__version__
    assert {'python', 'torchvision', 'timm', 'cuda', 'cudnn'} <= set(report['versions'])
    assert report['device']['name'] == 'none'
    tests = report['cuda_tests']
    assert n >= 10 and tests['skipped'] == tests['total'] == n and tests['passed'] == tests['failed'] == 0
    assert tests['summary'].startswith(f'{n} skipped')
    assert report['parts']['cuda_tests']['status'] == 'ok'
    assert report['parts']['benchmark'] == {'status': 'skipped', 'exit_status': 'skip', 'seconds': 0, 'note': '--no-benchmark'}
    assert f'{n} skipped' in (out / 'gpu_check.md').read_text()
    assert sorted(os.listdir(out)) == ['gpu_check.json', 'gpu_check.log', 'gpu_check.md']


@pytest.mark.slow
def test_gpu_check_records_a_part_that_runs_out_of_time(tmp_path):
    out = tmp_path / 'check'
    proc = gpu_check(out, GPU_CHECK_TEST_LIMIT='1')
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / 'gpu_check.json').read_text())
    assert report['parts']['cuda_tests']['status'] == 'timed out'
    assert 'no junit xml' in report['cuda_tests']['source']
    assert '## cuda_tests: timed out' in (out / 'gpu_check.md').read_text()


def test_gpu_check_usage(tmp_path):
    usage = 'usage: bash scripts/gpu_check.sh [--no-benchmark | --no-tests] OUT_DIR [DATA_DIR]'
    # no OUT_DIR: the usage line alone (not bash's 'line 29: 1: usage: ...'); an option as OUT_DIR: mkdir -p took it
    # as its own
    for argv, alone in (([], True), (['--no-tests'], True), (['--bogus'], False), (['--no-tests', '--help'], False)):
        proc = subprocess.run(['bash', os.path.join(ROOT, 'scripts', 'gpu_check.sh'), *argv], cwd=tmp_path,
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2 and usage in proc.stderr, proc.stderr
        assert proc.stderr == usage + '\n' or not alone, proc.stderr
        assert not os.path.exists(os.path.join(ROOT, '--bogus'))  # OUT_DIR is made in the checkout's root
    proc = subprocess.run(['bash', 'scripts/gpu_check.sh', '--help'], cwd=ROOT, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0 and 'GPU_CHECK_BUDGET' in proc.stdout


def test_code_version_outside_a_checkout_is_what_the_sender_says(tmp_path):
    """A copy of the working tree sent to a GPU machine has no .git: its records carry WS_CODE_VERSION (set by
    the command that sent it), else 'unknown'; in a checkout, git's commit wins."""
    import shutil
    shutil.copy(os.path.join(ROOT, 'utils.py'), tmp_path)
    env = dict(os.environ, WS_CODE_VERSION='abc1234', GIT_CEILING_DIRECTORIES=str(tmp_path.parent))
    code = ('import os, utils; print(utils.code_version()); os.environ.pop("WS_CODE_VERSION"); '
            'print(utils.code_version())')
    copy = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert copy.stdout.split() == ['abc1234', 'unknown'], copy.stderr
    checkout = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert len(set(checkout.stdout.split())) == 1 and 'abc1234' not in checkout.stdout, checkout.stderr


def test_gpu_report_needs_both_folders_of_gpu_check(tmp_path):
    """A missing OUT_DIR was a FileNotFoundError traceback; a missing WORK_DIR an exit 0 with a report of 'none'."""
    (tmp_path / 'out').mkdir()
    (tmp_path / 'work').mkdir()
    (tmp_path / 'work' / 'parts.tsv').write_text('')
    proc = run_script(os.path.join('scripts', 'gpu_report.py'), str(tmp_path / 'missing'), str(tmp_path / 'work'))
    assert_clean_failure(proc, f'OUT_DIR {tmp_path / "missing"} is not a folder')
    proc = run_script(os.path.join('scripts', 'gpu_report.py'), str(tmp_path / 'out'), str(tmp_path / 'missing'))
    assert_clean_failure(proc, f'WORK_DIR {tmp_path / "missing"} has no parts.tsv')
    assert os.listdir(tmp_path / 'out') == []
