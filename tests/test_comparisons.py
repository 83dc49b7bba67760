"""The paper's comparisons: distillation losses, classic and mimetic init, linear probing, the per-table
runner, the results collector and the figures."""
import json
import math
import os
import shlex
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn.functional as F

import losses
import main
from models import build
import models  # noqa: F401
from conftest import ROOT, expect_cli_error, run_script, write_image_folder
from models.initializers import apply_init
from utils import UserError

SMALL = ['--model', 'vit_tiny_patch16_224', '--model_kwargs', '{"patch_size": 8, "depth": 2}', '--input_size', '32',
         '--data_set', 'image_folder', '--device', 'cpu', '--print_freq', '100', '--warmup_epochs', '1',
         '--batch_size', '4', '--num_workers', '0', '--epochs', '1']
TEACHER_KW = ['--distill_teacher', 'vit_small_patch16_224', '--distill_teacher_kwargs', '{"img_size": 32, "patch_size": 8}']


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp('data'), seed=2)


# ---------------------------------------------------------------------------------------------- distillation

def test_logit_distillation_matches_hand_computation():
    s = torch.tensor([[2.0, 0.0, -1.0]])
    t = torch.tensor([[0.5, 1.5, 0.0]])
    for tau in (1.0, 2.0):
        p_t = torch.softmax(t / tau, -1)
        p_s = torch.softmax(s / tau, -1)
        expected = tau * tau * sum(p_t[0, i] * math.log(p_t[0, i] / p_s[0, i]) for i in range(3))
        assert losses.logit_distillation(s, t, tau).item() == pytest.approx(float(expected), rel=1e-5)
    assert losses.logit_distillation(t, t).item() == pytest.approx(0.0, abs=1e-7)


def test_training_loss_adds_alpha_times_distillation():
    teacher = torch.nn.Linear(4, 3)
    base = torch.nn.CrossEntropyLoss()
    crit = losses.TrainingLoss(base, 'logit', teacher, alpha=0.5, tau=1.0)
    x, logits, y = torch.randn(5, 4), torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])
    expected = base(logits, y) + 0.5 * losses.logit_distillation(logits, teacher(x).detach())
    torch.testing.assert_close(crit(x, logits, y), expected)
    assert losses.TrainingLoss(base)(x, logits, y) == base(logits, y)


def test_feature_distillation_is_l1_to_teacher_pre_logits():
    torch.manual_seed(0)
    teacher = timm.create_model('vit_small_patch16_224', img_size=32, patch_size=8, num_classes=0).eval()
    student = losses.FeatureDistillStudent(timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8,
                                                             num_classes=3), teacher.num_features)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    logits, projected = student(x)
    assert logits.shape == (2, 3) and projected.shape == (2, 384)
    crit = losses.TrainingLoss(torch.nn.CrossEntropyLoss(), 'feature', teacher, alpha=2.0)
    with torch.no_grad():
        target = teacher(x)  # num_classes=0: the pre-logit features
    expected = F.cross_entropy(logits, y) + 2.0 * F.l1_loss(projected, target)
    torch.testing.assert_close(crit(x, (logits, projected), y), expected)


@pytest.mark.slow
def test_distillation_runs_end_to_end(tmp_path, data):
    t3 = tmp_path / 't3.pth'
    torch.save(timm.create_model('vit_small_patch16_224', img_size=32, patch_size=8, num_classes=3).state_dict(), t3)
    t0 = tmp_path / 't0.pth'
    torch.save(timm.create_model('vit_small_patch16_224', img_size=32, patch_size=8, num_classes=0).state_dict(), t0)
    main.main([*SMALL, '--data_path', data, '--distill', 'logit', *TEACHER_KW, '--distill_teacher_checkpoint', str(t3)])
    out = tmp_path / 'feature'
    main.main([*SMALL, '--data_path', data, '--distill', 'feature', *TEACHER_KW, '--distill_teacher_checkpoint', str(t0),
               '--output_dir', str(out)])
    ckpt = torch.load(out / 'checkpoint-0.pth', weights_only=True)
    assert set(ckpt['projector']) == {'0.weight', '0.bias', '2.weight', '2.bias'}
    assert not any(k.startswith('model.') for k in ckpt['model'])
    with pytest.raises(UserError, match='needs a teacher with the dataset'):
        main.main([*SMALL, '--data_path', data, '--distill', 'logit', *TEACHER_KW, '--distill_teacher_checkpoint', str(t0)])


