"""Safe checkpoints and honest failures (issue #16): every file we write loads with plain torch.load
(weights_only=True) and with timm's checkpoint_path; no foreign file runs code unless --trust_checkpoint."""
import json
import math
import os
import random
import re

import numpy as np
import pytest
import timm
import torch

import main
import utils
import weight_selection as ws
from conftest import expect_cli_error, write_image_folder

TINY_VIT = {'patch_size': 8, 'depth': 2, 'img_size': 32}
TRAIN = ['--model', 'vit_tiny_patch16_224', '--model_kwargs', '{"patch_size": 8, "depth": 2}', '--input_size', '32',
         '--data_set', 'image_folder', '--device', 'cpu', '--print_freq', '100', '--warmup_epochs', '0',
         '--num_workers', '0', '--batch_size', '4', '--gpu_data', 'false']


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp('data'), seed=1)


@pytest.fixture(scope='module')
def teacher_file(tmp_path_factory):
    torch.manual_seed(0)
    teacher = timm.create_model('vit_small_patch16_224', **TINY_VIT)
    path = tmp_path_factory.mktemp('teacher') / 'teacher.pth'
    torch.save(teacher.state_dict(), path)
    return str(path)


@pytest.fixture(scope='module')
def trained(tmp_path_factory, data):
    """One epoch with EMA and mid-epoch checkpoints: every kind of checkpoint file main.py writes."""
    out = tmp_path_factory.mktemp('run')
    main.main([*TRAIN, '--data_path', data, '--output_dir', str(out), '--epochs', '1', '--model_ema', 'true',
               '--model_ema_eval', 'true', '--model_ema_decay', '0.5', '--save_every_steps', '1'])
    return out


def selection_argv(teacher_file, out, *extra):
    return ['--teacher', 'vit_small_patch16_224', '--teacher_checkpoint', teacher_file,
            '--teacher_kwargs', '{"img_size": 32, "patch_size": 8, "depth": 2}', '--student', 'vit_tiny_patch16_224',
            '--student_kwargs', '{"img_size": 32, "patch_size": 8, "depth": 2}', '--num_classes', '3',
            '--output', str(out), '--quiet', *extra]


# ---------------------------------------------------------------------------------------------- 1: safe files

def test_every_checkpoint_loads_with_plain_torch_load_and_in_timm(trained):
    names = sorted(f for f in os.listdir(trained) if f.endswith('.pth'))
    assert 'checkpoint-0.pth' in names and 'checkpoint-best.pth' in names and 'checkpoint-best-ema.pth' in names
    assert any('-step' in n for n in names), names
    for name in names:
        ckpt = torch.load(trained / name)  # weights_only=True: refuses any object but tensors and plain types
        assert ckpt['model_name'] == 'vit_tiny_patch16_224'
        model = timm.create_model('vit_tiny_patch16_224', num_classes=3, checkpoint_path=str(trained / name),
                                  **TINY_VIT)
        weights = ckpt['model_ema'] if 'model_ema' in ckpt else ckpt['model']  # timm prefers the EMA
        assert torch.equal(model.state_dict()['head.weight'], weights['head.weight']), name
    full = torch.load(trained / 'checkpoint-0.pth')
    assert isinstance(full['args']['epochs'], int) and isinstance(full['rng']['python'], list)


def test_selection_output_loads_with_plain_torch_load_and_in_timm(tmp_path, teacher_file):
    out = tmp_path / 'ws.pth'
    ws.main(selection_argv(teacher_file, out))
    ckpt = torch.load(out)
    assert ckpt['meta']['versions']['torch'] == str(torch.__version__)
    model = timm.create_model('vit_tiny_patch16_224', num_classes=3, checkpoint_path=str(out), **TINY_VIT)
    assert torch.equal(model.state_dict()['blocks.1.attn.qkv.weight'], ckpt['model']['blocks.1.attn.qkv.weight'])


def test_rng_state_is_plain_and_restores_every_generator(tmp_path):
    utils.seed_everything(5)
    saved = utils.rng_state(cuda=False)
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    torch.save(saved, tmp_path / 'rng.pth')
    reloaded = torch.load(tmp_path / 'rng.pth')  # plain types and tensors only
    utils.seed_everything(99)
    utils.set_rng_state(reloaded)
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]


def test_rng_state_of_old_checkpoints_still_restores():
    utils.seed_everything(7)
    old = {'torch': torch.get_rng_state(), 'numpy': np.random.get_state(), 'python': random.getstate()}
    expected = (np.random.rand(2), random.random())
    utils.seed_everything(1)
    utils.set_rng_state(old)
    assert np.array_equal(np.random.rand(2), expected[0]) and random.random() == expected[1]


# ---------------------------------------------------------------------------------------------- 2: no code from files

