"""recipe.py and what each table's commands resolve to, against the paper (Appendix A, Tables 13-15) and the
official release's defaults, written out here by hand."""
import os
import shlex
import sys

import pytest
import torch

import main
import recipe
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import tables  # noqa: E402


def test_configs_are_generated_from_the_recipe():
    """configs/*.yaml are exactly what `python recipe.py --write_configs` writes: one source of truth."""
    files = recipe.config_files()
    assert sorted(files) == sorted(os.listdir(os.path.join(ROOT, 'configs')))
    for name, (values, about) in files.items():
        with open(os.path.join(ROOT, 'configs', name)) as f:
            assert f.read() == recipe.render_config(name, values, about), f'{name}: run python recipe.py --write_configs'


# (global batch, warmup epochs, epochs, drop path) copied from the paper's Tables 14 and 15.
PAPER_T14 = {'cifar10': (1024, 50, 300, 0.1), 'pets': (128, 100, 600, 0.1), 'stl10': (128, 50, 300, 0.0),
             'dtd': (128, 100, 600, 0.2), 'svhn': (1024, 10, 50, 0.1), 'eurosat': (512, 50, 300, 0.1),
             'imagenet': (4096, 50, 300, 0.0)}
PAPER_T15 = {'cifar100': (512, 50, 300), 'flowers': (512, 100, 600), 'svhn': (512, 10, 50), 'imagenet': (4096, 50, 300)}


def test_configs_hold_tables_13_to_15():
    def parsed(name):
        return main.parse_args(['--config', os.path.join(ROOT, 'configs', name)])
    for dataset, (batch, warmup, epochs, drop_path) in PAPER_T14.items():
        a = parsed(f'convnext_femto_{dataset}.yaml')
        assert (a.global_batch_size, a.warmup_epochs, a.epochs, a.drop_path, a.lr) == (batch, warmup, epochs, drop_path, 4e-3)
    for dataset, (batch, warmup, epochs) in PAPER_T15.items():
        a = parsed(f'vit_tiny_{dataset}.yaml')
        lr = 4e-3 if dataset == 'imagenet' else 2e-3
        assert (a.global_batch_size, a.warmup_epochs, a.epochs, a.lr) == (batch, warmup, epochs, lr)
    a = parsed('vit_tiny_cifar10.yaml')  # Table 13
    assert (a.opt, a.weight_decay, a.aa, a.mixup, a.cutmix, a.reprob, a.smoothing, a.layer_scale_init_value) == \
        ('adamw', 0.05, 'rand-m9-mstd0.5-inc1', 0.8, 1.0, 0.25, 0.1, 1e-6)


# The official release's main.py defaults (github.com/OscarXZQ/weight-selection, main.py), by hand.
OFFICIAL_DEFAULTS = {
    'batch_size': 64, 'epochs': 300, 'update_freq': 1, 'model': 'convnext_tiny', 'input_size': 224,
    'layer_scale_init_value': 1e-6, 'model_ema': False, 'model_ema_decay': 0.9999, 'model_ema_force_cpu': False,
    'model_ema_eval': False, 'opt': 'adamw', 'opt_eps': 1e-8, 'opt_betas': None, 'clip_grad': None, 'momentum': 0.9,
    'weight_decay': 0.05, 'weight_decay_end': None, 'lr': 4e-3, 'layer_decay': 1.0, 'min_lr': 1e-6,
    'warmup_epochs': 50, 'warmup_steps': -1, 'drop_path': 0.0, 'color_jitter': 0.4, 'aa': 'rand-m9-mstd0.5-inc1',
    'smoothing': 0.1, 'train_interpolation': 'bicubic', 'crop_pct': None, 'reprob': 0.25, 'remode': 'pixel',
    'recount': 1, 'mixup': 0.8, 'cutmix': 1.0, 'cutmix_minmax': None, 'mixup_prob': 1.0, 'mixup_switch_prob': 0.5,
    'mixup_mode': 'batch', 'head_init_scale': 1.0, 'model_key': 'model|module', 'model_prefix': '',
    'imagenet_default_mean_and_std': True, 'data_set': 'IMNET', 'output_dir': '', 'log_dir': None, 'device': 'cuda',
    'seed': 0, 'resume': '', 'auto_resume': True, 'save_ckpt': True, 'save_ckpt_freq': 1, 'save_ckpt_num': 3,
    'start_epoch': 0, 'eval': False, 'dist_eval': True, 'disable_eval': False, 'num_workers': 10, 'pin_mem': True,
    'local_rank': -1, 'dist_url': 'env://', 'use_amp': False,
}
# Official flags whose default differs here, and why (README, "Differences from the official release").
DIFFERENT = {'data_path': None,       # theirs is a path on their cluster; ours must be given
             'initialize': None,      # '' there: no initialization either way
             'nb_classes': None, 'world_size': None, 'resplit': None,   # no effect here: a warning when given
             'enable_wandb': None, 'project': None, 'wandb_ckpt': None, 'dist_on_itp': None, 'eval_data_path': None}