# ---------------------------------------------------------------------------------------------- inits

def test_xavier_and_kaiming_statistics():
    torch.manual_seed(0)
    model = apply_init(timm.create_model('vit_tiny_patch16_224'), 'xavier')
    w = model.blocks[0].mlp.fc1.weight  # 768 x 192: uniform(-a, a), a = sqrt(6 / (fan_in + fan_out))
    assert w.std().item() == pytest.approx(math.sqrt(2 / (192 + 768)), rel=0.03)
    assert w.abs().max().item() <= math.sqrt(6 / (192 + 768)) + 1e-6
    assert model.blocks[0].mlp.fc1.bias.abs().max() == 0
    model = apply_init(timm.create_model('vit_tiny_patch16_224'), 'kaiming')
    assert model.blocks[0].mlp.fc2.weight.std().item() == pytest.approx(math.sqrt(2 / 768), rel=0.03)
    cx = apply_init(timm.create_model('convnext_femto_linear'), 'kaiming')
    assert cx.stages[0].blocks[0].conv_dw.weight.std().item() == pytest.approx(math.sqrt(2 / 49), rel=0.1)


def _diag_dominance(m):
    """Mean diagonal entry over mean absolute off-diagonal entry."""
    d = torch.diagonal(m)
    off = m - torch.diag(d)
    return (d.mean() / off.abs().mean()).item()


def test_mimetic_init_structure():
    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_patch16_224')
    random_qk = None
    attn = model.blocks[0].attn
    w = attn.qkv.weight.detach().view(3, 3, 64, 192)
    random_qk = _diag_dominance(w[0, 0].T @ w[1, 0])
    apply_init(model, 'mimetic')
    w = attn.qkv.weight.detach().view(3, 3, 64, 192)
    qk = w[0, 0].T @ w[1, 0]                                   # W_q,h^T W_k,h of head 0
    vo = attn.proj.weight.detach() @ attn.qkv.weight.detach()[384:]  # W_proj W_v
    assert _diag_dominance(qk) > 5 and abs(random_qk) < 1  # positive diagonal, well above the noise
    assert _diag_dominance(vo) < -5                          # negative diagonal
    torch.testing.assert_close(torch.diagonal(vo).mean(), torch.tensor(-0.4), atol=0.05, rtol=0)
    with pytest.raises(UserError, match='has none'):
        apply_init(timm.create_model('convnext_femto_linear'), 'mimetic')


def test_init_and_initialize_are_exclusive(data):
    with pytest.raises(UserError, match='choose one'):
        main.main([*SMALL, '--data_path', data, '--init', 'xavier', '--initialize', 'x.pth'])


# ---------------------------------------------------------------------------------------------- linear probe

@pytest.mark.parametrize('model', [['--model', 'vit_tiny_patch16_224', '--model_kwargs', '{"patch_size": 8, "depth": 2}'],
                                   ['--model', 'convnext_femto_linear', '--model_kwargs', '{}']], ids=['vit', 'convnext'])
def test_linear_probe_trains_only_the_head(tmp_path, data, model):
    flags = [*SMALL, *model, '--data_path', data, '--linear_probe', 'true', '--opt', 'lars', '--lr', '0.5',
             '--weight_decay', '0', '--mixup', '0', '--cutmix', '0', '--output_dir', str(tmp_path / 'probe')]
    args = main.parse_args(flags)
    torch.manual_seed(0)
    initial = build.prepare_linear_probe(build.build_model(args, 3)).state_dict()
    main.main(flags)
    trained = torch.load(tmp_path / 'probe' / 'checkpoint-0.pth', weights_only=True)['model']
    changed = {k for k in initial if initial[k].is_floating_point() and not torch.equal(initial[k], trained[k])}
    head = 'head.' if model[1].startswith('vit') else 'head.fc.'
    assert changed and all(k.startswith(head) for k in changed), changed
    assert f'{head}0.running_mean' in changed  # the BatchNorm without affine parameters
    assert f'{head}0.weight' not in trained


# ---------------------------------------------------------------------------------------------- tables

