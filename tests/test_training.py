"""main.py / engine.py / datasets.py on tiny ImageFolders at 32 px, on the CPU."""
import json
import os

import numpy as np
import pytest
import torch

import main
import recipe
from models import build
from conftest import assert_clean_failure, expect_cli_error, free_port, run_script, run_torchrun, write_image_folder
from utils import UserError

TINY = ['--input_size', '32', '--data_set', 'image_folder', '--batch_size', '4', '--num_workers', '0',
        '--device', 'cpu', '--print_freq', '100', '--warmup_epochs', '1']
VIT = ['--model', 'vit_tiny_patch16_224', '--model_kwargs', '{"patch_size": 8}']
CONVNEXT = ['--model', 'convnext_femto_linear']


@pytest.fixture(scope='module')
def tiny_data(tmp_path_factory):
    """3 classes, 8 train and 4 val images each, of different sizes (resized to input_size)."""
    return write_image_folder(tmp_path_factory.mktemp('tiny'), val=4, varied_sizes=True)


def read_log(folder):
    with open(os.path.join(folder, 'log.txt')) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize('model', [VIT, CONVNEXT], ids=['vit_tiny', 'convnext_femto'])
@pytest.mark.slow
def test_two_epochs_write_log_config_and_checkpoints(tmp_path, tiny_data, model):
    out = str(tmp_path / 'run')
    main.main([*model, *TINY, '--data_path', tiny_data, '--epochs', '2', '--output_dir', out,
               '--model_ema', 'true', '--model_ema_eval', 'true', '--log_dir', str(tmp_path / 'tb')])
    log = read_log(out)
    assert [r['epoch'] for r in log] == [0, 1]
    for key in ('train_loss', 'train_lr', 'test_acc1', 'test_acc5', 'epoch_seconds', 'images_per_sec', 'test_acc1_ema'):
        assert key in log[0]
    assert all(np.isfinite(r['train_loss']) for r in log)
    files = set(os.listdir(out))
    assert {'checkpoint-0.pth', 'checkpoint-1.pth', 'checkpoint-best.pth', 'config.yaml', 'run_info.json'} <= files
    assert not [f for f in files if f.startswith('.tmp')]
    assert os.listdir(tmp_path / 'tb')
    # the saved config is a valid --config for the same run
    args = main.parse_args(['--config', os.path.join(out, 'config.yaml')])
    assert args.model == model[1] and args.epochs == 2


def test_logged_lr_is_the_schedules_with_layer_decay(tmp_path, tiny_data):
    """With --layer_decay the log gives the schedule's own lr (the largest group's, not a decayed one), as written
    out by recipe.cosine_schedule; the decayed groups: test_recipe.test_layer_decay_scales_the_lr_from_the_head_down."""
    record = main.main(['--model', 'vit_tiny_patch16_224', '--model_kwargs', '{"patch_size": 8, "depth": 2}', *TINY,
                        '--data_path', tiny_data, '--epochs', '2', '--warmup_epochs', '1',
                        '--lr', '1e-3', '--min_lr', '1e-5', '--layer_decay', '0.5', '--disable_eval', 'true'])
    steps = 24 // 4  # 24 training images, batch 4
    assert record['train_lr'] == pytest.approx(recipe.cosine_schedule(2 * steps - 1, 1e-3, 1e-5, 2 * steps, steps))


def test_eval_freq_evaluates_every_nth_epoch_and_the_last(tmp_path, tiny_data):
    out = str(tmp_path / 'run')
    main.main([*VIT, *TINY, '--data_path', tiny_data, '--epochs', '5', '--warmup_epochs', '1', '--eval_freq', '2',
               '--output_dir', out, '--save_ckpt_num', '1'])
    log = read_log(out)
    assert [r['epoch'] for r in log] == [0, 1, 2, 3, 4]
    assert ['test_acc1' in r for r in log] == [False, True, False, True, True]
    assert all('train_loss' in r for r in log)
    best = torch.load(os.path.join(out, 'checkpoint-best.pth'), weights_only=True)
    evaluated = [r for r in log if 'test_acc1' in r]
    first_best = max(evaluated, key=lambda r: (r['test_acc1'], -r['epoch']))
    assert (best['epoch'], best['acc1']) == (first_best['epoch'], first_best['test_acc1'])