def test_defaults_match_the_official_release():
    args = vars(main.parse_args([]))
    for flag, value in {**OFFICIAL_DEFAULTS, **DIFFERENT}.items():
        assert flag in args, f'official flag --{flag} is missing'
        assert args[flag] == value, (flag, args[flag], value)


def test_every_flag_is_read_or_warns():
    """Each flag's name is read somewhere as args.<flag> (or is a no-effect flag that warns)."""
    source = ''
    for name in ('main.py', 'config.py', 'datasets.py', 'gpu_data.py', 'recipe.py', 'checkpoint.py', 'utils.py',
                 os.path.join('models', 'build.py')):
        with open(os.path.join(ROOT, name)) as f:
            source += f.read()
    for action in main.get_args_parser()._actions:
        if action.dest in ('help', 'config') or action.dest in main.NO_EFFECT:
            continue
        assert f'args.{action.dest}' in source, f'--{action.dest} is never read'


def resolved(table):
    """[(row, dataset, model, parsed main.py args, selection command or None)] of a table's commands."""
    env = {'DATA_ROOT': '/data', 'OUTPUT': '/out', 'SEEDS': '0'}
    cmds = tables.commands(table, env)
    selections = {c[c.index('--output') + 1]: c for c in cmds if c[1].endswith('weight_selection.py')}
    rows = []
    for c in cmds:
        if not c[1].endswith('weight_selection.py'):
            argv = c[c.index(os.path.join(tables.HERE, 'main.py')) + 1:]
            args = main.parse_args(argv)
            _, row, dataset, model, _ = args.output_dir[len('/out/'):].split('/')
            rows.append((row, dataset, model, args, selections.get(args.initialize)))
    return rows


def flag(cmd, name):
    return cmd[cmd.index(name) + 1] if cmd and name in cmd else None


def test_table9_rows_are_linear_probes():
    rows = resolved(9)
    assert len(rows) == 4
    for row, dataset, model, args, sel in rows:
        assert (args.linear_probe, args.opt, args.epochs, args.weight_decay, args.mixup, args.cutmix) == \
            (True, 'lars', 90, 0.0, 0.0, 0.0), row
        assert (sel is not None) == (row == 'weight_selection')


def test_table11_longer_rows_train_600_epochs():
    for row, dataset, model, args, sel in resolved(11):
        longer = row.endswith('longer_training')
        assert (args.epochs, args.mixup, args.cutmix) == ((600, 0.3, 0.3) if longer else (300, 0.8, 1.0)), row
        assert args.data_set == 'IMNET' and args.warmup_epochs == 50


def test_table2_rows_run_their_dataset_recipe():
    rows = resolved(2)
    assert len(rows) == 40
    for row, dataset, model, args, sel in rows:
        table = PAPER_T14 if model == 'convnext_femto' else PAPER_T15
        if dataset in table:
            assert (args.global_batch_size, args.warmup_epochs, args.epochs) == table[dataset][:3], (dataset, model)
        assert args.data_path == f'/data/{dataset}'
        if row == 'weight_selection':
            assert flag(sel, '--teacher') == {'vit_tiny': 'vit_small_patch16_224.augreg_in21k',
                                              'convnext_femto': 'convnext_tiny.fb_in22k'}[model]
        else:
            assert sel is None and args.initialize is None