@pytest.mark.parametrize('table', [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 16, 17])
def test_table_scripts_print_valid_commands(table):
    env = dict(os.environ, DRY_RUN='1', DATA_ROOT='/data', OUTPUT='/out', SEEDS='0 1')
    proc = subprocess.run(['bash', os.path.join(ROOT, 'scripts', f'table{table}.sh')], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = [line[2:] for line in proc.stdout.splitlines() if line.startswith('+ ')]
    train = [line for line in lines if 'main.py' in line]
    assert train and all('--seed 0' in t or '--seed 1' in t for t in train)
    for line in train:
        config = line.split('--config ')[1].split()[0]
        assert os.path.isfile(config), config
        main.parse_args(shlex.split(line.split('main.py ', 1)[1]))  # every flag exists
    # every run folder is one the collector reads: table<N>/<row>/<dataset>/<model>/seed<S>
    for line in train:
        out = line.split('--output_dir ')[1].split()[0]
        assert out.startswith(f'/out/table{table}/') and out.rsplit('/', 1)[1].startswith('seed')


def test_table_rows_match_the_collector_paper_numbers():
    sys.path.insert(0, os.path.join(ROOT, 'scripts'))
    import collect_results
    import tables
    for n, paper in collect_results.PAPER.items():
        rows = {(tables.slug(row), d, m) for row, d, m, _, _ in tables.table(n)}
        assert set(paper) <= rows, (n, set(paper) - rows)


def write_run(folder, accs, config):
    """A run folder as main.py leaves it: log.txt with these test accuracies, config.yaml, and run_info.json
    with a command of no --config file (its recipe: main.py's defaults)."""
    folder.mkdir(parents=True)
    (folder / 'log.txt').write_text(''.join(json.dumps({'epoch': i, 'test_acc1': a}) + '\n' for i, a in enumerate(accs)))
    (folder / 'config.yaml').write_text(''.join(f'{k}: {v}\n' for k, v in config.items()))
    (folder / 'run_info.json').write_text(json.dumps({'command': ['main.py']}))


def test_collector_counts_each_seed_once_and_says_what_it_left_out(tmp_path):
    """Only tables.py's run folders count: a copy (seed0_rerun) would weigh seed 0 twice, a run without test
    accuracy would vanish silently, a folder named for another seed than it ran would be averaged as another
    seed, a run without its config.yaml cannot be shown as on-recipe, and a stray folder stops nothing."""
    cell = tmp_path / 'runs' / 'table2' / 'random_init' / 'cifar100' / 'vit_tiny'
    write_run(cell / 'seed0', [50.0], {'seed': 0})
    write_run(cell / 'seed0_rerun', [50.0], {'seed': 0})
    write_run(cell / 'seed1', [70.0], {'seed': 1})
    (cell / 'seed2').mkdir()
    (cell / 'seed2' / 'log.txt').write_text(json.dumps({'epoch': 0, 'train_loss': 1.0}) + '\n')
    write_run(tmp_path / 'runs' / 'table2_old' / 'random_init' / 'cifar100' / 'vit_tiny' / 'seed0', [1.0], {})
    write_run(tmp_path / 'runs' / 'fig4a' / 'random_init_50ep' / 'imagenet' / 'vit_tiny' / 'seed0', [1.0], {})
    proc = run_script(os.path.join('scripts', 'collect_results.py'), str(tmp_path / 'runs'), '--out', str(tmp_path / 'res'))
    assert proc.returncode == 0, proc.stderr
    md = (tmp_path / 'res' / 'tables.md').read_text()
    assert '| - / - / 81.4 | 60.0 ± 14.1 (n=2) / 60.0 ± 14.1 (n=2) / 72.3 |' in md  # (50 + 70) / 2; ConvNeXt-F's before
    for skipped in ('seed0_rerun: not a run folder', 'seed2: it logged no test accuracy', 'table2_old'):
        assert skipped.split(':')[0] in proc.stderr and skipped.split(': ')[-1] in proc.stderr, skipped
    assert 'fig4a' not in proc.stderr  # Figure 4's runs are figures.py's, beside the tables: no note
    (cell / 'seed1' / 'config.yaml').write_text('seed: 0\n')  # seed 0's run again, in seed 1's folder
    (cell / 'seed0' / 'config.yaml').unlink()
    run_script(os.path.join('scripts', 'collect_results.py'), str(tmp_path / 'runs'), '--out', str(tmp_path / 'res'))
    md = (tmp_path / 'res' / 'tables.md').read_text()
    assert '60.0 ± 14.1 (n=2) / 60.0 ± 14.1 (n=2) / 72.3 [off recipe: 1] |' in md
    assert ('1. random_init, cifar100 vit_tiny: seed0: recipe not checked (no readable config.yaml); '
            'seed1: seed 0 (its folder says seed1)') in md


def test_collector_on_fixture_logs(tmp_path):
    for seed, accs in [(0, [70.0, 81.0, 80.5]), (1, [71.0, 82.0, 81.0])]:
        folder = tmp_path / 'runs' / 'table7' / 'weight_selection' / 'cifar100' / 'vit_tiny' / f'seed{seed}'
        folder.mkdir(parents=True)
        (folder / 'log.txt').write_text(''.join(json.dumps({'epoch': i, 'test_acc1': a}) + '\n' for i, a in enumerate(accs)))
    proc = run_script(os.path.join('scripts', 'collect_results.py'), str(tmp_path / 'runs'), '--out', str(tmp_path / 'res'))
    assert proc.returncode == 0, proc.stderr
    md = (tmp_path / 'res' / 'tables.md').read_text()
    # best epochs 81.0, 82.0 and final epochs 80.5, 81.0, then the paper's number
    assert '## Table 7' in md and '81.5 ± 0.7 (n=2) / 80.8 ± 0.4 (n=2) / 81.4' in md and '- / - / 79.5' in md
    csv_text = (tmp_path / 'res' / 'tables.csv').read_text()
    assert '7,weight_selection,cifar100,vit_tiny,2,81.50,0.71,81.50,80.75,0.35,80.75,81.4' in csv_text


def test_table3_random_selections_are_the_median_of_three(tmp_path):
    """Table 3's random rows are "the median performance of three different selection results": they run
    selections 0, 1 and 2, each its own file, all trained with the same training seed (so that the spread is the
    selection's), the other rows one run per training seed; the collector reports those rows' median, the
    others' mean."""
    sys.path.insert(0, os.path.join(ROOT, 'scripts'))
    import tables
    env = {'DATA_ROOT': '/data', 'OUTPUT': '/out', 'MODELS': 'vit_tiny'}
    cmds = [shlex.join(c) for c in tables.commands(3, env)]

    def trainings(cmds, row):  # (run folder, training seed, selection file) of each training of the row
        return sorted((c.split('--output_dir ')[1].split()[0].rsplit('/', 1)[1], c.split('--seed ')[1].split()[0],
                       c.split('--initialize ')[1].split()[0] if '--initialize' in c else None)
                      for c in cmds if f'/table3/{row}/' in c)

    ws = '/out/ws/vit_tiny_patch16_224_vit_small_patch16_224_augreg_in21k_first_random_s'
    assert trainings(cmds, 'ws_random') == [(f'seed0_selection{s}', '0', f'{ws}{s}.pth') for s in '012']
    assert [run[:2] for run in trainings(cmds, 'ws_random_w_o_consistency')] == [
        ('seed0_selection0', '0'), ('seed0_selection1', '0'), ('seed0_selection2', '0')]
    assert trainings(cmds, 'xavier') == [('seed0', '0', None)]
    assert [run[:2] for run in trainings(cmds, 'ws_uniform')] == [('seed0', '0')]
    selections = [c for c in cmds if 'weight_selection.py' in c and '--element_selection random ' in c]
    assert sorted(c.split('--output ')[1] for c in selections) == [f'{ws}{s}.pth' for s in '012']
    assert sorted(c.split('--seed ')[1].split()[0] for c in selections) == ['0', '1', '2']
    more = [shlex.join(c) for c in tables.commands(3, dict(env, SEEDS='4 5', SELECTION_SEEDS='7'))]
    assert [run[:2] for run in trainings(more, 'ws_random')] == [('seed4_selection7', '4'), ('seed5_selection7', '5')]
    assert [run[:2] for run in trainings(more, 'xavier')] == [('seed4', '4'), ('seed5', '5')]

    def write_runs(root, runs):
        for row, name, acc in runs:
            folder = root / 'table3' / row / 'cifar100' / 'vit_tiny' / name
            write_run(folder, [acc], {'seed': int(name[4:].split('_')[0])})

    def collected(root):
        proc = run_script(os.path.join('scripts', 'collect_results.py'), str(root), '--out', str(root / 'res'))
        assert proc.returncode == 0, proc.stderr
        return (root / 'res' / 'tables.md').read_text(), proc.stderr

    accs = [80.0, 70.0, 81.0]
    write_runs(tmp_path / 'one', [('ws_random', f'seed0_selection{s}', a) for s, a in enumerate(accs)]
               + [('ws_uniform', f'seed{s}', a) for s, a in enumerate(accs)])
    md, _ = collected(tmp_path / 'one')
    assert '| ws_random | - / - / 83.9 | median 80.0 (n=3) / median 80.0 (n=3) / 81.7 |' in md
    assert '| ws_uniform | - / - / 84.4 | 77.0 ± 6.1 (n=3) / 77.0 ± 6.1 (n=3) / 81.4 |' in md
    # with two training seeds, the median over selections per training seed (80 and 85), then their mean ± std:
    # not one median over six runs, which would mix the two spreads (it would say 80.5); a seed<T> folder in a
    # median row (not what tables.py writes there) is left out, with a note
    write_runs(tmp_path / 'two', [('ws_random', f'seed{t}_selection{s}', a + 5 * t) for t in (0, 1)
                                  for s, a in enumerate(accs)] + [('ws_random', 'seed7', 10.0)])
    md, err = collected(tmp_path / 'two')
    assert '| ws_random | - / - / 83.9 | medians 82.5 ± 3.5 (n=6, 2 seeds) / medians 82.5 ± 3.5 (n=6, 2 seeds) / 81.7 |' \
        in md, md
    assert 'skipped' in err and 'seed7' in err
    csv_text = (tmp_path / 'two' / 'res' / 'tables.csv').read_text()
    assert '3,ws_random,cifar100,vit_tiny,6,82.50,3.54,82.50,82.50,3.54,82.50,81.7' in csv_text


def test_collector_marks_runs_that_left_their_recipe(tmp_path):
    """A run's config.yaml against main.py's defaults as the --config files of its command set them: a trial at 32 px for 1 epoch, and a run
    killed after 2 of its 3 epochs, are marked and listed; a run as its recipe says is not, nor one whose row
    sets a flag of its own (Table 6's --model)."""
    recipe = tmp_path / 'vit_tiny_cifar100.yaml'
    recipe.write_text('epochs: 3\ninput_size: 224\nlr: 0.002\nmodel: vit_tiny_patch16_224\n')
    as_recipe = {'epochs': 3, 'input_size': 224, 'lr': 0.002, 'model': 'vit_tiny_patch16_224'}
    runs = {(7, 'weight_selection'): [({**as_recipe, 'epochs': 1, 'input_size': 32}, 1)],
            (7, 'random_init'): [(as_recipe, 3), (as_recipe, 2)],
            (6, 'first_n_layer_selection'): [({**as_recipe, 'model': 'vit_a_patch16_224'}, 3)]}
    for (table, row), seeds in runs.items():
        for seed, (config, logged) in enumerate(seeds):
            folder = tmp_path / 'runs' / f'table{table}' / row / 'cifar100' / 'vit_tiny' / f'seed{seed}'
            folder.mkdir(parents=True)
            (folder / 'config.yaml').write_text(''.join(f'{k}: {v}\n' for k, v in config.items()))
            (folder / 'run_info.json').write_text(json.dumps({'command': ['main.py', '--config', str(recipe)]}))
            (folder / 'log.txt').write_text(''.join(json.dumps({'epoch': i, 'test_acc1': 50.0}) + '\n'
                                                    for i in range(logged)))
    proc = run_script(os.path.join('scripts', 'collect_results.py'), str(tmp_path / 'runs'), '--out', str(tmp_path / 'res'))
    assert proc.returncode == 0, proc.stderr
    md = (tmp_path / 'res' / 'tables.md').read_text()
    assert '| - / - / 84.4 | 50.0 / 50.0 / 81.4 [off recipe: 2] |' in md  # ConvNeXt-F's column, then ViT-T's
    assert '| - / - / 81.4 | 50.0 ± 0.0 (n=2) / 50.0 ± 0.0 (n=2) / 72.3 [off recipe: 1] |' in md
    assert '1. random_init, cifar100 vit_tiny: seed1: unfinished (2 of 3 epochs logged)\n' in md  # seed0: as said
    assert '2. weight_selection, cifar100 vit_tiny: seed0: epochs 1 (recipe 3), input_size 32 (recipe 224)\n' in md
    assert md.count('[off recipe') == 2 and '| first_n_layer_selection | - / - / 84.4 | 50.0 / 50.0 / 77.6 |' in md
    assert 'seed0: epochs 1 (recipe 3), input_size 32 (recipe 224)' in (tmp_path / 'res' / 'tables.csv').read_text()


def test_recipe_departures_read_the_recipe_as_main_does(tmp_path):
    """2e-3 (a string to YAML, a float to main.py) is the recipe's 0.002; another per-GPU batch at the recipe's
    global batch is the recipe; a flag the files leave at main.py's default is compared with it; a relative --config is found from the folder the run started in; a run whose
    recipe file is gone says it could not be checked, and that it did not finish."""
    sys.path.insert(0, os.path.join(ROOT, 'scripts'))
    import collect_results
    (tmp_path / 'configs').mkdir()
    (tmp_path / 'configs' / 'r.yaml').write_text('lr: 2e-3\nglobal_batch_size: 512\nbatch_size: 64\nepochs: 2\n')
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'config.yaml').write_text('lr: 0.002\nglobal_batch_size: 512\nbatch_size: 32\nepochs: 2\n')
    (run / 'log.txt').write_text(json.dumps({'epoch': 0, 'test_acc1': 1.0}) + '\n')
    info = {'command': ['main.py', '--config', 'configs/r.yaml'], 'cwd': str(tmp_path)}
    (run / 'run_info.json').write_text(json.dumps(info))
    assert collect_results.recipe_departures(str(run), 'seed0') == ['seed0: unfinished (1 of 2 epochs logged)']
    (run / 'config.yaml').write_text('lr: 0.001\nglobal_batch_size: 512\nbatch_size: 32\nepochs: 1\n')
    assert collect_results.recipe_departures(str(run), 'seed0') == ['seed0: lr 0.001 (recipe 0.002), epochs 1 (recipe 2)']
    # a setting the recipe files leave at main.py's default (the model's shape) counts; where the run ran does not
    # (and flags main.py ignores do not); a selection row's --initialize is its own, a random-init row has none
    (run / 'config.yaml').write_text('lr: 0.002\nepochs: 2\nmodel_kwargs: \'{"depth": 2}\'\nclip_grad: 1.0\n'
                                     'data_path: /elsewhere\nseed: 3\nnum_workers: 2\nnb_classes: 100\n'
                                     'initialize: ws.pth\n')
    assert collect_results.recipe_departures(str(run), 'seed0') == [
        'seed0: model_kwargs {"depth": 2} (recipe none), clip_grad 1.0 (recipe none), initialize ws.pth (recipe none), '
        'seed 3 (its folder says seed0), unfinished (1 of 2 epochs logged)']
    own = collect_results.row_flags(2, 'weight_selection', 'cifar100', 'vit_tiny')
    assert own == {'initialize'} and collect_results.row_flags(2, 'random_init', 'cifar100', 'vit_tiny') == set()
    assert 'initialize' not in collect_results.recipe_departures(str(run), 'seed0', own)[0]
    (run / 'run_info.json').write_text(json.dumps(dict(info, cwd=str(tmp_path / 'elsewhere'))))
    (run / 'config.yaml').write_text('lr: 0.001\nepochs: 3\n')
    assert collect_results.recipe_departures(str(run), 'seed0') == [
        'seed0: recipe not checked (run_info.json or the --config files of its command are gone), '
        'unfinished (1 of 3 epochs logged)']