def test_a_fresh_start_replaces_the_log_of_a_killed_start(tmp_path, tiny_data):
    """With no checkpoint to resume from (--save_ckpt false, or killed before the first), a restart trains from
    epoch 0 again: its log must not follow the dead start's lines."""
    out = str(tmp_path / 'run')
    flags = [*VIT, *TINY, '--data_path', tiny_data, '--warmup_epochs', '1', '--output_dir', out, '--save_ckpt', 'false']
    main.main([*flags, '--epochs', '2'])
    main.main([*flags, '--epochs', '3'])
    assert [r['epoch'] for r in read_log(out)] == [0, 1, 2]


def test_deterministic_mode_is_not_inherited_by_the_next_run_in_the_process(tmp_path):
    """The transfer study runs main.main() many times in one process: each run sets the mode it asks for."""
    try:
        for flag in ('true', 'false'):
            main.setup(main.parse_args(['--device', 'cpu', '--deterministic', flag, '--data_path', str(tmp_path),
                                        '--output_dir', str(tmp_path)]))
            assert torch.are_deterministic_algorithms_enabled() is (flag == 'true')
            assert torch.backends.cudnn.benchmark is (flag == 'false')
    finally:
        torch.use_deterministic_algorithms(False)


def test_per_sample_seeds_leave_the_cuda_generators_alone(tiny_data, monkeypatch):
    """With --num_workers 0 the per-sample seeding runs in the training process: it seeds and restores the CPU
    generators only, so the device's generator (drop path on a GPU) keeps its own sequence."""
    import datasets
    seeded = []
    monkeypatch.setattr(torch.cuda, 'manual_seed_all', lambda seed: seeded.append(seed))
    monkeypatch.setattr(torch.cuda, 'manual_seed', lambda seed: seeded.append(seed))

    class Draws(torch.utils.data.Dataset):  # an augmentation's random draw per sample
        def __len__(self):
            return 3

        def __getitem__(self, index):
            return torch.rand(2)
    dataset = datasets.PerSampleSeed(Draws(), seed=0)
    before = torch.get_rng_state()
    assert torch.equal(dataset[4], dataset[4]) and not torch.equal(dataset[4], dataset[1])  # epoch 1 vs 0
    assert torch.equal(torch.get_rng_state(), before) and seeded == []


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path, tiny_data):
    full, resumed = str(tmp_path / 'full'), str(tmp_path / 'resumed')
    common = [*VIT, *TINY, '--data_path', tiny_data, '--epochs', '2', '--mixup', '0.8']
    main.main([*common, '--output_dir', full])
    os.makedirs(resumed)
    # a run killed after epoch 0: only its first checkpoint and log line exist
    import shutil
    shutil.copy(os.path.join(full, 'checkpoint-0.pth'), resumed)
    with open(os.path.join(resumed, 'log.txt'), 'w') as f:
        f.write(json.dumps(read_log(full)[0]) + '\n')
    main.main([*common, '--output_dir', resumed])
    a = torch.load(os.path.join(full, 'checkpoint-1.pth'), weights_only=True)
    b = torch.load(os.path.join(resumed, 'checkpoint-1.pth'), weights_only=True)
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    sa, sb = a['optimizer']['state'], b['optimizer']['state']
    assert all(torch.equal(sa[i]['exp_avg'], sb[i]['exp_avg']) for i in sa)
    assert read_log(full)[1]['train_lr'] == read_log(resumed)[1]['train_lr']
    assert read_log(full)[1]['train_loss'] == read_log(resumed)[1]['train_loss']


