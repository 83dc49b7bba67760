"""checkpoint.py on a Linear(2, 1): retention, best-so-far, resume bookkeeping; milliseconds, no training."""
import json
import os
import re
from types import SimpleNamespace

import pytest
import torch

import checkpoint


def run_args(out, **overrides):
    values = dict(output_dir=str(out), save_ckpt=True, save_ckpt_freq=1, save_ckpt_num=2, epochs=5, model='linear',
                  auto_resume=True, resume='', initialize=None, start_epoch=0, trust_checkpoint=False,
                  data_set='image_folder', data_path='/data')
    return SimpleNamespace(**{**values, **overrides})


def train_state():
    model = torch.nn.Linear(2, 1)
    return checkpoint.TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_retention_keeps_the_last_k_and_the_best(tmp_path):
    args, state, best = run_args(tmp_path), train_state(), {}
    accs = [10.0, 30.0, 20.0, 25.0, 5.0]
    for epoch, acc in enumerate(accs):
        best = checkpoint.save_epoch(args, epoch, {'test_acc1': acc}, best, state)
    assert sorted(os.listdir(tmp_path)) == ['checkpoint-3.pth', 'checkpoint-4.pth', 'checkpoint-best.pth']
    assert best == {'acc1': 30.0, 'epoch': 1}
    assert torch.load(tmp_path / 'checkpoint-best.pth')['epoch'] == 1


def test_save_ckpt_freq_saves_every_nth_epoch_and_the_last(tmp_path):
    args, state = run_args(tmp_path, save_ckpt_freq=2, save_ckpt_num=0), train_state()  # 0: keep every one
    for epoch in range(5):
        checkpoint.save_epoch(args, epoch, {}, {}, state)
    assert sorted(os.listdir(tmp_path)) == ['checkpoint-1.pth', 'checkpoint-3.pth', 'checkpoint-4.pth']


def test_auto_resume_false_starts_afresh_beside_a_checkpoint(tmp_path):
    checkpoint.save_epoch(run_args(tmp_path), 1, {}, {}, train_state())
    fresh = train_state()
    weight = fresh.model.weight.detach().clone()
    assert checkpoint.resume(run_args(tmp_path, auto_resume=False), fresh).start_epoch == 0
    assert torch.equal(fresh.model.weight, weight)
    assert checkpoint.resume(run_args(tmp_path), train_state()).start_epoch == 2  # the same folder, auto_resume true


def test_mid_epoch_checkpoints_count_in_the_retention_order(tmp_path):
    args, state = run_args(tmp_path, save_ckpt_num=3), train_state()
    checkpoint.save_epoch(args, 0, {}, {}, state)
    for k in (1, 2):
        checkpoint.save_mid_epoch(args, 1, k, {'loss_sum': torch.zeros(())}, {}, state)
    checkpoint.save_epoch(args, 1, {}, {}, state)
    names = [os.path.basename(p) for p in checkpoint.list_checkpoints(str(tmp_path))]
    assert names == ['checkpoint-1-step1.pth', 'checkpoint-1-step2.pth', 'checkpoint-1.pth']


def test_resume_restores_weights_optimizer_and_log(tmp_path):
    args, state = run_args(tmp_path), train_state()
    state.model(torch.ones(1, 2)).sum().backward()
    state.optimizer.step()
    for epoch in range(3):
        checkpoint.append_log(str(tmp_path), {'epoch': epoch})
    checkpoint.save_epoch(args, 1, {'test_acc1': 50.0}, {}, state)
    fresh = train_state()
    resumed = checkpoint.resume(args, fresh)
    assert (resumed.start_epoch, resumed.best, resumed.step_in_epoch) == (2, {'acc1': 50.0, 'epoch': 1}, 0)
    assert torch.equal(fresh.model.weight, state.model.weight)
    assert fresh.optimizer.state_dict()['param_groups'] == state.optimizer.state_dict()['param_groups']
    epochs = [json.loads(line)['epoch'] for line in (tmp_path / 'log.txt').read_text().splitlines()]
    assert epochs == [0, 1]  # epoch 2 is redone, its line dropped


