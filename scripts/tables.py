"""The runs behind each of the paper's tables: weight selections and trainings, printed then run.

    DATA_ROOT=/data NGPUS=8 python scripts/tables.py 3            # Table 3, every row (random rows: selections 0 1 2)
    DRY_RUN=1 DATA_ROOT=/data python scripts/tables.py 10         # print the commands only
    DATA_PATH=/data/cifar100 DATASETS=cifar100 python scripts/tables.py 2   # one dataset (scripts/cifar100.sh)
    DATA_ROOT=/data EPOCHS="100 200 300" python scripts/tables.py fig4a      # Figure 4a's runs (4b: fig4b)

Runs go to OUTPUT/table<N>/<row>/<dataset>/<model>/seed<T>/ (log.txt, checkpoints; seed<T>_selection<S>/ in
Table 3's random rows), selections to OUTPUT/ws/; scripts/collect_results.py turns OUTPUT into the tables.
Environment: DATA_ROOT (one folder per dataset: DATA_ROOT/cifar100, ...), NGPUS [1], OUTPUT [runs],
SEEDS: training seeds [0] (e.g. "0 1 2"), SELECTION_SEEDS: the selections of Table 3's random rows, whose
median the paper reports, each trained with every training seed [0 1 2],
EXTRA (more main.py flags), SELECT_EXTRA (more weight_selection.py flags, e.g. --student_kwargs
'{"img_size": 32}' for a small trial at 32 px; neither may set --seed or the output, which each run takes from
SEEDS/SELECTION_SEEDS and OUTPUT), DRY_RUN=1, TEACHER_DIR: a folder of local teacher checkpoints named
<timm name>.pth, used instead of the hub when present (offline); ROWS, DATASETS and MODELS keep only some
rows and columns (e.g. ROWS=distill DATASETS=cifar100 MODELS=vit_tiny; a row as its folder names it);
DATA_PATH: the dataset's folder when DATASETS names one; DISTILL_ALPHA: Table 4's α [1.0], which the paper
tunes on its distillation rows: one OUTPUT per candidate (ROWS=distill), then the rest with the best one.

A row whose table changes the recipe passes a second --config (main.py: a later file overrides an
earlier one), e.g. Table 9's linear probe and Table 11's 600 epochs.
"""
import json
import os
import re
import shlex
import subprocess
import sys
import zlib

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)
from recipe import DATA_SETS, STUDENTS as STUDENT, TEACHERS as TEACHER, TABLE_15  # noqa: E402 - the one place naming them

VIT_S, CONVNEXT_T = TEACHER['vit_tiny'], TEACHER['convnext_femto']
# Rows the paper reports as "the median performance of three different selection results" (Table 3's random
# selections): three selections (SELECTION_SEEDS), each trained with the same training seeds (SEEDS), so that
# the spread is the selection's; folders seed<T>_selection<S>, whose median collect_results.py reports.
MEDIAN_OF_THREE = {(3, 'ws random'), (3, 'ws random w/o consistency')}
ALL = ['imagenet', 'svhn', 'food101', 'eurosat', 'cifar10', 'cifar100', 'stl10', 'flowers', 'pets', 'dtd']
TABLES = (2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 16, 17)
# Figure 4's runs; the paper does not list the figure's points: these bracket what it reports (the accuracy of
# random init after 1/3 of the epochs with weight selection; that of weight selection after 60 epochs of pretraining)
FIGURES = {'fig4a': '50 100 150 200 250 300', 'fig4b': '10 20 40 60 80 100'}


def ws(teacher=None, layers='first', elements='uniform', exclude='', student=None):
    return dict(teacher=teacher, layers=layers, elements=elements, exclude=exclude, student=student)


def grid(rows, datasets, models):
    """rows: {row name: (selection or None, extra main.py flags)} -> [(row, dataset, model, sel, flags)]."""
    return [(row, d, m, sel, flags) for row, (sel, flags) in rows.items() for d in datasets for m in models]