def test_initialize_loads_exactly_the_selection(tmp_path):
    import timm
    import weight_selection as ws
    torch.manual_seed(0)
    teacher = timm.create_model('convnext_tiny', conv_mlp=True)
    student = timm.create_model('convnext_femto_linear', num_classes=7)
    sd, report = ws.select_weights(teacher, student)
    folder = tmp_path / 'official'
    folder.mkdir()
    torch.save({'model': sd, 'meta': {}}, folder / 'convnext.pth')
    # the folder form of the official README, into timm's convnext_femto (1x1-conv MLP), 10 classes
    args = main.parse_args(['--model', 'convnext_femto'])
    model = build.build_model(args, 10)
    build.load_initialization(model, str(folder), args)
    own = model.state_dict()
    for k, v in sd.items():
        if k.startswith('head.fc.'):
            assert own[k].shape[0] == 10  # another number of classes: the model's own head is kept
            continue
        assert torch.equal(own[k].reshape(v.shape), v), k
    # a file of another family is an error naming keys
    args = main.parse_args(['--model', 'vit_tiny_patch16_224'])
    with pytest.raises(UserError, match='does not fit --model vit_tiny_patch16_224: missing cls_token'):
        build.load_initialization(build.build_model(args, 1000), str(folder / 'convnext.pth'), args)


def test_initialize_made_for_another_input_size_names_the_fix(tmp_path):
    import timm
    torch.save(timm.create_model('vit_tiny_patch16_224', img_size=64).state_dict(), tmp_path / 'ws.pth')
    args = main.parse_args(['--model', 'vit_tiny_patch16_224', '--input_size', '32'])
    with pytest.raises(UserError, match=r'shape pos_embed .*for another input size or patch size: select again for '
                                        r'this model with weight_selection.py --student_kwargs \'\{"img_size": 32\}\''):
        build.load_initialization(build.build_model(args, 1000), str(tmp_path / 'ws.pth'), args)
    # the hint names the model's patch size too, and also holds where only the patch size differs (same grid)
    for selected in (dict(img_size=32), dict(img_size=64, patch_size=8)):
        torch.save(timm.create_model('vit_tiny_patch16_224', **selected).state_dict(), tmp_path / 'ws.pth')
        args = main.parse_args(['--model', 'vit_tiny_patch16_224', '--input_size', '32', '--model_kwargs',
                                '{"patch_size": 4}'])
        with pytest.raises(UserError, match=r'--student_kwargs \'\{"patch_size": 4, "img_size": 32\}\''):
            build.load_initialization(build.build_model(args, 1000), str(tmp_path / 'ws.pth'), args)
    # another width (a ViT-S file for a ViT-T) is not a matter of input size: no such hint
    torch.save(timm.create_model('vit_small_patch16_224', img_size=32, patch_size=8).state_dict(), tmp_path / 's.pth')
    args = main.parse_args(['--model', 'vit_tiny_patch16_224', '--input_size', '32', '--model_kwargs',
                            '{"patch_size": 8}'])
    with pytest.raises(UserError) as info:
        build.load_initialization(build.build_model(args, 1000), str(tmp_path / 's.pth'), args)
    assert 'pos_embed (1, 17, 384) vs (1, 17, 192)' in str(info.value) and 'input size' not in str(info.value)


def test_yaml_and_command_line_precedence(tmp_path):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text('lr: 0.001\nepochs: 7\nmodel: vit_tiny_patch16_224\nuse_amp: true\n')
    args = main.parse_args(['--config', str(cfg), '--epochs', '3'])
    assert args.lr == 0.001 and args.epochs == 3 and args.use_amp is True and args.model == 'vit_tiny_patch16_224'
    assert main.parse_args([]).epochs == 300  # the official default
    cfg.write_text('learning_rate: 0.1\n')
    with pytest.raises(UserError, match="unknown key 'learning_rate'"):
        main.parse_args(['--config', str(cfg)])


def test_warmup_then_cosine_values():
    args = main.parse_args(['--lr', '1e-3', '--min_lr', '1e-5', '--epochs', '10', '--warmup_epochs', '2'])
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=args.lr)
    sched = recipe.build_schedule(args, args.lr, steps_per_epoch=10, epochs=args.epochs)  # 100 steps, 20 of warmup

    def lr_at(step):
        sched(opt, step)
        return opt.param_groups[0]['lr']
    assert lr_at(0) == pytest.approx(0.0)
    assert lr_at(10) == pytest.approx(0.5e-3)
    assert lr_at(20) == pytest.approx(1e-3)
    assert lr_at(60) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))  # halfway through the cosine
    assert lr_at(100) == pytest.approx(1e-5)