def test_table3_table4_table6_rows():
    inits = {row: (args.init, flag(sel, '--element_selection')) for row, _, m, args, sel in resolved(3) if m == 'vit_tiny'}
    assert inits == {'timm_default': ('timm', None), 'xavier': ('xavier', None), 'kaiming': ('kaiming', None),
                     'ws_uniform': ('timm', 'uniform'), 'ws_consecutive': ('timm', 'consecutive'),
                     'ws_random': ('timm', 'random'), 'ws_random_w_o_consistency': ('timm', 'random_inconsistent')}
    for row, dataset, model, args, sel in resolved(4):
        distills = row.startswith('distill')
        assert args.distill == ('none' if not distills else 'logit' if dataset == 'imagenet' else 'feature')
        if distills:
            assert args.distill_teacher == ('deit_small_patch16_224.fb_in1k' if dataset == 'imagenet'
                                            else 'vit_small_patch16_224.augreg_in21k')
        if sel is not None and dataset == 'imagenet':
            assert flag(sel, '--teacher') == 'deit_small_patch16_224.fb_in1k'
    for row, dataset, model, args, sel in resolved(6):
        if model == 'vit_tiny':
            assert args.model == 'vit_a_patch16_224' and (sel is None or flag(sel, '--student') == 'vit_a_patch16_224')
        if row == 'uniform_layer_selection':
            assert flag(sel, '--layer_selection') == 'uniform'


def test_figure4_runs_keep_the_warmup_ratio_and_finetune_from_the_last_pretraining_epoch():
    """4a: ViT-T on CIFAR-100 for each budget, warmup 50/300 of it (the paper keeps the ratio), both inits;
    4b: ImageNet pretraining for each budget (warmup 50/300 of it), then the CIFAR-100 recipe from its last epoch."""
    fig4a = resolved('fig4a')
    assert sorted((args.epochs, args.warmup_epochs, sel is not None) for _, _, _, args, sel in fig4a) == sorted(
        (e, w, ws) for e, w in [(50, 8), (100, 17), (150, 25), (200, 33), (250, 42), (300, 50)] for ws in (False, True))
    assert all((d, m, args.lr, args.global_batch_size) == ('cifar100', 'vit_tiny', 2e-3, 512)
               for _, d, m, args, _ in fig4a)
    fig4b = {row: (dataset, args) for row, dataset, _, args, _ in resolved('fig4b')}
    assert set(fig4b) == {'random_init', 'weight_selection', *(f'{k}_{e}_epochs' for e in (10, 20, 40, 60, 80, 100)
                                                             for k in ('pretrain', 'finetune_after'))}
    dataset, pretrain = fig4b['pretrain_60_epochs']
    assert (dataset, pretrain.epochs, pretrain.warmup_epochs, pretrain.lr) == ('imagenet', 60, 10, 4e-3)
    dataset, finetune = fig4b['finetune_after_60_epochs']
    assert (dataset, finetune.epochs, finetune.warmup_epochs) == ('cifar100', 300, 50)
    assert finetune.initialize == os.path.join(pretrain.output_dir, 'checkpoint-59.pth')


def test_a_later_config_overrides_an_earlier_one(tmp_path):
    a, b = tmp_path / 'a.yaml', tmp_path / 'b.yaml'
    a.write_text('epochs: 7\nlr: 0.1\n')
    b.write_text('epochs: 9\n')
    args = main.parse_args(['--config', str(a), '--config', str(b)])
    assert (args.epochs, args.lr) == (9, 0.1)
    assert main.parse_args(['--config', str(a), '--config', str(b), '--epochs', '3']).epochs == 3


def test_blr_scales_with_the_global_batch():
    args = main.parse_args(['--blr', '1e-3', '--batch_size', '32', '--global_batch_size', '2048'])
    assert recipe.learning_rate(args, main.resolve_batch(args, 2)[1]) == pytest.approx(4e-3)
    assert recipe.learning_rate(main.parse_args(['--lr', '3e-4']), 4096) == 3e-4