def distill_alpha(env):
    """DISTILL_ALPHA, Table 4's α (default 1): the paper tunes it on the distillation rows without giving it."""
    value = (env.get('DISTILL_ALPHA') or '1.0').strip()
    try:
        ok = float(value) > 0
    except ValueError:
        ok = False
    if not ok:
        raise SystemExit(f"error: DISTILL_ALPHA={value!r}: give Table 4's distillation weight, a number above 0, "
                         f"e.g. DISTILL_ALPHA=0.5")
    return value


def figure_epochs(n, env):
    """EPOCHS, the epoch counts of Figure 4's runs (4a: of training, 4b: of pretraining)."""
    values = (env.get('EPOCHS') or FIGURES[n]).split()
    if not all(v.isdigit() and int(v) > 0 for v in values):
        raise SystemExit(f"error: EPOCHS={env.get('EPOCHS')!r}: give whole numbers of epochs above 0, e.g. "
                         f"EPOCHS='{FIGURES[n]}'")
    return [int(v) for v in values]


def shorter(epochs, dataset):
    """--epochs and --warmup_epochs of a shorter ViT-T run, warmup kept in the recipe's ratio (Figure 4a:
    "the number of warmup epochs is modified to maintain its ratio with the total epochs")."""
    _, warmup, full, _ = TABLE_15[dataset]
    return ['--epochs', str(epochs), '--warmup_epochs', str(round(epochs * warmup / full))]


def figure(n, env):
    """Figure 4's runs, ViT-T on CIFAR-100. 4a: random init and weight selection trained for EPOCHS. 4b: ViT-T
    pretrained on ImageNet-1K for EPOCHS (the ImageNet recipe, warmup in its ratio), then trained on CIFAR-100 from
    the last epoch's weights with Table 2's recipe (a new classifier), beside Table 2's two CIFAR-100 rows."""
    epochs = figure_epochs(n, env)
    if n == 'fig4a':
        rows = {}
        for e in epochs:
            rows[f'random init {e} epochs'] = (None, shorter(e, 'cifar100'))
            rows[f'weight selection {e} epochs'] = (ws(), shorter(e, 'cifar100'))
        return grid(rows, ['cifar100'], ['vit_tiny'])
    runs = grid({'random init': (None, []), 'weight selection': (ws(), [])}, ['cifar100'], ['vit_tiny'])
    for e in epochs:
        runs += [(f'pretrain {e} epochs', 'imagenet', 'vit_tiny', None, shorter(e, 'imagenet')),
                 (f'finetune after {e} epochs', 'cifar100', 'vit_tiny',
                  {'pretrained': f'pretrain {e} epochs', 'epochs': e}, [])]
    return runs