def test_update_freq_from_global_batch():
    args = main.parse_args(['--batch_size', '64', '--global_batch_size', '512'])
    assert main.resolve_batch(args, 1) == (8, 512)
    assert main.resolve_batch(args, 4) == (2, 512)
    with pytest.raises(UserError, match='not a multiple'):
        main.resolve_batch(args, 3)


@pytest.mark.slow
def test_eval_only_prints_accuracy(tmp_path, tiny_data, capsys):
    out = str(tmp_path / 'run')
    record = main.main([*VIT, *TINY, '--data_path', tiny_data, '--epochs', '1', '--output_dir', out])
    capsys.readouterr()
    stats = main.main([*VIT, *TINY, '--data_path', tiny_data, '--eval', 'true',
                       '--resume', os.path.join(out, 'checkpoint-best.pth')])
    printed = capsys.readouterr().out
    assert 'acc@1' in printed and 'acc@5' in printed and 'on 12 test images' in printed
    assert stats['acc1'] == record['test_acc1']  # the best checkpoint is the only epoch
    assert 'other data' not in printed
    import shutil  # the same images elsewhere: evaluated all the same, with a line naming both folders
    other = shutil.copytree(tiny_data, tmp_path / 'other')
    again = main.main([*VIT, *TINY, '--data_path', str(other), '--eval', 'true',
                       '--resume', os.path.join(out, 'checkpoint-best.pth')])
    printed = capsys.readouterr().out
    assert again['acc1'] == stats['acc1']
    assert f"note: evaluating on other data than the checkpoint was trained on: --data_path {other} (the " \
           f"checkpoint's: {tiny_data})" in printed


def test_a_finished_run_keeps_its_record_and_refuses_fewer_epochs(tmp_path, tiny_data, capsys):
    """Launched again as it was, a finished run trains nothing and leaves its config.yaml as it ran; launched
    with fewer epochs than it trained, it stops in one line (its config.yaml would say 1 epoch of a 2-epoch log)."""
    out = tmp_path / 'run'
    run = [*VIT, *TINY, '--data_path', tiny_data, '--output_dir', str(out), '--disable_eval', 'true']
    main.main([*run, '--epochs', '2'])
    config = (out / 'config.yaml').read_text()
    assert main.main([*run, '--epochs', '2', '--print_freq', '7']) == {}
    assert (out / 'config.yaml').read_text() == config
    expect_cli_error(main.main, [*run, '--epochs', '1', '--warmup_epochs', '0'], capsys,
                     f"the run resumed from {out / 'checkpoint-1.pth'} has trained 2 epochs, more than --epochs 1",
                     'another --output_dir')
    assert (out / 'config.yaml').read_text() == config and len(read_log(out)) == 2