def test_no_checkpoint_starts_at_start_epoch(tmp_path):
    resumed = checkpoint.resume(run_args(tmp_path, start_epoch=4), train_state())
    assert (resumed.start_epoch, resumed.best) == (4, {})


def test_save_ckpt_num_zero_keeps_every_checkpoint(tmp_path):
    args, state = run_args(tmp_path, save_ckpt_num=0), train_state()
    for epoch in range(4):
        checkpoint.save_epoch(args, epoch, {}, {}, state)
    assert len(checkpoint.list_checkpoints(str(tmp_path))) == 4


def trained_state():
    state = train_state()
    with torch.no_grad():
        state.model.weight.fill_(3.0)
    return state


@pytest.mark.parametrize('saved', ['without_ema', 'weights_only', 'with_ema'])
def test_resumed_ema_follows_the_resumed_weights(tmp_path, saved, capsys):
    """An EMA (built before resuming, from the initial weights) takes the checkpoint's EMA, or, from a checkpoint
    without one (a run without --model_ema, checkpoint-best.pth), restarts from the resumed weights: it would
    otherwise keep averaging the initial ones (at decay 0.9999, for thousands of steps)."""
    from timm.utils import ModelEmaV3
    old = trained_state()
    if saved == 'with_ema':
        old.model_ema = ModelEmaV3(old.model, decay=0.9)
        with torch.no_grad():
            old.model_ema.module.weight.fill_(2.0)
    args = run_args(tmp_path)
    checkpoint.save_epoch(args, 0, {'test_acc1': 1.0}, {}, old)
    if saved == 'weights_only':
        os.remove(tmp_path / 'checkpoint-0.pth')
        args = run_args(tmp_path, resume=str(tmp_path / 'checkpoint-best.pth'))
    fresh = train_state()
    fresh.model_ema = ModelEmaV3(fresh.model, decay=0.9)
    assert not torch.equal(fresh.model_ema.module.weight, old.model.weight)
    checkpoint.resume(args, fresh)
    # a file without the training state starts the run again from its weights, and says so
    assert ('holds weights but no training state' in capsys.readouterr().out) == (saved == 'weights_only')
    expected = 2.0 if saved == 'with_ema' else 3.0
    assert torch.equal(fresh.model_ema.module.weight, torch.full((1, 2), expected))


def test_args_of_reads_our_dict_and_an_official_namespace():
    """Official DeiT/MAE/ConvNeXt checkpoints keep their flags as an argparse.Namespace; ours as a dict, with
    --data_path absolute so that a run from another folder can compare it."""
    import argparse
    assert checkpoint.args_of({'args': argparse.Namespace(data_set='IMNET', data_path='/d')}) == \
        {'data_set': 'IMNET', 'data_path': '/d'}
    assert checkpoint.args_of({'args': {'epochs': 3}}) == {'epochs': 3} and checkpoint.args_of({}) == {}
    saved = checkpoint.saved_run_args(argparse.Namespace(data_path='data', epochs=3))
    assert saved == {'data_path': os.path.abspath('data'), 'epochs': 3}



LAYOUT = {'world_size': 1, 'batch_size': 4, 'update_freq': 2}


@pytest.mark.parametrize('now,refused', [(LAYOUT, None), ({**LAYOUT, 'update_freq': 1}, 'update_freq 2 (now 1)'),
                                         ({**LAYOUT, 'world_size': 2, 'batch_size': 2}, 'world_size 1 (now 2), '
                                                                                        'batch_size 4 (now 2)')])