# ---------------------------------------------------------------------------------------------- figures

def test_curves_join_the_evaluated_epochs_of_an_eval_freq_run(tmp_path):
    pytest.importorskip('matplotlib', reason='figures need matplotlib (requirements-figures.txt)')
    folder = tmp_path / 'run'
    folder.mkdir()
    log = [{'epoch': i, 'train_loss': 3.0 - i, **({'test_acc1': 10.0 * i} if i % 2 or i == 4 else {})} for i in range(5)]
    (folder / 'log.txt').write_text(''.join(json.dumps(r) + '\n' for r in log))
    sys.path.insert(0, os.path.join(ROOT, 'scripts'))
    import figures
    figures.plot_curves([str(folder)], [None], str(tmp_path / 'curves.png'))
    plt = figures._plt()
    acc, loss = plt.gcf().axes
    assert acc.lines[0].get_xydata().tolist() == [[1, 10.0], [3, 30.0], [4, 40.0]]  # one line, no gaps
    assert len(loss.lines[0].get_xdata()) == 5
    plt.close('all')


def _figure_run(folder, epochs, finals, config='', cwd=None):
    """A run folder: `finals` test acc@1 (the last one the final), `epochs` in its config.yaml."""
    folder.mkdir(parents=True)
    (folder / 'log.txt').write_text(''.join(json.dumps({'epoch': i, 'test_acc1': a, 'train_loss': 1.0}) + '\n'
                                            for i, a in enumerate(finals)))
    (folder / 'config.yaml').write_text(f'epochs: {epochs}\n{config}')
    if cwd:
        (folder / 'run_info.json').write_text(json.dumps({'cwd': str(cwd)}))
    return str(folder)