@pytest.mark.slow
def test_eval_under_torchrun_counts_every_image_once(tmp_path):
    """Two processes evaluate a share each of 9 test images (no padding duplicates) and sum: the accuracy, loss
    and count of one process."""
    data = write_image_folder(tmp_path / 'data', train=4, val=3)
    out = tmp_path / 'run'
    main.main([*VIT, *TINY, '--data_path', data, '--epochs', '1', '--output_dir', str(out)])
    flags = [*VIT, *TINY, '--data_path', data, '--eval', 'true', '--resume', str(out / 'checkpoint-0.pth')]
    one = main.main(flags)
    proc = run_torchrun('--nproc_per_node=2', f'--master_port={free_port()}', 'main.py', *flags, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert one['n'] == 9
    line = f"acc@1 {one['acc1']:.2f} acc@5 {one['acc5']:.2f} loss {one['loss']:.4f} on 9 test images"
    assert [s for s in proc.stdout.splitlines() if s.startswith('acc@1')] == [line]  # rank 0's line alone


@pytest.mark.slow
def test_official_readme_commands_parse_and_start(tmp_path, tiny_data):
    """The paper README's commands, with local paths, tiny data, one epoch; the first through the legacy
    launcher, the others in process (the same flags, without two interpreter start-ups each)."""
    teacher = tmp_path / 'vit_s.pth'
    import timm
    torch.save(timm.create_model('vit_small_patch16_224', num_classes=21843).state_dict(), teacher)
    ws_dir = tmp_path / 'ws'
    import weight_selection
    weight_selection.main(['--output_dir', str(ws_dir), '--model_type', 'vit', '--pretrained_model',
                           'vit_small_patch16_224_in21k', '--teacher_checkpoint', str(teacher),
                           '--student_kwargs', '{"img_size": 32}'])  # a 2x2 grid: the runs below train at 32 px
    cx_teacher = tmp_path / 'cx_t.pth'
    torch.save({'model': timm.create_model('convnext_tiny', num_classes=21841).state_dict()}, cx_teacher)
    weight_selection.main(['--output_dir', str(ws_dir), '--model_type', 'convnext', '--pretrained_model',
                           'convnext_tiny_in22k', '--teacher_checkpoint', str(cx_teacher)])
    commands = [
        '--model vit_tiny --warmup_epochs 50 --epochs 300 --batch_size 64 --lr 2e-3 --update_freq 1 --use_amp true',
        '--model convnext_femto --warmup_epochs 50 --epochs 300 --drop_path 0.1 --batch_size 128 --lr 4e-3 '
        '--update_freq 1 --use_amp true',
        '--model vit_tiny --epochs 300 --batch_size 128 --lr 4e-3 --update_freq 4 --use_amp true',
    ]
    for i, flags in enumerate(commands):
        out = tmp_path / f'out{i}'
        tiny = ['--data_set', 'image_folder', '--data_path', tiny_data, '--epochs', '1', '--warmup_epochs', '1',
                '--batch_size', '4', '--update_freq', '1', '--num_workers', '0', '--device', 'cpu', '--input_size', '32']
        argv = [*flags.split(), '--initialize', str(ws_dir), '--output_dir', str(out), *tiny]
        if i == 0:
            proc = run_script('-m', 'torch.distributed.launch', '--nproc_per_node=1', '--master_port',
                              str(free_port()), 'main.py', *argv)
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert 'initialized' in proc.stdout
        else:
            main.main(argv)
        assert len(read_log(out)) == 1


@pytest.mark.parametrize('args,needles', [
    (['--data_set', 'CIFAR1000'], ["unknown --data_set 'CIFAR1000'", 'CIFAR100']),
    (['--data_set', 'CIFAR10', '--data_path', 'EMPTY'], ['CIFAR10 not found', '--download true']),
    (['--data_path', 'MISSING'], ['is not a folder']),
    (['--data_path', 'EMPTY'], ['has no train/ folder']),
    (['--model', 'vit_tiny_patch99'], ["unknown model 'vit_tiny_patch99'"]),
    (['--model', 'vit_tinyy'], ["unknown model 'vit_tinyy'", 'did you mean vit_tiny_patch16_224,']),
    (['--config', 'BADCONFIG'], ["unknown key 'epoch'", 'epochs']),
    (['--initialize', 'CONVNEXT_STATE'], ['does not fit --model vit_tiny_patch16_224']),
    (['--resume', 'CONVNEXT_CKPT'], ['not of --model vit_tiny_patch16_224']),
    (['--resume', 'DEEPER_CKPT'], ['holds a vit_tiny of another shape (other --model_kwargs, or another number',
                                   'missing blocks.3.norm1.weight']),
    (['--initialize', 'missing.pth'], ['checkpoint not found']),
    (['--global_batch_size', '10'], ['not a multiple']),
    (['--lr', '1e30', '--print_freq', '1', '--epochs', '2', '--mixup', '0'], ['loss is', 'stopped']),
    (['--use_amp', 'maybe'], ['expected true or false']),
    (['--knn_probe', '-1'], ['--knn_probe -1', 'number of neighbours']),
])
def test_main_bad_input(tmp_path, tiny_data, capsys, args, needles):
    import timm
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'bad.yaml').write_text('epoch: 3\n')
    special = {'EMPTY': str(tmp_path / 'empty'), 'MISSING': str(tmp_path / 'nope'), 'BADCONFIG': str(tmp_path / 'bad.yaml')}
    if 'CONVNEXT_STATE' in args or 'CONVNEXT_CKPT' in args:
        sd = timm.create_model('convnext_atto').state_dict()
        torch.save(sd, tmp_path / 'cx.pth')
        torch.save({'model': sd, 'model_name': 'convnext_atto'}, tmp_path / 'cx_ckpt.pth')
        special.update(CONVNEXT_STATE=str(tmp_path / 'cx.pth'), CONVNEXT_CKPT=str(tmp_path / 'cx_ckpt.pth'))
    if 'DEEPER_CKPT' in args:  # the same model, 3 blocks deep where --model builds 12
        deeper = timm.create_model('vit_tiny_patch16_224', num_classes=3, img_size=32, patch_size=8, depth=3)
        torch.save({'model': deeper.state_dict(), 'model_name': 'vit_tiny'}, tmp_path / 'deeper.pth')  # an alias
        special['DEEPER_CKPT'] = str(tmp_path / 'deeper.pth')
    out = tmp_path / 'out'
    argv = [*VIT, *TINY, '--data_path', tiny_data, '--epochs', '1', '--output_dir', str(out)]
    argv += [special.get(a, a) for a in args]
    expect_cli_error(main.main, argv, capsys, *needles)
    written = os.listdir(out) if out.exists() else []
    assert not [f for f in written if f.startswith('checkpoint-') and f != 'checkpoint-0.pth'], written
    assert not [f for f in written if f.startswith('.tmp')]