def test_a_checkpoint_inside_an_epoch_resumes_only_with_its_layout(tmp_path, now, refused):
    """Its running counts are per process and micro-batch: with another layout the epoch's data and optimizer steps
    would shift (a step taken on one micro-batch, an extra step); one line says so. An epoch's checkpoint resumes."""
    args, state = run_args(tmp_path), train_state()
    checkpoint.save_mid_epoch(args, 1, 3, {'loss_sum': torch.zeros(()), 'micro': 6, 'seen': 24}, {}, state, LAYOUT)
    if refused is None:
        assert checkpoint.resume(args, train_state(), now).step_in_epoch == 3
    else:
        with pytest.raises(checkpoint.UserError, match=rf'checkpoint-1-step3.pth was saved inside epoch 1 with '
                                                       rf'{re.escape(refused)}; resume it with the same, or move .*'
                                                       rf'checkpoint-1-step\*.pth away'):
            checkpoint.resume(args, train_state(), now)
    checkpoint.save_epoch(args, 1, {}, {}, state)
    assert checkpoint.resume(args, train_state(), now).start_epoch == 2


def _resume_on_rank(rank, store_file, folders, results):
    """checkpoint.resume on this rank, from folders[rank], broadcast_buffers and cat_from_ranks; gloo on the CPU."""
    import torch.distributed as dist
    import utils
    dist.init_process_group('gloo', init_method=f'file://{store_file}', rank=rank, world_size=2)
    try:
        results[(rank, 'resumed')] = checkpoint.resume(run_args(folders[rank]), train_state()).start_epoch
    except utils.UserError as e:
        results[(rank, 'resumed')] = str(e)
    norm = torch.nn.BatchNorm1d(2)
    norm.running_mean.fill_(float(rank + 1))  # as each rank's own last batches leave them
    norm.weight.data.fill_(float(rank + 1))  # as a random init drawn from seed + rank
    utils.broadcast_buffers(norm)
    results[(rank, 'running_mean')] = norm.running_mean.tolist()
    results[(rank, 'weight')] = norm.weight.tolist()
    utils.broadcast_buffers(norm, parameters=True)
    results[(rank, 'weight, parameters=True')] = norm.weight.tolist()
    results[(rank, 'cat')] = utils.cat_from_ranks(torch.arange(rank + 1)).tolist()  # shares of different lengths
    dist.destroy_process_group()


@pytest.mark.slow
def test_every_process_resumes_from_one_file_and_evaluates_rank0s_buffers(tmp_path):
    """Processes that see different checkpoints (a folder local to each node) all stop with one line naming each
    one's file, instead of training different weights; broadcast_buffers gives every rank rank 0's statistics (and
    weights, when asked); cat_from_ranks joins shares of different lengths in rank order."""
    import torch.multiprocessing as mp
    shared, local = tmp_path / 'shared', tmp_path / 'local'
    shared.mkdir(), local.mkdir()
    checkpoint.save_epoch(run_args(shared), 0, {}, {}, train_state())
    for case, folders in (('same', [shared, shared]), ('different', [shared, local])):
        results = mp.Manager().dict()
        mp.spawn(_resume_on_rank, args=(str(tmp_path / f'store_{case}'), folders, results), nprocs=2)
        if case == 'same':
            assert results[(0, 'resumed')] == results[(1, 'resumed')] == 1
        else:
            expected = (f'the processes found different checkpoints to resume from (rank 0: '
                        f'{shared / "checkpoint-0.pth"}, rank 1: none); give --output_dir a folder every process sees')
            assert all(results[(r, 'resumed')].startswith(expected) for r in (0, 1)), dict(results)
        assert results[(0, 'running_mean')] == results[(1, 'running_mean')] == [1.0, 1.0]
        assert [results[(r, 'weight')] for r in (0, 1)] == [[1.0, 1.0], [2.0, 2.0]]  # buffers only, by default
        assert results[(0, 'weight, parameters=True')] == results[(1, 'weight, parameters=True')] == [1.0, 1.0]
        assert results[(0, 'cat')] == results[(1, 'cat')] == [0, 0, 1]