def test_budget_and_pretraining_figures_plot_the_mean_of_finished_runs(tmp_path, capsys, monkeypatch):
    """Figure 4a: two seeds of one budget are one point at their mean, with their std as an error bar, and an
    unfinished run is left out with a note. Figure 4b: a relative --initialize is read from the folder the run
    started in (run_info.json), wherever the script runs; every horizontal line is drawn, each labelled by what
    the run started from."""
    pytest.importorskip('matplotlib', reason='figures need matplotlib (requirements-figures.txt)')
    sys.path.insert(0, os.path.join(ROOT, 'scripts'))
    import figures
    runs = [_figure_run(tmp_path / f'b{e}_{s}', e, [0.0] * (e - 1) + [acc])
            for e, s, acc in [(2, 0, 50.0), (2, 1, 60.0), (4, 0, 70.0), (4, 1, 74.0)]]
    runs.append(_figure_run(tmp_path / 'unfinished', 8, [0.0, 99.0]))
    figures.plot_budget(runs, [None] * len(runs), str(tmp_path / 'budget.png'))
    plt = figures._plt()
    ax = plt.gcf().axes[0]
    assert ax.lines[0].get_xydata().tolist() == [[2, 55.0], [4, 72.0]]  # the unfinished run's 99 is no point
    assert ax.get_legend_handles_labels()[1] == ['random init']
    bar = ax.containers[0].lines[2][0].get_segments()  # the error bars: mean ± std of 50, 60 and of 70, 74
    assert [[round(v, 3) for v in (seg[0][1], seg[1][1])] for seg in bar] == [[47.929, 62.071], [69.172, 74.828]]
    assert f'note: left out {runs[-1]}: unfinished (2 of 8 epochs logged)' in capsys.readouterr().err
    plt.close('all')
    started = tmp_path / 'started_here'
    _figure_run(started / 'pre', 5, [0.0] * 5)
    finetune = _figure_run(tmp_path / 'ft', 1, [42.0], 'initialize: pre/checkpoint-4.pth\n', cwd=started)
    others = [_figure_run(tmp_path / f'o{i}', 1, [float(i)], config) for i, config in enumerate(
        ['', 'initialize: ws.pth\n', 'init: mimetic\n', 'distill: logit\n', 'init: xavier\n'])]
    monkeypatch.chdir(tmp_path)  # not the folder the runs started in
    figures.plot_pretraining([finetune, *others], [None] * 6, str(tmp_path / 'pre.png'))
    ax = plt.gcf().axes[0]
    assert ax.lines[0].get_xydata().tolist() == [[5, 42.0]]
    assert 'pretraining + fine-tuning' in ax.get_legend_handles_labels()[1]
    assert [(line.get_label(), line.get_ydata()[0]) for line in ax.lines if not line.get_label().startswith('_')] == [
        ('random init', 0.0), ('weight selection', 1.0), ('mimetic init', 2.0),
        ('random init + logit distillation', 3.0), ('xavier init', 4.0)]
    plt.close('all')