@pytest.mark.slow
def test_main_cli_error_is_one_line_without_traceback(tmp_path, tiny_data):
    """The catalogue above runs in process; this is the real command line: one line, exit 1."""
    proc = run_script('main.py', *VIT, *TINY, '--data_path', str(tmp_path / 'nope'))
    assert proc.returncode == 1
    assert_clean_failure(proc, 'is not a folder')


class _Identity(torch.nn.Module):
    """timm's feature API on flattened inputs: the features are the pixels."""
    def forward_features(self, x):
        return x.flatten(1)

    def forward_head(self, x, pre_logits=False):
        assert pre_logits
        return x


def direct_vote(bank, bank_y, test, test_y, k, classes):
    """k-NN accuracy (%) written out plainly: cosine similarities, the k nearest, votes exp(sim / 0.07)."""
    a, b = torch.nn.functional.normalize(bank, dim=1), torch.nn.functional.normalize(test, dim=1)
    correct = 0
    for i in range(len(b)):
        sims = [(float(b[i] @ a[j]), int(bank_y[j])) for j in range(len(a))]
        votes = [0.0] * classes
        for sim, label in sorted(sims, reverse=True)[:k]:
            votes[label] += np.exp(sim / 0.07)
        correct += int(np.argmax(votes) == int(test_y[i]))
    return 100 * correct / len(b)


def test_knn_accuracy_matches_a_direct_weighted_vote():
    import engine
    g = torch.Generator().manual_seed(0)
    bank, bank_y = torch.randn(300, 8, generator=g), torch.randint(0, 4, (300,), generator=g)
    test, test_y = torch.randn(50, 8, generator=g), torch.randint(0, 4, (50,), generator=g)
    loader = lambda x, y: torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    got = engine.knn_accuracy(loader(bank, bank_y), loader(test, test_y), _Identity(), torch.device('cpu'), k=7)
    assert got == pytest.approx(direct_vote(bank, bank_y, test, test_y, 7, 4))
    # separable classes are found exactly
    centers = torch.randn(4, 8, generator=g) * 10
    noisy = lambda y: centers[y] + 0.1 * torch.randn(len(y), 8, generator=g)
    assert engine.knn_accuracy(loader(noisy(bank_y), bank_y), loader(noisy(test_y), test_y), _Identity(),
                               torch.device('cpu'), k=20) == 100


def test_knn_probe_of_raw_pixels_is_a_vote_over_the_images(tiny_data):
    """--knn_features pixels: the baseline a model's features must beat, the images themselves."""
    import datasets
    stats = main.main([*VIT, *TINY, '--data_path', tiny_data, '--knn_probe', '5', '--knn_features', 'pixels'])
    train_set, test_set, _ = datasets.knn_sets(main.parse_args([*VIT, *TINY, '--data_path', tiny_data]))
    flat = lambda ds: (torch.stack([x.flatten() for x, _ in ds]), torch.tensor([y for _, y in ds]))  # noqa: E731
    assert stats['features'] == 'pixels'
    assert stats['knn_acc1'] == pytest.approx(direct_vote(*flat(train_set), *flat(test_set), 5, 3))


