"""Fault tolerance on the CPU: kill and resume, unreadable checkpoints, non-finite loss, DDP equivalence,
torchrun restarts."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import (ROOT, assert_clean_failure, child_processes, final_weights, free_port, kill_after_checkpoint,
                      log_lines, run_script, run_torchrun, write_image_folder)

pytestmark = pytest.mark.slow  # end-to-end runs

# A 2-block ViT at 32 px: small checkpoints, quick steps.
SMALL = ['--model', 'vit_tiny_patch16_224', '--model_kwargs', '{"patch_size": 8, "depth": 2}', '--input_size', '32',
         '--data_set', 'image_folder', '--device', 'cpu', '--print_freq', '1', '--warmup_epochs', '1']


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp('data'), seed=1)


def main_cmd(data, out, *extra):
    return [sys.executable, 'main.py', *SMALL, '--data_path', data, '--output_dir', str(out), *extra]


def test_sigkill_at_arbitrary_moments_then_resume_is_exact(tmp_path, data):
    flags = ['--epochs', '3', '--batch_size', '4', '--save_every_steps', '1', '--save_ckpt_num', '2']
    reference = tmp_path / 'reference'
    proc = subprocess.run(main_cmd(data, reference, *flags, '--num_workers', '0'), cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]

    killed = tmp_path / 'killed'
    rnd = random.Random(0)
    cmd = main_cmd(data, killed, *flags, '--num_workers', '1')[1:]
    # three times: once this run has written a checkpoint of its own, a random moment later, SIGKILL
    kills = sum(kill_after_checkpoint(cmd, killed, rnd.uniform(0.0, 0.6)) for _ in range(3))
    assert kills >= 2
    proc = run_script(*cmd, timeout=300)  # then let it finish
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = final_weights(reference, 2), final_weights(killed, 2)
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    assert log_lines(reference) == log_lines(killed)
    assert not [f for f in os.listdir(killed) if f.startswith('.tmp')]


def test_unreadable_newest_checkpoint_falls_back_to_previous(tmp_path, data):
    out = tmp_path / 'run'
    proc = run_script(*main_cmd(data, out, '--epochs', '2', '--batch_size', '4', '--num_workers', '0')[1:])
    assert proc.returncode == 0, proc.stderr[-2000:]
    newest = out / 'checkpoint-1.pth'
    newest.write_bytes(newest.read_bytes()[:1000])  # a truncated file
    proc = run_script(*main_cmd(data, out, '--epochs', '3', '--batch_size', '4', '--num_workers', '0')[1:])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'skipping unreadable checkpoint' in proc.stdout
    assert 'auto-resume from' in proc.stdout and 'checkpoint-0.pth' in proc.stdout
    assert [r['epoch'] for r in log_lines(out)] == [0, 1, 2]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data):
    out = tmp_path / 'run'
    base = ['--batch_size', '4', '--num_workers', '0', '--mixup', '0', '--cutmix', '0']
    proc = run_script(*main_cmd(data, out, '--epochs', '1', *base)[1:])
    assert proc.returncode == 0
    good = (out / 'checkpoint-0.pth').read_bytes()
    proc = run_script(*main_cmd(data, out, '--epochs', '3', '--lr', '1e30', '--warmup_epochs', '0', *base)[1:])
    assert_clean_failure(proc, 'loss is', 'epoch 1', 'stopped')
    assert (out / 'checkpoint-0.pth').read_bytes() == good
    assert not (out / 'checkpoint-1.pth').exists()


def test_ddp_two_processes_equal_one_process_with_accumulation(tmp_path, data):
    """2 processes x batch 1 x update_freq 2 and 1 process x batch 2 x update_freq 2 take the same samples, augmentations
    and steps; only the order of float reductions differs. SGD keeps that difference at float precision
    (AdamW divides by sqrt(v) and amplifies it on near-zero gradients: about 4e-4 after 6 steps)."""
    common = ['--epochs', '1', '--batch_size', '2', '--global_batch_size', '4', '--num_workers', '0',
              '--mixup', '0', '--cutmix', '0', '--drop_path', '0', '--disable_eval', 'true', '--opt', 'sgd',
              '--lr', '0.1']
    one, two, other_seed = tmp_path / 'one', tmp_path / 'two', tmp_path / 'seed1'
    proc = run_script(*main_cmd(data, one, *common)[1:])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'update_freq 2 = 4' in proc.stdout
    # 2 processes x batch 1 x update_freq 2: DDP's no_sync on the first micro-step, the all-reduce on the second
    proc = run_script('-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={free_port()}',
                      *main_cmd(data, two, *common, '--batch_size', '1')[1:])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'world_size 2 x batch_size 1 x update_freq 2 = 4' in proc.stdout
    proc = run_script(*main_cmd(data, other_seed, *common, '--seed', '1')[1:])
    assert proc.returncode == 0
    a, b, c = (final_weights(x, 0)['model'] for x in (one, two, other_seed))
    ddp_diff = max((a[k] - b[k]).abs().max().item() for k in a)
    seed_diff = max((a[k] - c[k]).abs().max().item() for k in a)
    assert ddp_diff < 1e-6, ddp_diff
    assert seed_diff > 1e-2  # the comparison can tell different runs apart


def test_ddp_resume_restores_each_process_its_own_random_states(tmp_path, data):
    """2 processes with drop path and mixup: continuing from a checkpoint in the middle of the first epoch gives
    the uninterrupted run's weights and log bit for bit, since each process gets back its own random states and
    running loss sum (before, every process took rank 0's: the same mixup draws on both ranks, rank 0's
    drop-path masks, and rank 0's loss sum in both halves of the epoch's mean loss)."""
    common = ['--epochs', '2', '--batch_size', '2', '--num_workers', '0', '--drop_path', '0.1', '--mixup', '0.8',
              '--save_every_steps', '1', '--save_ckpt_num', '20', '--disable_eval', 'true']
    reference, resumed = tmp_path / 'reference', tmp_path / 'resumed'
    proc = run_torchrun('--nproc_per_node=2', f'--master_port={free_port()}', *main_cmd(data, reference, *common)[1:])
    assert proc.returncode == 0, proc.stderr[-2000:]
    resumed.mkdir()
    (resumed / 'checkpoint-0-step2.pth').write_bytes((reference / 'checkpoint-0-step2.pth').read_bytes())
    proc = run_torchrun('--nproc_per_node=2', f'--master_port={free_port()}', *main_cmd(data, resumed, *common)[1:])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'step 2 of the epoch' in proc.stdout
    a, b = final_weights(reference, 1)['model'], final_weights(resumed, 1)['model']
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert log_lines(reference) == log_lines(resumed)


def test_a_torchrun_past_its_time_leaves_no_worker_behind(tmp_path):
    """run_torchrun's stop: a worker that ignores SIGTERM (torchrun's, passed on) gets SIGKILL after the grace;
    torchrun is stopped too, and the test sees one AssertionError, not a hang."""
    script = tmp_path / 'stubborn.py'
    script.write_text('import os, signal, time\n'
                      'signal.signal(signal.SIGTERM, signal.SIG_IGN)\n'
                      f'open({str(tmp_path / "pid")!r}, "w").write(str(os.getpid()))\n'
                      'time.sleep(600)\n')
    with pytest.raises(AssertionError, match='ran past 20 s and was stopped'):
        run_torchrun('--nproc_per_node=1', f'--master_port={free_port()}', str(script), timeout=20, grace=2)
    worker = int((tmp_path / 'pid').read_text())
    for _ in range(50):  # SIGKILL is sent; the kernel may take a moment to let it go
        if not os.path.exists(f'/proc/{worker}') or open(f'/proc/{worker}/stat').read().split(') ')[1][0] == 'Z':
            break
        time.sleep(0.1)
    else:
        pytest.fail(f'worker {worker} outlived its torchrun')


def _workers(pid):
    """The main.py worker processes started by the torchrun process `pid`."""
    out = []
    for child in child_processes(pid):
        try:
            with open(f'/proc/{child}/cmdline', 'rb') as f:
                if b'main.py' in f.read():
                    out.append(child)
        except OSError:
            continue
    return out


def test_torchrun_max_restarts_with_auto_resume(tmp_path, data):
    # Before utils._restart_safe_store, about half of these runs failed or hung: restarted gloo workers read
    # the dead attempt's peer addresses from torchrun's reused store.
    out = tmp_path / 'elastic'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--max_restarts=2',
           f'--master_port={free_port()}',
           *main_cmd(data, out, '--epochs', '3', '--batch_size', '2', '--num_workers', '0')[1:]]
    job = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (out / 'checkpoint-0.pth').exists():
            time.sleep(0.1)
        workers = _workers(job.pid)
        assert workers, 'no worker processes found'
        os.kill(workers[0], signal.SIGKILL)  # one worker dies mid-run
        output, _ = job.communicate(timeout=300)
    finally:
        if job.poll() is None:  # never leave a hung job (and its port) behind; workers have their own sessions
            for worker in _workers(job.pid):
                os.kill(worker, signal.SIGKILL)
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 0, output[-3000:]
    assert 'auto-resume from' in output
    assert [r['epoch'] for r in log_lines(out)] == [0, 1, 2]


@pytest.mark.parametrize('env,world', [({}, 1), ({'RANK': '3', 'WORLD_SIZE': '4'}, 4),
                                       ({'SLURM_PROCID': '0', 'SLURM_NTASKS': '8'}, 1),  # `python main.py` in sbatch
                                       ({'SLURM_PROCID': '1', 'SLURM_NTASKS': '8', 'SLURM_STEP_NUM_TASKS': '8'}, 8)])
def test_launched_world_size_is_the_launchers_step(monkeypatch, env, world):
    """Under SLURM, the tasks of this srun step: an sbatch script's own `python main.py` sees the allocation's
    SLURM_NTASKS, and waited for peers that never start."""
    for key in ('RANK', 'WORLD_SIZE', 'SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_STEP_NUM_TASKS'):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    import utils
    assert utils.launched_world_size() == world
    # before the group is joined, its rank (print_main speaks on rank 0 alone: the no-effect warnings of parse_args)
    assert utils.rank() == {1: 0, 4: 3, 8: 1}[world]


def _nan_on_rank1(rank, store_file, results):
    """Two processes train a Linear under DDP (gloo); rank 1 alone meets a NaN loss at its third batch."""
    import torch.distributed as dist
    import engine
    dist.init_process_group('gloo', init_method=f'file://{store_file}', rank=rank, world_size=2)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 1))
    calls = []

    def criterion(images, outputs, targets):
        calls.append(1)
        loss = outputs.sum() * 0 + 1.0
        return loss * float('nan') if rank == 1 and len(calls) == 3 else loss
    loader = [(torch.ones(2, 2), torch.zeros(2)) for _ in range(6)]
    try:
        engine.train_one_epoch(model, criterion, loader, torch.optim.SGD(model.parameters(), lr=0.1),
                               torch.device('cpu'), 0, lambda optimizer, step: None, print_freq=1)
        results[rank] = 'finished'
    except engine.NonFiniteLoss as e:
        results[rank] = str(e)
    dist.destroy_process_group()


def test_a_nan_on_one_process_stops_every_process(tmp_path):
    """The progress line's loss is the mean over processes, so every process sees the NaN one of them met and
    stops with the same line (before, only that one stopped; the others died in their next collective with a
    traceback, or waited for it until the timeout)."""
    import torch.multiprocessing as mp
    results = mp.Manager().dict()
    mp.spawn(_nan_on_rank1, args=(str(tmp_path / 'store'), results), nprocs=2)
    assert results[0] == results[1] == ('loss is nan at epoch 0, optimizer step 3; stopped, the last good checkpoint '
                                        'is kept (lower --lr or enable --clip_grad)')