def table(n, env=None):
    """[(row, dataset, model, selection or None, main.py flags)]; `env` sets Table 4's DISTILL_ALPHA and
    Figure 4's EPOCHS."""
    if n in FIGURES:
        return figure(n, env or {})
    both = ['vit_tiny', 'convnext_femto']
    if n == 2:
        return grid({'random init': (None, []), 'weight selection': (ws(), [])}, ALL, both)
    if n == 3:
        return grid({'timm default': (None, []), 'xavier': (None, ['--init', 'xavier']),
                     'kaiming': (None, ['--init', 'kaiming']), 'ws uniform': (ws(), []),
                     'ws consecutive': (ws(elements='consecutive'), []), 'ws random': (ws(elements='random'), []),
                     'ws random w/o consistency': (ws(elements='random_inconsistent'), [])}, ['cifar100'], both)
    if n == 4:
        deit, alpha = 'deit_small_patch16_224.fb_in1k', ['--distill_alpha', distill_alpha(env or {})]
        logit = ['--distill', 'logit', '--distill_teacher', deit, *alpha]
        feature = ['--distill', 'feature', '--distill_teacher', VIT_S, *alpha]
        return (grid({'baseline': (None, []), 'distill': (None, logit), 'weight selection': (ws(deit), []),
                      'distill + weight selection': (ws(deit), logit)}, ['imagenet'], ['vit_tiny'])
                + grid({'baseline': (None, []), 'distill': (None, feature), 'weight selection': (ws(), []),
                        'distill + weight selection': (ws(), feature)}, ['cifar100'], ['vit_tiny']))
    if n == 5:
        # CLIP: the official release's CLIP ViT-B/16 (LAION-2B OpenCLIP weights), and a ViT-T in CLIP's layout
        clip_student = 'vit_tiny_patch16_clip_224'
        return grid({'supervised (ImageNet-21K)': (ws('vit_base_patch16_224.augreg_in21k'), []),
                     'CLIP': (ws('vit_base_patch16_clip_224.laion2b', student=clip_student), ['--model', clip_student]),
                     'MAE': (ws('vit_base_patch16_224.mae'), []), 'DINO': (ws('vit_base_patch16_224.dino'), [])},
                    ['cifar10', 'cifar100', 'stl10'], ['vit_tiny'])
    if n == 6:
        vit_a = ['--model', 'vit_a_patch16_224']
        return (grid({'random init': (None, vit_a), 'first-N layer selection': (ws(student='vit_a_patch16_224'), vit_a),
                      'uniform layer selection': (ws(layers='uniform', student='vit_a_patch16_224'), vit_a)},
                     ['cifar100'], ['vit_tiny'])
                + grid({'random init': (None, []), 'first-N layer selection': (ws(), []),
                        'uniform layer selection': (ws(layers='uniform'), [])}, ['cifar100'], ['convnext_femto']))
    if n == 7:
        return grid({'random init': (None, []), 'weight selection': (ws(), []), 'L1 pruning': (ws(elements='l1'), []),
                     'magnitude pruning': (ws(elements='magnitude'), [])}, ['cifar100'], both)
    if n == 8:
        return grid({'ViT-S': (ws(VIT_S), []), 'ViT-B': (ws('vit_base_patch16_224.augreg_in21k'), []),
                     'ViT-L': (ws('vit_large_patch16_224.augreg_in21k'), [])}, ['cifar100'], ['vit_tiny'])
    if n == 9:
        probe = ['--config', '{linear_probe}']
        return grid({'random init': (None, probe), 'weight selection': (ws(), probe)}, ['cifar100'], both)
    if n == 10:
        rows = {'random init': (None, []), 'weight selection': (ws(), [])}
        for part in ('patch_embed', 'pos_embed', 'attn', 'norm', 'mlp'):
            rows[f'w/o {part}'] = (ws(exclude=part), [])
        return grid(rows, ['cifar10', 'cifar100', 'stl10'], ['vit_tiny'])
    if n == 11:
        longer = ['--config', '{config_600ep}']
        return grid({'random init': (None, []), 'weight selection': (ws(), []),
                     'random init (longer training)': (None, longer),
                     'weight selection (longer training)': (ws(), longer)}, ['imagenet'], both)
    if n == 12:
        return grid({'random init': (None, []), 'mimetic init': (None, ['--init', 'mimetic']),
                     'weight selection': (ws(), [])}, ['cifar10', 'cifar100', 'stl10'], ['vit_tiny'])
    if n in (16, 17):
        teacher, student = (('vit_tiny_patch16_224.augreg_in21k', 'vit_a_patch16_224') if n == 16
                            else ('vit_large_patch16_224.augreg_in21k', 'vit_small_patch16_224'))
        rows = {(f'{k}-N layer selection' if k != 'uniform' else 'uniform layer selection'):
                (ws(teacher, layers=k, student=student), ['--model', student])
                for k in ('first', 'mid', 'last', 'uniform')}
        return grid(rows, ['cifar100'], ['vit_tiny'])
    raise SystemExit(f'error: no table {n}; choose one of {" ".join(map(str, TABLES))} {" ".join(FIGURES)}')


def slug(text):
    return re.sub('_+', '_', ''.join(c if c.isalnum() else '_' for c in text.lower())).strip('_')