def test_knn_probe_of_a_selection_writes_its_result(tmp_path, tiny_data, capsys):
    import timm
    import weight_selection
    teacher, ws = tmp_path / 'teacher.pth', tmp_path / 'ws.pth'
    torch.save(timm.create_model('vit_small_patch16_224', img_size=32, patch_size=8).state_dict(), teacher)
    weight_selection.main(['--teacher', 'vit_small_patch16_224', '--teacher_kwargs', '{"img_size": 32, "patch_size": 8}',
                           '--teacher_checkpoint', str(teacher), '--student', 'vit_tiny_patch16_224',
                           '--student_kwargs', '{"img_size": 32, "patch_size": 8}', '--output', str(ws), '--quiet'])
    out = tmp_path / 'knn'
    stats = main.main([*VIT, *TINY, '--data_path', tiny_data, '--knn_probe', '5', '--initialize', str(ws),
                       '--output_dir', str(out)])
    assert stats['n_train'] == 24 and stats['n_test'] == 12
    assert stats['knn_acc1'] * 12 / 100 == pytest.approx(round(stats['knn_acc1'] * 12 / 100))  # a count of 12
    assert json.loads((out / 'knn_probe.json').read_text()) == stats
    assert sorted(os.listdir(out)) == ['knn_probe.json']  # no training: no checkpoint, no log
    # --eval takes a checkpoint of main.py (its model flags, a trained head): a selection is named as one
    expect_cli_error(main.main, ['--eval', 'true', '--resume', str(ws), '--data_path', tiny_data], capsys,
                     f'--resume {ws} is a selection of weight_selection.py (--student vit_tiny_patch16_224)',
                     '--knn_probe 20 --initialize')


def _one_epoch(batches, update_freq=1, clip_grad=None, lr=1.0):
    """engine.train_one_epoch of a bias-free Linear under SGD on `batches` of (x, y), squared error; the weights
    before and after."""
    import engine
    model = torch.nn.Linear(3, 2, bias=False)
    before = model.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    criterion = lambda images, outputs, targets: ((outputs - targets) ** 2).mean()  # noqa: E731
    engine.train_one_epoch(model, criterion, batches, optimizer, torch.device('cpu'), 0, lambda opt, step: None,
                           update_freq=update_freq, clip_grad=clip_grad, print_freq=100)
    return before, model.weight.detach()