def test_schedule_values_by_hand():
    """Warmup from 0, then cosine to min_lr; layer-decay scales and a weight-decay cosine, written out."""
    args = main.parse_args(['--min_lr', '0', '--weight_decay', '0.1', '--weight_decay_end', '0.3',
                            '--warmup_epochs', '1'])
    p = [torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))]
    opt = torch.optim.AdamW([{'params': [p[0]], 'lr_scale': 0.5, 'weight_decay': 0.1},
                             {'params': [p[1]], 'weight_decay': 0.0}], lr=1.0)
    sched = recipe.build_schedule(args, 2.0, steps_per_epoch=4, epochs=3)  # 12 steps, 4 of warmup
    sched(opt, 2)
    assert [g['lr'] for g in opt.param_groups] == [0.5, 1.0]  # halfway up the warmup: 1.0, scaled by 0.5
    sched(opt, 8)  # cosine at 4 of 8 steps: 2 * 0.5 = 1.0; wd at 8 of 12: 0.3 - 0.2 * 0.5 * (1 + cos(2pi/3)) = 0.25
    assert opt.param_groups[1]['lr'] == pytest.approx(1.0)
    assert opt.param_groups[0]['weight_decay'] == pytest.approx(0.25) and opt.param_groups[1]['weight_decay'] == 0
    sched(opt, 12)
    assert opt.param_groups[1]['lr'] == 0.0


def test_tables_filter_datasets_and_models():
    env = {'DATA_PATH': '/d/c100', 'DATASETS': 'cifar100', 'MODELS': 'vit_tiny', 'OUTPUT': '/o'}
    train = [c for c in tables.commands(2, env) if not c[1].endswith('weight_selection.py')]
    assert len(train) == 2 and all(shlex.join(c).count('--data_path /d/c100') == 1 for c in train)


def test_opt_lars_is_the_linear_probes_lars():
    from lars import Lars
    args = main.parse_args(['--opt', 'lars', '--weight_decay', '0', '--device', 'cpu'])
    optimizer = recipe.build_optimizer(torch.nn.Linear(2, 1), args, torch.device('cpu'), 1.6)
    assert isinstance(optimizer, Lars) and optimizer.param_groups[0]['lr'] == 1.6


def test_optimizer_names_are_read_as_timm_reads_them():
    """timm's create_optimizer_v2 takes the part after the last '_' (lookahead_adamw), in any case; lars is ours."""
    from utils import UserError
    for name in ('adamw', 'AdamW', 'lookahead_adamw', 'sgd', 'lamb', 'lars'):
        recipe.check_optimizer_name(name)
    with pytest.raises(UserError, match='--opt adamm: not an optimizer timm knows'):
        recipe.check_optimizer_name('adamm')



# ---------------------------------------------------------------------------------------------- flags to objects
# Each flag's value chosen away from its default, so that a flag lost on its way (or two swapped) shows.

def test_distillation_flags_reach_the_loss():
    """--distill_alpha 0.5 --distill_tau 2: CE + 0.5 * tau^2 * KL(p_t || p_s) at tau 2, by hand."""
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    teacher.pretrained_cfg = {}  # the student's normalization
    args = main.parse_args(['--distill', 'logit', '--distill_alpha', '0.5', '--distill_tau', '2', '--mixup', '0',
                            '--cutmix', '0', '--smoothing', '0'])
    _, criterion = recipe.build_criterion(args, 3, teacher)
    g = torch.Generator().manual_seed(0)
    x, logits, y = torch.randn(5, 3, 2, 2, generator=g), torch.randn(5, 3, generator=g), torch.tensor([0, 1, 2, 0, 1])
    p_t, p_s = torch.softmax(teacher(x).detach() / 2, -1), torch.softmax(logits / 2, -1)
    kl = (p_t * (p_t / p_s).log()).sum(-1).mean()
    ce = -torch.log_softmax(logits, -1)[range(5), y].mean()
    torch.testing.assert_close(criterion(x, logits, y), ce + 0.5 * 4 * kl)