def selected_rows(n, env):
    """table(n), keeping the rows, datasets and models that ROWS (as their folders name them), DATASETS and
    MODELS name (all by default)."""
    rows = table(n, env)
    keep = {}
    for var, known in (('ROWS', list(dict.fromkeys(slug(r[0]) for r in rows))), ('DATASETS', DATA_SETS),
                       ('MODELS', STUDENT)):
        names = env.get(var, '').split()
        for name in names:
            if name not in known:
                raise SystemExit(f"error: unknown {var[:-1].lower()} '{name}' in {var}; choose from {' '.join(known)}")
        keep[var] = set(names) or set(known)
    kept = [r for r in rows if slug(r[0]) in keep['ROWS'] and r[1] in keep['DATASETS'] and r[2] in keep['MODELS']]
    if not kept:  # a filter that leaves nothing would otherwise "succeed" having run nothing
        given = ' '.join(f'{var}={env[var]!r}' for var in ('ROWS', 'DATASETS', 'MODELS') if env.get(var))
        raise SystemExit(f"error: {given} leaves no run of {'table ' if isinstance(n, int) else ''}{n}, whose runs "
                         f"cover datasets {' '.join(dict.fromkeys(r[1] for r in rows))} and models "
                         f"{' '.join(dict.fromkeys(r[2] for r in rows))}")
    return kept


# Flags each run of a table gets from the table itself (its seeds, its folders): given again through EXTRA or
# SELECT_EXTRA, the last one would win, and e.g. Table 3's three random selections would all be one
OWN_FLAGS = {'EXTRA': {'--seed': 'SEEDS', '--output_dir': 'OUTPUT'},
             'SELECT_EXTRA': {'--seed': 'SELECTION_SEEDS (the random rows) or SEEDS', '--output': 'OUTPUT'}}


def extra_flags(env, var):
    """EXTRA's or SELECT_EXTRA's flags, refusing those the table sets per run."""
    flags = shlex.split(env.get(var, ''))
    for flag in flags:
        name = flag.split('=')[0]
        if name in OWN_FLAGS[var]:
            raise SystemExit(f"error: {var} sets {name}, which the table sets for each run; use "
                             f"{OWN_FLAGS[var][name]} instead")
    return flags


def data_path(dataset, env):
    """DATA_ROOT/<dataset>, or DATA_PATH when DATASETS names this one dataset."""
    if env.get('DATA_PATH') and env.get('DATASETS', '').split() == [dataset]:
        return env['DATA_PATH']
    if not env.get('DATA_ROOT'):
        raise SystemExit('error: set DATA_ROOT to the folder that holds one sub-folder per dataset '
                         '(or DATA_PATH with DATASETS naming one dataset)')
    return os.path.join(env['DATA_ROOT'], dataset)


def select_extra(env):
    """SELECT_EXTRA's flags; a --student_kwargs among them is checked here, before any step runs."""
    extra = extra_flags(env, 'SELECT_EXTRA')
    if '--student_kwargs' in extra:
        i = extra.index('--student_kwargs')
        try:
            kwargs = json.loads(extra[i + 1])
        except (IndexError, ValueError):
            kwargs = None
        if not isinstance(kwargs, dict):
            raise SystemExit("error: SELECT_EXTRA: --student_kwargs needs a JSON object, quoted inside the variable, "
                             "e.g. SELECT_EXTRA=\"--student_kwargs '{\\\"img_size\\\": 32}'\"")
    return extra