def test_accumulation_takes_one_step_of_the_mean_gradient():
    """update_freq 2 over two batches of 2 is one SGD step of the mean loss over the 4 samples, written out:
    d/dW mean((xW^T - y)^2) = 2 (xW^T - y)^T x / (4 samples x 2 outputs)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, generator=g), torch.randn(4, 2, generator=g)
    torch.manual_seed(0)
    before, after = _one_epoch([(x[:2], y[:2]), (x[2:], y[2:])], update_freq=2, lr=0.1)
    gradient = 2 * (x @ before.T - y).T @ x / 8
    torch.testing.assert_close(after, before - 0.1 * gradient)


def test_clip_grad_bounds_the_steps_gradient_norm():
    """--clip_grad 0.5: a step of gradient norm 0.5 when the gradient's is larger, the gradient's own below it."""
    g = torch.Generator().manual_seed(1)
    x, y = 100 * torch.randn(4, 3, generator=g), torch.randn(4, 2, generator=g)  # a gradient norm far above 0.5
    before, after = _one_epoch([(x, y)], clip_grad=0.5)
    assert (after - before).norm().item() == pytest.approx(0.5, rel=1e-5)  # lr 1: the step is the clipped gradient
    x, y = x / 1e3, y / 1e3
    before, after = _one_epoch([(x, y)], clip_grad=0.5)  # below the bound: the gradient itself
    torch.testing.assert_close(after, before - 2 * (x @ before.T - y).T @ x / 8)


@pytest.mark.slow
def test_knn_probe_under_torchrun_splits_the_images_and_shares_one_model(tmp_path):
    """Two processes, each extracting the features of its share of each split (datasets.rank_share: shares
    that make the split whole, each image once), from rank 0's random init (drawn from seed + rank, each would
    hold its own): the accuracy of one process. Images of noise, one neighbour: which test images find their
    class depends on the features, not on brightness."""
    import datasets
    shares = [list(datasets.rank_share(list(range(9)), r, 2)) for r in (0, 1)]
    assert sorted(shares[0] + shares[1]) == list(range(9)) and [len(s) for s in shares] == [5, 4]
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ('train', 'val'):
        for c in range(2):
            (tmp_path / 'noise' / split / f'c{c}').mkdir(parents=True)
            for i in range(16):
                Image.fromarray((rng.random((32, 32, 3)) * 255).astype('uint8')).save(
                    tmp_path / 'noise' / split / f'c{c}' / f'{i}.png')
    probe = [*VIT, *TINY, '--data_path', str(tmp_path / 'noise'), '--knn_probe', '1']
    one = main.main(probe)
    out = tmp_path / 'knn'
    proc = run_torchrun('--nproc_per_node=2', f'--master_port={free_port()}', 'main.py', *probe,
                        '--output_dir', str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / 'knn_probe.json').read_text()) == one
    assert proc.stdout.count('k-NN (k=1) acc@1') == 1  # said by rank 0 alone


def test_initialize_reads_timm_and_prefixed_wrappers(tmp_path):
    """timm train.py's {'state_dict': ...} and a --model_prefix on a .safetensors file both load."""
    from safetensors.torch import save_file
    args = main.parse_args(['--model', 'vit_tiny_patch16_224', '--model_kwargs', '{"patch_size": 8, "depth": 1}',
                            '--input_size', '32'])
    torch.manual_seed(0)
    source = build.build_model(args, 3).state_dict()
    torch.save({'state_dict': source, 'epoch': 3}, tmp_path / 'timm.pth')
    save_file({f'backbone.{k}': v.contiguous() for k, v in source.items()}, str(tmp_path / 'prefixed.safetensors'))
    for path, extra in [('timm.pth', []), ('prefixed.safetensors', ['--model_prefix', 'backbone.'])]:
        a = main.parse_args([*map(str, ['--model', 'vit_tiny_patch16_224', '--model_kwargs',
                                        '{"patch_size": 8, "depth": 1}', '--input_size', '32']), *extra])
        torch.manual_seed(1)
        model = build.build_model(a, 3)
        build.load_initialization(model, str(tmp_path / path), a)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in source.items()), path


def test_explicit_img_size_for_a_model_without_one_is_an_error():
    args = main.parse_args(['--model', 'convnext_atto', '--model_kwargs', '{"img_size": 64}'])
    with pytest.raises(UserError, match="img_size"):
        build.build_model(args, 3)


def test_a_training_checkpoint_initializes_a_run_on_other_classes(tmp_path, tiny_data, capsys):
    """Figure 4b's fine-tuning: --initialize takes a main.py checkpoint (its 'model'), keeps every tensor but the
    classifier, which has another number of classes, at the checkpoint's values."""
    vit = ['--model', 'vit_tiny_patch16_224', '--model_kwargs', '{"patch_size": 8, "depth": 2}', *TINY]
    pretrain = tmp_path / 'pretrain'
    main.main([*vit, '--data_path', tiny_data, '--epochs', '1', '--disable_eval', 'true', '--output_dir', str(pretrain)])
    init = pretrain / 'checkpoint-0.pth'
    args = main.parse_args([*vit, '--data_path', tiny_data, '--initialize', str(init)])
    model = build.initialize(build.build_model(args, 2), args)  # 2 classes where the pretraining had 3
    saved = torch.load(init, weights_only=True)['model']
    own = model.state_dict()
    assert set(own) == set(saved)
    for key, value in own.items():
        assert torch.equal(value, saved[key]) == (not key.startswith('head.')), key
    assert 'kept the model\'s own head.weight, head.bias (other number of classes)' in capsys.readouterr().out