@pytest.mark.slow
def test_figures_are_written(tmp_path, capsys):
    pytest.importorskip('matplotlib', reason='figures need matplotlib (requirements-figures.txt)')
    runs = []
    for name, init in [('random', None), ('ws', 'ws.pth')]:
        folder = tmp_path / name
        folder.mkdir()
        (folder / 'log.txt').write_text(''.join(json.dumps({'epoch': i, 'test_acc1': 10.0 * i, 'train_loss': 3 - i})
                                                + '\n' for i in range(3)))
        (folder / 'config.yaml').write_text(f'epochs: 3\ninitialize: {init or "null"}\n')
        runs.append(str(folder))
    sys.path.insert(0, os.path.join(ROOT, 'scripts'))
    import figures  # in process: the CLI's main(), without an interpreter start-up per figure
    # Figure 4b: a run initialized from a pretraining run's checkpoint is a point at that run's epochs
    pretrain, finetune = tmp_path / 'pretrain', tmp_path / 'finetune'
    pretrain.mkdir(), finetune.mkdir()
    (pretrain / 'config.yaml').write_text('epochs: 5\n')
    (finetune / 'log.txt').write_text(json.dumps({'epoch': 0, 'test_acc1': 42.0, 'train_loss': 1.0}) + '\n')
    (finetune / 'config.yaml').write_text(f'epochs: 1\ninitialize: {pretrain / "checkpoint-4.pth"}\n')
    configs = [figures.read_run(folder)[1] for folder in (*runs, finetune)]
    assert [figures.pretraining_epochs(c, f) for c, f in zip(configs, (*runs, finetune))] == [None, None, 5]
    for figure in ('curves', 'budget', 'pretraining'):
        figures.main([figure, *runs, *([str(finetune)] if figure == 'pretraining' else []),
                      '--out', str(tmp_path / f'{figure}.png')])
        assert (tmp_path / f'{figure}.png').read_bytes()[:4] == b'\x89PNG'
    teacher = tmp_path / 't.pth'
    torch.save(timm.create_model('vit_small_patch16_224', img_size=32, patch_size=8).state_dict(), teacher)
    sel = tmp_path / 'sel.pth'
    import weight_selection
    weight_selection.main(['--teacher', 'vit_small_patch16_224', '--teacher_checkpoint', str(teacher),
                           '--teacher_kwargs', '{"img_size": 32, "patch_size": 8}', '--student', 'vit_tiny_patch16_224',
                           '--student_kwargs', '{"img_size": 32, "patch_size": 8}', '--output', str(sel), '--quiet'])
    proc = run_script(os.path.join('scripts', 'figures.py'), 'attention', '--teacher', 'vit_small_patch16_224',
                      '--teacher_checkpoint', str(teacher), '--teacher_kwargs', '{"img_size": 32, "patch_size": 8}',
                      '--selection', str(sel), '--student', 'vit_tiny_patch16_224',
                      '--student_kwargs', '{"img_size": 32, "patch_size": 8}', '--out', str(tmp_path / 'attn.png'))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / 'attn.png').stat().st_size > 1000
    # a model or block the figure cannot show: one line each, no figure
    common = ['attention', '--teacher', 'vit_small_patch16_224', '--teacher_checkpoint', str(teacher),
              '--teacher_kwargs', '{"img_size": 32, "patch_size": 8}', '--selection', str(sel),
              '--out', str(tmp_path / 'bad.png')]
    vit_t = ['--student', 'vit_tiny_patch16_224', '--student_kwargs', '{"img_size": 32, "patch_size": 8}']
    expect_cli_error(figures.main, [*common, *vit_t, '--block', '12'], capsys,
                     '--block 12 --head 0: the student has blocks 0..11 and heads 0..2')
    expect_cli_error(figures.main, [*common, '--student', 'convnext_atto'], capsys,
                     '--student convnext_atto is a ConvNeXt: the attention figure needs a timm ViT')
    assert not (tmp_path / 'bad.png').exists()
    expect_cli_error(figures.main, ['curves', *runs, '--out', str(tmp_path / 'nodir' / 'f.png')], capsys,
                     f"--out {tmp_path / 'nodir' / 'f.png'}: folder {tmp_path / 'nodir'} does not exist")