class RunsCode:
    """Unpickling this runs a shell command: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


@pytest.fixture
def malicious(tmp_path):
    """(file, marker): a checkpoint-shaped pickle whose loading would create `marker`."""
    marker = tmp_path / 'MARKER'
    path = tmp_path / 'evil.pth'
    model = timm.create_model('vit_tiny_patch16_224', num_classes=3, **TINY_VIT)
    torch.save({'model': model.state_dict(), 'optimizer': RunsCode(marker), 'epoch': 0}, path)
    return str(path), marker


def test_torch_load_refuses_code_and_names_the_flag(malicious):
    from models import io
    path, marker = malicious
    with pytest.raises(utils.UserError) as e:
        io.torch_load(path)
    assert not marker.exists()
    assert 'posix.system' in str(e.value) and '--trust_checkpoint true' in str(e.value)


@pytest.mark.parametrize('content', [b'\xff\xd8\xff\xe0\x00\x10JFIF' + bytes(200), b'hello, not a checkpoint\n'],
                         ids=['jpeg', 'text'])
def test_a_file_that_is_no_checkpoint_is_not_called_untrusted(tmp_path, content):
    """A wrong path (an image, a text file) gets 'not a file torch.save writes', never advice to trust it."""
    from models import io
    path = tmp_path / 'x.pth'
    path.write_bytes(content)
    with pytest.raises(utils.UserError) as e:
        io.torch_load(str(path))
    assert 'not a file torch.save writes' in str(e.value) and '--trust_checkpoint' not in str(e.value)
    assert not isinstance(e.value, io.UntrustedCheckpoint)


@pytest.mark.filterwarnings('ignore:Detected pickle protocol')  # torch's note that protocols above 2 are unusual
@pytest.mark.parametrize('protocol', [1, 2, 4, 5])  # protocol 0: torch.load itself cannot read what torch.save wrote
def test_every_torch_save_format_is_a_checkpoint(tmp_path, protocol):
    """The legacy format in any pickle protocol (only 2 loads weights-only) and the zip format are torch.save's:
    read, or refused as untrusted with the flag that reads them, never called 'not a checkpoint'."""
    from models import io
    weights = {'w': torch.arange(3.)}
    torch.save(weights, tmp_path / 'zip.pth', pickle_protocol=protocol)
    torch.save(weights, tmp_path / 'legacy.pth', _use_new_zipfile_serialization=False, pickle_protocol=protocol)
    for name in ('zip.pth', 'legacy.pth'):
        path = str(tmp_path / name)
        assert io.written_by_torch_save(path), name
        try:
            state = io.torch_load(path)
        except io.UntrustedCheckpoint as e:
            assert '--trust_checkpoint true' in str(e)
            state = io.torch_load(path, trust=True)
        assert torch.equal(state['w'], weights['w']), name


def test_trusted_file_is_fully_unpickled(malicious, capsys):
    from models import io
    path, marker = malicious
    io.torch_load(path, trust=True)
    assert marker.exists()  # the user asked for it: the object was really unpickled
    assert 'fully unpickling' in capsys.readouterr().out


def test_official_checkpoint_with_namespace_loads_without_the_flag(tmp_path):
    import argparse
    from models import io
    path = tmp_path / 'deit.pth'
    torch.save({'model': {'w': torch.ones(2)}, 'args': argparse.Namespace(lr=1e-3, model='deit_tiny')}, path)
    assert torch.equal(io.read_state_dict(str(path))['w'], torch.ones(2))


@pytest.mark.skipif(not os.path.isfile('/proc/self/maps'), reason='reads /proc/self/maps (Linux)')
def test_teacher_weights_stay_in_the_files_pages(tmp_path):
    """read_state_dict maps a zip-format .pth (torch.save's) instead of copying it into memory, so a big teacher's
    selection or --initialize holds only what it uses; a legacy-format file, which cannot be mapped, loads too."""
    from models import io
    weights = {'w': torch.arange(6.).reshape(2, 3), 'b': torch.ones(2)}
    torch.save(weights, tmp_path / 'zip.pth')
    torch.save(weights, tmp_path / 'legacy.pth', _use_new_zipfile_serialization=False)
    for name in ('zip.pth', 'legacy.pth'):
        state = io.read_state_dict(str(tmp_path / name))
        assert state.keys() == weights.keys() and all(torch.equal(state[k], v) for k, v in weights.items())
        with open('/proc/self/maps') as f:
            assert (str(tmp_path / name) in f.read()) == (name == 'zip.pth'), name


def test_selection_as_safetensors_with_meta_initializes_training(tmp_path, teacher_file, data):
    import json
    from safetensors import safe_open
    out = tmp_path / 'ws.safetensors'
    ws.main(selection_argv(teacher_file, out))
    with safe_open(str(out), 'pt') as f:
        meta = json.loads(f.metadata()['meta'])
        qkv = f.get_tensor('blocks.0.attn.qkv.weight')
    assert meta['student'] == 'vit_tiny_patch16_224' and meta['versions']['torch'] == str(torch.__version__)
    run = tmp_path / 'run'
    main.main([*TRAIN, '--data_path', data, '--output_dir', str(run), '--epochs', '1', '--lr', '1e-12',
               '--initialize', str(out), '--weight_decay', '0', '--min_lr', '0'])
    trained = torch.load(run / 'checkpoint-0.pth')['model']
    assert torch.allclose(trained['blocks.0.attn.qkv.weight'], qkv, atol=1e-8)  # a tiny lr: the selected weights


# ---------------------------------------------------------------------------------------------- 3: every entry point

def figures_main(argv):
    import importlib.util
    spec = importlib.util.spec_from_file_location('figures', os.path.join(os.path.dirname(ws.__file__), 'scripts',
                                                                          'figures.py'))
    figures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(figures)
    return figures.main(argv)


def entry_point_argv(entry, evil, tmp_path, data, teacher_file):
    """(main function, argv) that reads the malicious file `evil` through one entry point."""
    out = str(tmp_path / 'out')
    train = [*TRAIN, '--data_path', data, '--output_dir', out, '--epochs', '1']
    if entry == 'selection_teacher':
        return ws.main, selection_argv(evil, tmp_path / 'ws.pth')
    if entry == 'initialize':
        return main.main, [*train, '--initialize', evil]
    if entry == 'resume':
        return main.main, [*train, '--resume', evil]
    if entry == 'eval':
        return main.main, [*train, '--eval', 'true', '--resume', evil]
    if entry == 'auto_resume':
        os.makedirs(out)
        os.replace(evil, os.path.join(out, 'checkpoint-0.pth'))  # planted where auto-resume looks
        return main.main, train
    if entry == 'distill_teacher':
        return main.main, [*train, '--distill', 'logit', '--distill_teacher', 'vit_tiny_patch16_224',
                           '--distill_teacher_kwargs', '{"img_size": 32, "patch_size": 8, "depth": 2}',
                           '--distill_teacher_checkpoint', evil]
    return figures_main, ['attention', '--teacher', 'vit_small_patch16_224', '--teacher_checkpoint', teacher_file,
                          '--teacher_kwargs', '{"img_size": 32, "patch_size": 8, "depth": 2}', '--selection', evil,
                          '--student', 'vit_tiny_patch16_224', '--student_kwargs',
                          '{"img_size": 32, "patch_size": 8, "depth": 2}', '--out', str(tmp_path / 'fig.png')]


@pytest.mark.parametrize('entry', ['selection_teacher', 'initialize', 'resume', 'eval', 'auto_resume',
                                   'distill_teacher', 'figures_selection'])
def test_malicious_pickle_runs_through_no_entry_point(entry, malicious, tmp_path, data, teacher_file, capsys):
    evil, marker = malicious
    fn, argv = entry_point_argv(entry, evil, tmp_path, data, teacher_file)
    line = expect_cli_error(fn, argv, capsys, 'refused to load', 'posix.system', '--trust_checkpoint true')
    assert not marker.exists(), line
    assert not (tmp_path / 'ws.pth').exists() and not (tmp_path / 'fig.png').exists()
    assert not os.path.exists(tmp_path / 'out' / 'checkpoint-0-step1.pth')  # nothing trained


def test_resume_with_another_schedule_says_so(tmp_path, trained, data, capsys):
    import shutil
    out = tmp_path / 'run'
    shutil.copytree(trained, out)
    capsys.readouterr()
    main.main([*TRAIN, '--data_path', data, '--output_dir', str(out), '--epochs', '2', '--model_ema', 'true',
               '--model_ema_eval', 'true', '--model_ema_decay', '0.5'])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith('warning: resumed')]
    assert len(lines) == 1 and lines[0].startswith("warning: resumed on another learning-rate schedule than the "
                                                   "checkpoint's run: total_steps ")
    assert '(was ' in lines[0] and lines[0].endswith('the remaining steps follow the new one')
    import checkpoint  # the schedule, not the flags: another --batch_size at the same global batch is no change
    same = {'lr': 0.002, 'min_lr': 1e-6, 'total_steps': 400, 'warmup_steps': 50, 'weight_decay': 0.05,
            'weight_decay_end': None}
    checkpoint.warn_schedule_changes(same, dict(same))
    checkpoint.warn_schedule_changes(same, dict(same, lr=0.001, total_steps=600))
    assert capsys.readouterr().out.splitlines() == [
        "warning: resumed on another learning-rate schedule than the checkpoint's run: lr 0.001 (was 0.002), "
        'total_steps 600 (was 400); the remaining steps follow the new one']


def test_old_checkpoint_resumes_only_with_trust_checkpoint(tmp_path, trained, data, capsys):
    old = torch.load(trained / 'checkpoint-0.pth')
    old['rng'] = {'torch': torch.get_rng_state(), 'numpy': np.random.get_state(), 'python': random.getstate()}
    old['args']['torch_version'] = torch.__version__  # what checkpoints held before weights-only saving
    path = tmp_path / 'old.pth'
    torch.save(old, path)
    argv = [*TRAIN, '--data_path', data, '--output_dir', str(tmp_path / 'out'), '--epochs', '2', '--resume', str(path)]
    expect_cli_error(main.main, argv, capsys, 'TorchVersion', '--trust_checkpoint true')
    record = main.main([*argv, '--trust_checkpoint', 'true'])
    assert record['epoch'] == 1  # continued after the old checkpoint's epoch 0
    assert 'resumed from' in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- 8: umask

@pytest.mark.parametrize('mask,mode', [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_write_keeps_the_users_umask(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        utils.atomic_save({'w': torch.ones(1)}, str(tmp_path / 'a.pth'))
        utils.atomic_write(str(tmp_path / 'b.txt'), lambda f: f.write('x'), binary=False)
    finally:
        os.umask(old)
    for name in ('a.pth', 'b.txt'):
        assert os.stat(tmp_path / name).st_mode & 0o777 == mode, name


# ---------------------------------------------------------------------------------------------- 4: no silent wrong results

def test_eval_split_with_other_classes_stops(tmp_path, capsys):
    import shutil
    for case in ('missing', 'extra'):
        root = tmp_path / case
        write_image_folder(root)
        if case == 'missing':
            shutil.rmtree(root / 'val' / 'c1')  # c2 would become label 1
        else:
            shutil.copytree(root / 'val' / 'c2', root / 'val' / 'c9')
        argv = [*TRAIN, '--data_path', str(root), '--epochs', '1']
        line = expect_cli_error(main.main, argv, capsys, 'other classes than', f'{case} c')
        assert ('c1' if case == 'missing' else 'c9') in line


@pytest.mark.parametrize('flags,needles', [
    (['--input_size', '36'], ['--input_size 36 is not a multiple', 'patch size 8', '32 or 40']),
    (['--input_size', '4'], ['--input_size 4 is not a multiple', 'e.g. 8']),
    (['--model_kwargs', '{"patch_size": 8, "depth": 2, "img_size": 64}'],
     ['--model vit_tiny_patch16_224 takes 64 px images only, and --input_size is 32', 'pass --input_size 64']),
    (['--distill', 'feature', '--distill_teacher', 'vit_tiny_patch16_224', '--distill_teacher_kwargs',
      '{"depth": 1}', '--distill_teacher_checkpoint', 'TEACHER'],
     ['--distill_teacher vit_tiny_patch16_224 takes 224 px images only, and --input_size is 32',
      '\'{"dynamic_img_size": true}\'']),
    (['--device', 'gpu'], ['--device gpu: pass cuda', 'cuda:N or cpu']),
    (['--distill', 'feature', '--distill_teacher', 'vit_tiny_patch16_224', '--distill_teacher_kwargs',
      '{"depth": 1, "dynamic_img_size": true}', '--distill_teacher_checkpoint', 'TEACHER', '--input_size', '40'],
     ['--input_size 40 is not a multiple of the patch size 16 of --distill_teacher vit_tiny_patch16_224']),
    (['--epochs', '2', '--warmup_epochs', '5'], ['shorter than --warmup_epochs 5', 'lower --warmup_epochs']),
    (['--warmup_steps', '100'], ['--warmup_steps 100 is more than', 'lower --warmup_steps']),
    (['--epochs', '0'], ['--epochs 0: train at least one epoch']),
    (['--batch_size', '0'], ['--batch_size 0 must be positive']),
    (['--global_batch_size', '-4'], ['--global_batch_size -4 must be positive']),
    (['--update_freq', '0'], ['--update_freq 0 must be']),
    (['--eval_freq', '0'], ['--eval_freq 0 must be 1 (every epoch) or more']),
    (['--lr', '0'], ['--lr 0.0 must be positive']),
    (['--blr', '-1'], ['--blr -1.0 must be positive']),
    (['--num_workers', '-1'], ['--num_workers -1 must be']),
    (['--print_freq', '0'], ['--print_freq 0 must be 1 (every batch) or more']),
    (['--save_ckpt_freq', '0'], ['--save_ckpt_freq 0 must be 1 (every epoch) or more']),
    (['--save_ckpt_num', '-1'], ['--save_ckpt_num -1 must be 0 (keep all) or more']),
    (['--save_every_steps', '-1'], ['--save_every_steps -1 must be 0 (off) or more']),
    (['--warmup_epochs', '-5'], ['--warmup_epochs -5 must be 0 (no warmup) or more']),
    (['--batch_size', '3'], ['--batch_size 3 is odd, and mixup/cutmix pair the images', '--mixup 0 --cutmix 0']),
    (['--global_batch_size', '4096'], ['fewer than one optimizer step of update_freq 1024 (global batch 4096)',
                                       'nothing would be trained', 'lower --global_batch_size']),
    # values timm asserts on mid-run, or takes silently (found by a pass of wrong inputs over the CLIs)
    (['--input_size', '0'], ['--input_size 0 must be positive']),
    (['--crop_pct', '0'], ['--crop_pct 0.0 must be a fraction in (0, 1]']),
    (['--drop_path', '1.5'], ['--drop_path 1.5 must be a rate in [0, 1)']),
    (['--drop_path', '-0.5'], ['--drop_path -0.5 must be a rate in [0, 1)']),
    (['--reprob', '2'], ['--reprob 2.0 must be a probability in [0, 1]']),
    (['--smoothing', '1.5'], ['--smoothing 1.5 must be in [0, 1)']),
    (['--model_ema_decay', '2'], ['--model_ema_decay 2.0 must be in (0, 1)']),
    (['--opt', 'adamm'], ['--opt adamm: not an optimizer timm knows', 'list_optimizers']),
    (['--opt_betas', '0.9', '0.99', '0.5'], ['--opt_betas takes two values', 'got 3']),
    (['--cutmix_minmax', '0.3'], ['--cutmix_minmax takes two box ratios', 'got 0.3']),
    (['--aa', 'randaug-garbage'], ['--aa randaug-garbage: not a timm augmentation policy']),
    (['--aa', 'rand-m9-mstd0.5-incl'], ["'incl' is not a RandAugment setting", 'rand-m9-mstd0.5-inc1']),  # timm skips it
    (['--model_kwargs', '{"num_heads": 5}'], ['--model vit_tiny_patch16_224: AssertionError: dim should be divisible',
                                              'check the keyword arguments']),
    (['--start_epoch', '5'], ['--start_epoch 5 leaves no epoch of --epochs 1 to train']),
    (['--start_epoch', '-1'], ['--start_epoch -1 must be 0 or more']),
    (['--resume', 'CKPT', '--initialize', 'CKPT'], ['--resume continues a run', 'give one of them']),
    (['--global_batch_size', '8', '--update_freq', '3'],
     ['--update_freq 3 disagrees with --global_batch_size 8, which gives update_freq 2', 'give one of the two']),
])
def test_bad_run_settings_stop_before_training(flags, needles, tmp_path, data, capsys):
    if 'TEACHER' in flags:
        import timm
        torch.save(timm.create_model('vit_tiny_patch16_224', depth=1).state_dict(), tmp_path / 'teacher.pth')
        flags = [str(tmp_path / 'teacher.pth') if f == 'TEACHER' else f for f in flags]
    flags = [str(tmp_path / 'absent.pth') if f == 'CKPT' else f for f in flags]  # refused before it is read
    out = tmp_path / 'out'
    argv = [*TRAIN, '--data_path', data, '--epochs', '1', '--output_dir', str(out), *flags]
    expect_cli_error(main.main, argv, capsys, *needles)
    assert not os.path.exists(out / 'log.txt')


@pytest.mark.parametrize('flag,typo', [('--mixup_mode', 'elementwise'), ('--remode', 'pixl'),
                                       ('--train_interpolation', 'bicubc')])
def test_a_misspelt_choice_is_refused_by_name(flag, typo, capsys):
    """Values timm would take silently (Mixup's mode: the default then) or fail on mid-run (KeyError, assert)."""
    with pytest.raises(SystemExit) as stop:
        main.parse_args([flag, typo])
    assert stop.value.code == 2 and f"argument {flag}: invalid choice: '{typo}'" in capsys.readouterr().err


@pytest.mark.parametrize('flag', ['--output_dir', '--log_dir'])
def test_an_output_folder_that_cannot_be_made_stops_before_training(flag, tmp_path, data, capsys):
    (tmp_path / 'file').write_text('')
    argv = [*TRAIN, '--data_path', data, '--epochs', '1', flag, str(tmp_path / 'file' / 'sub')]
    expect_cli_error(main.main, argv, capsys, f'{flag} {tmp_path / "file" / "sub"}: cannot make it',
                     f'{tmp_path / "file"} is a file')
    expect_cli_error(main.main, [*TRAIN, '--data_path', data, '--epochs', '1', flag, str(tmp_path / 'file')],
                     capsys, f'{flag} {tmp_path / "file"} is a file; give a folder')
    assert sorted(os.listdir(tmp_path)) == ['file']


def test_a_vit_that_pads_runs_at_any_input_size(tmp_path, data):
    """timm's dynamic_img_pad pads the image to whole patches: no pixel is dropped, so any size trains."""
    record = main.main([*TRAIN, '--data_path', data, '--epochs', '1', '--input_size', '36', '--model_kwargs',
                        '{"patch_size": 8, "depth": 1, "dynamic_img_size": true, "dynamic_img_pad": true}'])
    assert math.isfinite(record['train_loss'])


def test_an_odd_batch_trains_without_mixup(tmp_path, data):
    record = main.main([*TRAIN, '--data_path', data, '--epochs', '1', '--batch_size', '3', '--mixup', '0',
                        '--cutmix', '0'])
    assert math.isfinite(record['train_loss'])


def test_abbreviated_flags_are_refused(data, capsys):
    """argparse would take --conf for --config, and the YAML file would be silently ignored (configs are found
    by their full flag)."""
    expect_cli_error(main.main, [*TRAIN, '--data_path', data, '--conf', 'configs/vit_tiny_cifar100.yaml'], capsys,
                     'unrecognized arguments: --conf configs/vit_tiny_cifar100.yaml')


def test_ema_held_on_the_cpu_cannot_be_evaluated_on_the_gpu(data, monkeypatch):
    """timm's --model_ema_force_cpu disables the EMA's evaluation; here it would fail after a whole epoch, on the
    GPU's batches: one line before any work."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    args = main.parse_args([*TRAIN, '--data_path', data, '--device', 'cuda', '--model_ema', 'true',
                            '--model_ema_force_cpu', 'true', '--model_ema_eval', 'true'])
    with pytest.raises(utils.UserError, match='pass --model_ema_eval false'):
        main.setup(args)
    args.device = 'cpu:0'  # on the CPU the EMA is evaluated where it is held
    assert main.setup(args).device.type == 'cpu'


def test_an_indexed_cuda_device_under_torchrun_is_refused(data, monkeypatch):
    """Each process takes the GPU of its local rank (NCCL and set_device do); --device cuda:1 on every rank
    would put all of them on one GPU, a hang or a traceback at the first collective."""
    monkeypatch.setenv('RANK', '1')
    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.setattr(utils, 'init_distributed', lambda args: pytest.fail('the check comes before joining'))
    args = main.parse_args([*TRAIN, '--data_path', data, '--device', 'cuda:1'])
    with pytest.raises(utils.UserError, match=r'--device cuda:1 under torchrun: .* pass --device cuda'):
        main.setup(args)


def test_device_names_that_torch_parses_pass_the_check(data):
    import config
    for name in ('cpu', 'cpu:0', 'cuda', 'cuda:1'):
        config.check_args(main.parse_args([*TRAIN, '--data_path', data, '--device', name]))


def test_unknown_data_set_is_caught_by_the_first_check(data):
    """Before any work: gpu_data's fit rule, run before the dataset is built on CUDA, looks the name up in its
    size table (a lowercase name there was a KeyError traceback)."""
    import config
    with pytest.raises(utils.UserError, match=r"unknown --data_set 'cifar10'; did you mean CIFAR10"):
        config.check_args(main.parse_args([*TRAIN, '--data_path', data, '--data_set', 'cifar10']))


@pytest.mark.parametrize('data_set', ['CIFAR10', 'image_folder'])
@pytest.mark.parametrize('run', [[], ['--knn_probe', '20']])
def test_missing_data_path_is_one_line(data_set, run, tmp_path, capsys):
    argv = [*TRAIN, '--data_set', data_set, '--output_dir', str(tmp_path / 'out'), *run]
    expect_cli_error(main.main, argv, capsys, f'--data_path is missing: give the folder that holds {data_set}')
    assert not os.path.exists(tmp_path / 'out')


def test_warmup_as_long_as_the_run_is_said_before_training(tmp_path, data, capsys):
    main.main([*TRAIN, '--data_path', data, '--epochs', '2', '--warmup_epochs', '2', '--save_ckpt', 'false'])
    out = capsys.readouterr().out
    assert 'warning: --warmup_epochs 2 is all of --epochs 2' in out
    assert out.index('warning: --warmup_epochs') < out.index('training epochs')


@pytest.mark.parametrize('yaml_text,needles', [
    ('epochs: 1.5\n', ["key 'epochs' must be an integer, got 1.5 (float)"]),
    ('lr: fast\n', ["key 'lr': invalid float value: 'fast'"]),
    ('init: magic\n', ["key 'init' must be one of timm, xavier"]),
    ('model_ema: 1\n', ["key 'model_ema' must be true or false, got 1 (int)"]),
    ('opt_betas: [0.9, high]\n', ["key 'opt_betas': invalid float value: 'high'"]),
    ('batch_size: true\n', ["key 'batch_size' must be an integer, got True (bool)"]),
    ('epochs:\n', ["key 'epochs' is empty (null); give a value, or leave the key out for the default 300"]),
    ('opt_betas: 0.9\n', ["key 'opt_betas' takes a list, e.g. [0.9]; got 0.9"]),
])
def test_yaml_value_of_the_wrong_type_names_key_and_file(yaml_text, needles, tmp_path, data, capsys):
    config = tmp_path / 'bad.yaml'
    config.write_text(yaml_text)
    expect_cli_error(main.main, ['--config', str(config), *TRAIN, '--data_path', data], capsys,
                     f'--config {config}', *needles)


def test_yaml_values_of_the_right_type_pass(tmp_path):
    config = tmp_path / 'ok.yaml'
    config.write_text('epochs: 3\nlr: 1\nmodel_ema: true\nopt_betas: [0.9, 0.99]\nmodel_kwargs: {depth: 2}\n'
                      'warmup_epochs: "5"\ndistill: logit\nclip_grad: null\n')
    args = main.parse_args(['--config', str(config)])
    assert (args.epochs, args.lr, args.model_ema, args.opt_betas) == (3, 1.0, True, [0.9, 0.99])
    assert isinstance(args.lr, float) and args.warmup_epochs == 5 and args.clip_grad is None


def test_output_dir_that_is_a_file_stops(tmp_path, data, teacher_file, capsys):
    path = tmp_path / 'taken'
    path.write_text('x')
    expect_cli_error(main.main, [*TRAIN, '--data_path', data, '--output_dir', str(path)], capsys,
                     f'--output_dir {path} is a file')
    argv = ['--model_type', 'vit', '--teacher_checkpoint', teacher_file, '--output_dir', str(path)]
    expect_cli_error(ws.main, argv, capsys, f'--output_dir {path} is a file')


# ---------------------------------------------------------------------------------------------- 6: nothing left behind

@pytest.mark.parametrize('flags,needle', [
    (['--input_size', '36'], 'not a multiple'),
    (['--initialize', 'missing.pth'], 'checkpoint not found'),
    (['--data_path', '/nonexistent'], 'is not a folder'),
    (['--epochs', '0'], '--epochs 0'),
])
def test_failed_run_creates_no_output_dir(flags, needle, tmp_path, data, capsys):
    out = tmp_path / 'new' / 'run'
    expect_cli_error(main.main, [*TRAIN, '--data_path', data, '--epochs', '1', '--output_dir', str(out), *flags],
                     capsys, needle)
    assert not (tmp_path / 'new').exists()


def test_failed_selection_creates_no_output_folder(tmp_path, teacher_file, capsys):
    out = tmp_path / 'ws_out'
    argv = ['--model_type', 'vit', '--teacher_checkpoint', teacher_file, '--student_kwargs', '{"depth": 0.5}',
            '--output_dir', str(out)]
    expect_cli_error(ws.main, argv, capsys)
    assert not out.exists()
    # a checkpoint of another family than --model_type's default teacher: the message says where the name came from
    expect_cli_error(ws.main, ['--model_type', 'convnext', '--teacher_checkpoint', teacher_file, '--output_dir',
                               str(out)], capsys, 'does not fit --teacher convnext_tiny',
                     '(the default teacher of --model_type convnext; name another with --pretrained_model)')
    assert not out.exists()
    ok = ['--model_type', 'vit', '--pretrained_model', 'vit_small_patch16_224', '--teacher_checkpoint', teacher_file,
          '--teacher_kwargs', '{"img_size": 32, "patch_size": 8, "depth": 2}',
          '--student_kwargs', '{"img_size": 32, "patch_size": 8, "depth": 2}', '--output_dir', str(out), '--quiet']
    ws.main(ok)
    assert os.listdir(out) == ['vit.pth']
    # main.py reads that folder as the official README passes it; a folder without the model's file is one line
    from models import build
    assert build.initialization_file(str(out), 'vit_tiny_patch16_224') == str(out / 'vit.pth')
    with pytest.raises(utils.UserError, match=r"is a folder without convnext.pth: a folder is read as the official"):
        build.initialization_file(str(out), 'convnext_femto')


# ---------------------------------------------------------------------------------------------- 11: summary line

def test_run_ends_with_one_summary_line(tmp_path, data, capsys):
    out = tmp_path / 'run'
    record = main.main([*TRAIN, '--data_path', data, '--epochs', '2', '--output_dir', str(out)])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    best = max(json.loads(line)['test_acc1'] for line in (out / 'log.txt').read_text().splitlines())
    assert re.fullmatch(rf"done in \d+m\d\ds: final test acc@1 {record['test_acc1']:.2f}, best {best:.2f} "
                        rf"\(epoch [01]\); checkpoints in {re.escape(str(out))}", last), last
    main.main([*TRAIN, '--data_path', data, '--epochs', '1', '--disable_eval', 'true'])
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith('no evaluation; nothing saved (no --output_dir)')


# ---------------------------------------------------------------------------------------------- 9: --help

@pytest.mark.parametrize('parser_fn', [main.get_args_parser, ws.get_args_parser])
def test_help_shows_every_flag_with_help_and_default(parser_fn, capsys):
    parser = parser_fn()
    undocumented = [a.dest for a in parser._actions if not (a.help or '').strip()]
    assert not undocumented
    with pytest.raises(SystemExit):
        parser.parse_args(['--help'])
    text = ' '.join(capsys.readouterr().out.split())  # unwrap the columns
    for action in parser._actions:
        assert action.option_strings[0] in text
    assert '(default: 300)' in text if parser_fn is main.get_args_parser else '(default: uniform)' in text
    assert '--trust_checkpoint TRUST_CHECKPOINT fully unpickle' in text


# ---------------------------------------------------------------------------------------------- 7: --eval

@pytest.mark.parametrize('name', ['checkpoint-0.pth', 'checkpoint-best.pth'])
def test_eval_takes_the_model_from_the_checkpoint(name, trained, data, capsys):
    argv = ['--eval', 'true', '--resume', str(trained / name), '--data_path', data, '--device', 'cpu',
            '--num_workers', '0', '--epochs', '0', '--lr', '0', '--warmup_epochs', '99']  # training-only: ignored
    stats = main.main(argv)
    out = capsys.readouterr().out
    assert '--model vit_tiny_patch16_224' in out and '--input_size 32' in out and 'patch_size' in out
    assert stats['n'] == 9
    expect_cli_error(main.main, [*argv, '--input_size', '36'], capsys, '--input_size 36')  # an explicit flag wins


# ---------------------------------------------------------------------------------------------- 5: unreadable images

@pytest.fixture
def broken_data(tmp_path):
    """An image folder with a truncated PNG in train/ and a text file named .jpg in val/."""
    root = write_image_folder(tmp_path / 'broken')
    png = tmp_path / 'broken' / 'train' / 'c1' / '3.png'
    png.write_bytes(png.read_bytes()[:200])
    (tmp_path / 'broken' / 'val' / 'c0' / 'notes.jpg').write_text('not an image')
    return root, str(png), str(tmp_path / 'broken' / 'val' / 'c0' / 'notes.jpg')


@pytest.mark.parametrize('workers,gpu_data', [('0', 'false'), ('2', 'false'), ('0', 'true')])
def test_unreadable_image_names_the_file_without_traceback(workers, gpu_data, broken_data, tmp_path, capsys):
    root, png, _ = broken_data
    argv = [*TRAIN, '--data_path', root, '--epochs', '1', '--num_workers', workers, '--gpu_data', gpu_data,
            '--output_dir', str(tmp_path / 'out')]
    line = expect_cli_error(main.main, argv, capsys, 'cannot read image', '--check_data true')
    assert 'broken' in line and ('3.png' in line or 'notes.jpg' in line)
    assert 'Traceback' not in line and 'worker' not in line


def test_check_data_lists_every_bad_image_before_training(broken_data, tmp_path, capsys):
    root, png, text = broken_data
    out = tmp_path / 'out'
    expect_cli_error(main.main, [*TRAIN, '--data_path', root, '--check_data', 'true', '--output_dir', str(out)],
                     capsys, '--check_data: 2 of', png, text)
    assert not out.exists()


def test_check_data_passes_a_good_folder(data, capsys):
    from types import SimpleNamespace
    import datasets
    datasets.check_images(SimpleNamespace(data_set='image_folder', data_path=data))
    assert 'all 33 images are readable' in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- 10: offline, torchrun

def test_download_failure_names_the_offline_route(tmp_path, monkeypatch, capsys):
    import datasets

    def no_network(self, root, *args, **kwargs):  # as torchvision: the folder made, then the download fails
        os.makedirs(os.path.join(root, 'cifar-10-batches-py'))
        raise OSError('[Errno -3] Temporary failure in name resolution')
    monkeypatch.setattr(datasets.datasets.CIFAR10, '__init__', no_network)
    root = tmp_path / 'data' / 'cifar10'
    argv = ['--data_set', 'CIFAR10', '--data_path', str(root), '--download', 'true', '--device', 'cpu',
            '--num_workers', '0', '--model', 'vit_tiny_patch16_224']
    expect_cli_error(main.main, argv, capsys, 'cannot download CIFAR10', 'name resolution',
                     f"place CIFAR10's files (torchvision's layout) under --data_path {root} by hand",
                     '--data_set image_folder')
    assert not os.path.exists(tmp_path / 'data')  # the empty folders it made are gone
    (root / 'mine').mkdir(parents=True)  # a folder that was there is left as it was
    expect_cli_error(main.main, argv, capsys, 'cannot download CIFAR10')
    assert sorted(os.listdir(root)) == ['cifar-10-batches-py', 'mine']
    expect_cli_error(main.main, argv[:-4] + ['--download', 'false', '--device', 'cpu'], capsys,
                     'CIFAR10 not found', '--download true', '--data_set image_folder')


@pytest.mark.parametrize('offline', ['1', 'true', 'ON'])
def test_offline_teacher_name_stops_at_once_naming_the_flag(offline, tmp_path, monkeypatch, capsys):
    import socket
    monkeypatch.setenv('HF_HUB_OFFLINE', offline)
    monkeypatch.setattr(socket, 'getaddrinfo', lambda *a, **k: pytest.fail('the network was tried'))
    expect_cli_error(ws.main, ['--teacher', 'vit_small_patch16_224', '--student', 'vit_tiny_patch16_224',
                               '--output', str(tmp_path / 'sel.pth')], capsys,
                     "offline (HF_HUB_OFFLINE is set): cannot fetch 'vit_small_patch16_224'",
                     'pass --teacher_checkpoint FILE')
    assert os.listdir(tmp_path) == []


def test_unreachable_hub_and_failed_download_are_one_line(tmp_path, monkeypatch):
    import socket
    from models import io
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
    monkeypatch.setenv('HF_ENDPOINT', 'https://hub.example')

    def no_address(host, port):
        assert host == 'hub.example'
        raise socket.gaierror('Temporary failure in name resolution')
    monkeypatch.setattr(socket, 'getaddrinfo', no_address)
    with pytest.raises(utils.UserError, match=r"^cannot reach hub\.example to fetch 'convnext_tiny' \(offline\?\); "
                                               r'pass --teacher_checkpoint FILE$'):
        io.load_pretrained('convnext_tiny')

    monkeypatch.setattr(socket, 'getaddrinfo', lambda host, port: [])

    def refused(*args, **kwargs):
        raise ConnectionError('403 Forbidden\n<html>...</html>')
    monkeypatch.setattr(io, 'create_model', refused)
    with pytest.raises(utils.UserError, match=r"^cannot fetch pretrained weights for 'convnext_tiny' "
                                               r'\(ConnectionError: 403 Forbidden\); offline, pass --teacher_checkpoint FILE$'):
        io.load_pretrained('convnext_tiny')


def test_first_line_of_an_error():
    assert utils.first_line(ValueError('bad value\nmore detail')) == 'bad value'
    assert utils.first_line(KeyError()) == 'KeyError'
    assert utils.first_line(OSError('x' * 300), limit=10) == 'xxxxxxx...'
    # a long line ends at its last whole sentence that fits, not mid-word (torch's truncated-zip message)
    long = 'Reading failed. This is an internal error. If you see this, your checkpoint file is probably corrupt.'
    assert utils.first_line(RuntimeError(long), limit=60) == 'Reading failed. This is an internal error.'


@pytest.mark.slow
def test_torchrun_child_error_comes_first_as_one_line(tmp_path):
    from conftest import free_port, run_script
    proc = run_script('-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={free_port()}', 'main.py',
                      '--epochs', '0', '--device', 'cpu', '--data_path', str(tmp_path), timeout=300)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith(('*', 'Setting'))]
    ours = 'error: --epochs 0: train at least one epoch (or evaluate with --eval true)'
    assert lines[0] == ours, proc.stderr  # each rank's line, before torchrun's own ChildFailedError report
    assert proc.stderr.index(ours) < proc.stderr.index('ChildFailedError')
    assert 'main.py", line' not in proc.stderr  # no frame of ours: the only traceback is torchrun's own


def test_eval_needs_only_the_evaluation_split(trained, data, tmp_path):
    import shutil
    shutil.copytree(os.path.join(data, 'val'), tmp_path / 'only_val' / 'val')
    stats = main.main(['--eval', 'true', '--resume', str(trained / 'checkpoint-best.pth'), '--device', 'cpu',
                       '--data_path', str(tmp_path / 'only_val'), '--num_workers', '0', '--batch_size', '1000'])
    assert stats['n'] == 9