def commands(n, env):
    out = env.get('OUTPUT', 'runs')
    seeds, selection_seeds = env.get('SEEDS', '0').split(), env.get('SELECTION_SEEDS', '0 1 2').split()
    for var, values in (('SEEDS', seeds), ('SELECTION_SEEDS', selection_seeds)):
        if not values or not all(v.isdigit() for v in values):
            raise SystemExit(f"error: {var}={env.get(var)!r}: give whole numbers separated by spaces, e.g. {var}='0 1 2'")
    teacher_dir, ngpus = env.get('TEACHER_DIR'), env.get('NGPUS', '1').strip()
    if not ngpus.isdigit() or int(ngpus) < 1:
        raise SystemExit(f"error: NGPUS={env.get('NGPUS')!r}: give the number of GPUs, a whole number 1 or more, "
                         f"e.g. NGPUS=8")
    ngpus = int(ngpus)
    py = sys.executable if not env.get('PYTHON') else env['PYTHON']
    cmds, selected = [], set()
    for row, dataset, model, sel, flags in selected_rows(n, env):
        config = os.path.join(HERE, 'configs', f'{model}_{dataset}.yaml')
        placeholders = {'{linear_probe}': os.path.join(HERE, 'configs', f'linear_probe_{model}_{dataset}.yaml'),
                        '{config_600ep}': os.path.join(HERE, 'configs', f'{model}_{dataset}_600ep.yaml')}
        flags = [placeholders.get(f, f) for f in flags]
        median = (n, row) in MEDIAN_OF_THREE
        # (training seed, selection seed, run folder); outside the median rows the selection takes the training seed
        runs = ([(t, s, f'seed{t}_selection{s}') for t in seeds for s in selection_seeds] if median
                else [(t, t, f'seed{t}') for t in seeds])
        for seed, selection_seed, folder in runs:
            init = []
            if sel is not None and 'pretrained' in sel:  # Figure 4b: the last epoch of a pretraining run
                source = os.path.join(out, n, slug(sel['pretrained']), 'imagenet', model, folder)
                init = ['--initialize', os.path.join(source, f"checkpoint-{sel['epochs'] - 1}.pth")]
            elif sel is not None:
                teacher = sel['teacher'] or TEACHER[model]
                student = sel['student'] or STUDENT[model]
                name = slug(f"{student}_{teacher}_{sel['layers']}_{sel['elements']}_{sel['exclude']}")
                random_sel = sel['elements'] in ('random', 'random_inconsistent')
                extra = select_extra(env)
                if extra:  # another selection: its own file
                    name += f"_x{zlib.crc32(env['SELECT_EXTRA'].encode()):08x}"
                ws_file = os.path.join(out, 'ws', name + (f'_s{selection_seed}' if random_sel else '') + '.pth')
                if ws_file not in selected:
                    selected.add(ws_file)
                    cmd = [py, os.path.join(HERE, 'weight_selection.py'), '--teacher', teacher, '--student', student,
                           '--layer_selection', sel['layers'], '--element_selection', sel['elements'],
                           '--seed', selection_seed, '--output', ws_file]
                    ckpt = os.path.join(teacher_dir, teacher + '.pth') if teacher_dir else None
                    if ckpt and os.path.exists(ckpt):
                        cmd += ['--teacher_checkpoint', ckpt]
                    if sel['exclude']:
                        cmd += ['--exclude', sel['exclude']]
                    cmds.append(cmd + extra)
                init = ['--initialize', ws_file]
            run_dir = os.path.join(out, n if n in FIGURES else f'table{n}', slug(row), dataset, model, folder)
            download = ['--download', 'true'] if env.get('DOWNLOAD') == 'true' else []
            # one process needs no torchrun (whose report of a failed run is a traceback of its own)
            launch = [py] if ngpus == 1 else [py, '-m', 'torch.distributed.run', f'--nproc_per_node={ngpus}']
            cmd = [*launch, os.path.join(HERE, 'main.py'),
                   '--config', config, '--data_path', data_path(dataset, env), '--output_dir', run_dir,
                   '--seed', seed, *flags, *init, *download, *extra_flags(env, 'EXTRA')]
            if teacher_dir and '--distill_teacher' in flags:
                name = flags[flags.index('--distill_teacher') + 1]
                if os.path.exists(os.path.join(teacher_dir, name + '.pth')):
                    cmd += ['--distill_teacher_checkpoint', os.path.join(teacher_dir, name + '.pth')]
            cmds.append(cmd)
    return cmds


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv in (['-h'], ['--help']):
        print(__doc__)
        return
    if len(argv) != 1 or not (argv[0].isdigit() or argv[0] in FIGURES):
        raise SystemExit(f'error: usage: tables.py TABLE ({" ".join(map(str, TABLES))}) or FIGURE ({" ".join(FIGURES)})')
    env = os.environ
    for cmd in commands(int(argv[0]) if argv[0].isdigit() else argv[0], env):
        print('+ ' + shlex.join(cmd), flush=True)
        if env.get('DRY_RUN') == '1':
            continue
        if cmd[1].endswith('weight_selection.py'):
            output = cmd[cmd.index('--output') + 1]
            if os.path.exists(output):
                continue  # selected before
            os.makedirs(os.path.dirname(output) or '.', exist_ok=True)
        returncode = subprocess.run(cmd).returncode
        if returncode:  # the step printed its own error above; this names the step, in one line
            raise SystemExit(f'stopped: this step failed (exit status {returncode}), the steps after it were not '
                             f'run: {shlex.join(cmd)}')


if __name__ == '__main__':
    main()