def test_label_smoothing_and_mixup_flags_reach_the_loss():
    """Without mixing, --smoothing eps is (1 - eps) * CE + eps * mean(-log p); with it, timm's Mixup gets every
    flag and the loss takes soft targets."""
    args = main.parse_args(['--mixup', '0', '--cutmix', '0', '--smoothing', '0.3'])
    mixup_fn, criterion = recipe.build_criterion(args, 4)
    assert mixup_fn is None
    logits, y = torch.randn(6, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 3, 0, 1])
    log_p = torch.log_softmax(logits, -1)
    expected = (0.7 * -log_p[range(6), y] + 0.3 * -log_p.mean(-1)).mean()
    torch.testing.assert_close(criterion(None, logits, y), expected)
    args = main.parse_args(['--mixup', '0.3', '--cutmix', '0.7', '--smoothing', '0.2', '--mixup_prob', '0.6',
                            '--mixup_switch_prob', '0.25', '--mixup_mode', 'elem'])
    mixup_fn, criterion = recipe.build_criterion(args, 4)
    assert (mixup_fn.mixup_alpha, mixup_fn.cutmix_alpha, mixup_fn.label_smoothing, mixup_fn.mix_prob,
            mixup_fn.switch_prob, mixup_fn.mode, mixup_fn.num_classes) == (0.3, 0.7, 0.2, 0.6, 0.25, 'elem', 4)
    soft = torch.softmax(torch.randn(6, 4), -1)
    torch.testing.assert_close(criterion(None, logits, soft), (-soft * log_p).sum(-1).mean())


def _decay_by_name(model, optimizer):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: group['weight_decay'] for group in optimizer.param_groups for p in group['params']}


@pytest.mark.parametrize('wrapped', [False, True], ids=['vit', 'feature_distill_student'])
def test_weight_decay_spares_norms_biases_and_the_models_no_weight_decay(wrapped):
    """Weight decay on the matrices only: not on 1-D parameters (norms, biases) nor on pos_embed and cls_token,
    also inside feature distillation's wrapper (whose names gain 'model.')."""
    import losses
    import timm
    model = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=2, num_classes=3)
    if wrapped:
        model = losses.FeatureDistillStudent(model, 384)
    args = main.parse_args(['--weight_decay', '0.05'])
    decay = _decay_by_name(model, recipe.build_optimizer(model, args, torch.device('cpu'), 1e-3))
    prefix = 'model.' if wrapped else ''
    spared = {n for n, p in model.named_parameters() if p.ndim == 1} | {prefix + 'pos_embed', prefix + 'cls_token'}
    assert decay == {n: 0.0 if n in spared else 0.05 for n, _ in model.named_parameters()}


def test_optimizer_flags_reach_the_optimizer():
    model = torch.nn.Linear(2, 1)
    args = main.parse_args(['--opt_eps', '1e-6', '--opt_betas', '0.8', '0.95'])
    adamw = recipe.build_optimizer(model, args, torch.device('cpu'), 1e-3)
    assert isinstance(adamw, torch.optim.AdamW) and (adamw.defaults['eps'], adamw.defaults['betas']) == (1e-6, (0.8, 0.95))
    sgd = recipe.build_optimizer(model, main.parse_args(['--opt', 'sgd', '--momentum', '0.7']), torch.device('cpu'), 0.1)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults['momentum'] == 0.7


def test_layer_decay_scales_the_lr_from_the_head_down():
    """--layer_decay 0.5 on a 2-block ViT, timm's grouping: the head 1, block 1 and the final norm 0.5, block 0
    0.25, the embeddings 0.125 (BEiT's rule puts the final norm with the head; no table uses --layer_decay)."""
    import timm
    model = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=2, num_classes=3)
    optimizer = recipe.build_optimizer(model, main.parse_args(['--layer_decay', '0.5']), torch.device('cpu'), 1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    scale = {names[id(p)]: group['lr_scale'] for group in optimizer.param_groups for p in group['params']}
    expected = {'patch_embed': 0.125, 'cls_token': 0.125, 'pos_embed': 0.125, 'blocks.0': 0.25, 'blocks.1': 0.5,
                'norm': 0.5, 'head': 1.0}
    assert scale == {n: next(v for k, v in expected.items() if n.startswith(k)) for n in scale}
    assert set(scale) == {n for n, _ in model.named_parameters()}


def selections_by_row(table, **env):
    """{row: (the row's weight_selection.py flags, or None without a selection; the row's main.py flags beyond
    --config/--data_path/--output_dir/--seed)} of the table's first dataset and model, from tables.commands."""
    cmds = tables.commands(table, {'DATA_ROOT': '/d', 'OUTPUT': '/o', **env})
    def without(flags, *names):  # the flags less these flags and their values
        return [f for i, f in enumerate(flags) if f not in names and (i == 0 or flags[i - 1] not in names)]
    selects = {c[c.index('--output') + 1]: without(c[2:], '--seed', '--output')
               for c in cmds if c[1].endswith('weight_selection.py')}
    rows = {}
    for c in cmds:
        if c[1].endswith('main.py'):
            row = c[c.index('--output_dir') + 1].split('/')[3]
            train = c[c.index('--seed') + 2:]
            init = train[train.index('--initialize') + 1] if '--initialize' in train else None
            rows.setdefault(row, (shlex.join(selects[init]) if init in selects else None,
                                  shlex.join(f for f in train if f != init and f != '--initialize')))
    return rows


def test_tables_5_7_8_10_12_16_17_select_what_their_rows_say():
    """Each row's teacher, student, layer and element selection and exclusion, written out from the paper's text
    (Tables 5, 7, 8, 10, 12, 16, 17): a swapped mid/last, a lost --exclude or another teacher fails here."""
    def sel(teacher, student='vit_tiny_patch16_224', layers='first', elements='uniform'):
        return (f'--teacher {teacher} --student {student} --layer_selection {layers} --element_selection {elements}')
    vit_s = 'vit_small_patch16_224.augreg_in21k'
    t7 = selections_by_row(7, MODELS='vit_tiny')
    assert (t7['random_init'][0], t7['weight_selection'][0]) == (None, sel(vit_s))
    assert (t7['l1_pruning'][0], t7['magnitude_pruning'][0]) == (sel(vit_s, elements='l1'), sel(vit_s, elements='magnitude'))
    t8 = selections_by_row(8)
    assert {row: s for row, (s, _) in t8.items()} == {
        f'vit_{size[0]}': sel(f'vit_{size}_patch16_224.augreg_in21k') for size in ('small', 'base', 'large')}
    t10 = selections_by_row(10, DATASETS='cifar100')
    for part in ('patch_embed', 'pos_embed', 'attn', 'norm', 'mlp'):
        assert t10[f'w_o_{part}'][0] == sel(vit_s) + f' --exclude {part}'
    t12 = selections_by_row(12, DATASETS='cifar100')
    assert t12['mimetic_init'] == (None, '--init mimetic') and t12['weight_selection'][0] == sel(vit_s)
    for table, teacher, student, model in ((16, 'vit_tiny_patch16_224.augreg_in21k', 'vit_a_patch16_224', 'vit_a'),
                                           (17, 'vit_large_patch16_224.augreg_in21k', 'vit_small_patch16_224', None)):
        rows = selections_by_row(table)
        assert {row: s for row, (s, _) in rows.items()} == {
            f'{layers}_n_layer_selection' if layers != 'uniform' else 'uniform_layer_selection':
            sel(teacher, student, layers) for layers in ('first', 'mid', 'last', 'uniform')}
        if model:  # the student trained is the one selected into
            assert all(f'--model {student}' in flags for _, flags in rows.values())
    t5 = selections_by_row(5, DATASETS='cifar100')
    assert t5['clip'][0].startswith('--teacher vit_base_patch16_clip_224.laion2b --student vit_tiny_patch16_clip_224')
    assert '--model vit_tiny_patch16_clip_224' in t5['clip'][1]
