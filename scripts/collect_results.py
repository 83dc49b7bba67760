"""Turn run folders into the paper's tables: mean ± std over seeds (the median where the paper reports one: Table 3's
random selections), next to the paper's numbers.

    python scripts/collect_results.py runs --out results     # writes results/tables.md and results/tables.csv

Reads OUTPUT/table<N>/<row>/<dataset>/<model>/seed<S>*/log.txt as scripts/tables.py lays them out. Each run
gives two accuracies, reported side by side: "best", the highest test acc@1 over epochs (what the official
code reports as "max accuracy", chosen on the test set), and "final", the last epoch's, which involves no
choice made on the test set.
"""
import csv
import functools
import json
import os
import re
import statistics
import sys
import typing

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # tables.py beside this file; main.py and config.py above it
import utils  # noqa: E402

# The paper's numbers: PAPER[table][(row slug, dataset, model)] = test acc@1.
_T2 = {'imagenet': (73.9, 75.6, 76.1, 76.4), 'svhn': (94.9, 96.5, 95.7, 96.9), 'food101': (79.6, 86.9, 86.9, 89.0),
       'eurosat': (97.5, 98.6, 98.4, 98.8), 'cifar10': (92.4, 97.0, 96.6, 97.4), 'cifar100': (72.3, 81.4, 81.4, 84.4),
       'stl10': (61.5, 83.4, 81.4, 92.3), 'flowers': (62.4, 81.9, 80.3, 94.5), 'pets': (25.0, 68.6, 72.9, 87.3),
       'dtd': (49.4, 62.5, 63.7, 68.8)}
PAPER = {
    2: {**{('random_init', d, 'vit_tiny'): v[0] for d, v in _T2.items()},
        **{('weight_selection', d, 'vit_tiny'): v[1] for d, v in _T2.items()},
        **{('random_init', d, 'convnext_femto'): v[2] for d, v in _T2.items()},
        **{('weight_selection', d, 'convnext_femto'): v[3] for d, v in _T2.items()}},
    3: {(r, 'cifar100', m): v for r, vals in {
        'timm_default': (72.3, 81.4), 'xavier': (72.1, 82.8), 'kaiming': (73.0, 82.5), 'ws_uniform': (81.4, 84.4),
        'ws_consecutive': (81.6, 84.0), 'ws_random': (81.7, 83.9), 'ws_random_w_o_consistency': (77.4, 82.8)}.items()
        for m, v in zip(('vit_tiny', 'convnext_femto'), vals)},
    4: {('baseline', 'imagenet', 'vit_tiny'): 73.9, ('distill', 'imagenet', 'vit_tiny'): 74.8,
        ('weight_selection', 'imagenet', 'vit_tiny'): 75.5, ('distill_weight_selection', 'imagenet', 'vit_tiny'): 76.0,
        ('baseline', 'cifar100', 'vit_tiny'): 72.3, ('distill', 'cifar100', 'vit_tiny'): 78.4,
        ('weight_selection', 'cifar100', 'vit_tiny'): 81.4, ('distill_weight_selection', 'cifar100', 'vit_tiny'): 83.9},
    5: {(r, d, 'vit_tiny'): v for r, vals in {
        'supervised_imagenet_21k': (95.1, 77.6, 73.1), 'clip': (94.9, 77.3, 66.0), 'mae': (95.9, 77.2, 71.0),
        'dino': (95.0, 75.7, 69.4)}.items() for d, v in zip(('cifar10', 'cifar100', 'stl10'), vals)},
    6: {('random_init', 'cifar100', 'vit_tiny'): 69.6, ('first_n_layer_selection', 'cifar100', 'vit_tiny'): 77.6,
        ('uniform_layer_selection', 'cifar100', 'vit_tiny'): 76.7, ('random_init', 'cifar100', 'convnext_femto'): 81.3,
        ('first_n_layer_selection', 'cifar100', 'convnext_femto'): 84.4,
        ('uniform_layer_selection', 'cifar100', 'convnext_femto'): 83.2},
    7: {(r, 'cifar100', m): v for r, vals in {
        'random_init': (72.3, 81.4), 'weight_selection': (81.4, 84.4), 'l1_pruning': (79.5, 82.8),
        'magnitude_pruning': (73.8, 81.9)}.items() for m, v in zip(('vit_tiny', 'convnext_femto'), vals)},
    8: {('vit_s', 'cifar100', 'vit_tiny'): 81.4, ('vit_b', 'cifar100', 'vit_tiny'): 77.6,
        ('vit_l', 'cifar100', 'vit_tiny'): 76.9},
    9: {('random_init', 'cifar100', 'vit_tiny'): 13.5, ('weight_selection', 'cifar100', 'vit_tiny'): 28.2,
        ('random_init', 'cifar100', 'convnext_femto'): 7.1, ('weight_selection', 'cifar100', 'convnext_femto'): 23.6},
    10: {(r, d, 'vit_tiny'): v for r, vals in {
        'random_init': (92.4, 72.3, 61.5), 'weight_selection': (97.0, 81.4, 83.4), 'w_o_patch_embed': (96.8, 79.5, 77.1),
        'w_o_pos_embed': (95.6, 78.4, 80.2), 'w_o_attn': (96.2, 77.3, 80.5), 'w_o_norm': (96.2, 79.0, 79.8),
        'w_o_mlp': (95.6, 78.8, 74.2)}.items() for d, v in zip(('cifar10', 'cifar100', 'stl10'), vals)},
    11: {(r, 'imagenet', m): v for r, vals in {
        'random_init': (73.9, 76.1), 'weight_selection': (75.5, 76.4), 'random_init_longer_training': (76.3, 77.5),
        'weight_selection_longer_training': (77.4, 77.7)}.items() for m, v in zip(('vit_tiny', 'convnext_femto'), vals)},
    12: {(r, d, 'vit_tiny'): v for r, vals in {
        'random_init': (92.4, 72.3, 61.5), 'mimetic_init': (93.3, 74.7, 67.5), 'weight_selection': (97.0, 81.4, 83.4)}.items()
        for d, v in zip(('cifar10', 'cifar100', 'stl10'), vals)},
    16: {('first_n_layer_selection', 'cifar100', 'vit_tiny'): 81.6, ('mid_n_layer_selection', 'cifar100', 'vit_tiny'): 68.3,
         ('last_n_layer_selection', 'cifar100', 'vit_tiny'): 62.0, ('uniform_layer_selection', 'cifar100', 'vit_tiny'): 76.3},
    17: {('first_n_layer_selection', 'cifar100', 'vit_tiny'): 76.9, ('mid_n_layer_selection', 'cifar100', 'vit_tiny'): 75.9,
         ('last_n_layer_selection', 'cifar100', 'vit_tiny'): 77.1, ('uniform_layer_selection', 'cifar100', 'vit_tiny'): 77.5},
}


def run_accuracies(log_path):
    """(best, final) test acc@1 of one run's log.txt, or None when it logged no test accuracy. A line that is not
    a JSON record stops the collection, naming it: skipping the run would silently change its row's mean."""
    records = utils.read_jsonl(log_path, 'fix that line or move the run folder out of the results')
    accs = [r.get('test_acc1') for r in records]
    accs = [a for a in accs if a is not None]
    if not accs:
        return None
    return max(accs), accs[-1]


def row_flags(table, row, dataset, model):
    """The main.py flags that scripts/tables.py gives this row on top of its --config files (e.g. Table 6's
    --model, and --initialize where the row trains from a selection): part of the row's recipe."""
    import tables
    try:
        rows = tables.selected_rows(table, {})
    except (SystemExit, KeyError, ValueError):  # a folder of a table tables.py does not know
        return set()
    return {f[2:] for r, d, m, sel, flags in rows if (tables.slug(r), d, m) == (row, dataset, model)
            for f in [*flags, *(['--initialize'] if sel is not None else [])] if f.startswith('--')}


# main.py settings that say where and how a run ran (paths, processes, checkpoints, logging, speed), not what it
# trained: never a departure from the recipe; nor are the flags main.py accepts and ignores (main.NO_EFFECT)
WHERE_AND_HOW = {
    'config', 'data_path', 'output_dir', 'log_dir', 'download', 'check_data', 'device', 'num_workers', 'pin_mem',
    'compile', 'channels_last', 'deterministic', 'dist_url', 'local_rank', 'dist_eval', 'auto_resume', 'resume',
    'start_epoch', 'save_ckpt', 'save_ckpt_freq', 'save_ckpt_num', 'save_every_steps', 'print_freq', 'eval_freq',
    'trust_checkpoint', 'seed', 'distill_teacher_checkpoint', 'model_key', 'model_prefix'}


def recipe_departures(run_dir, seed, own_flags=()):
    """How a run departs from the recipe it was launched with: the settings of its config.yaml that differ from
    main.py's defaults as the --config files of its command set them (run_info.json; a later file overriding an
    earlier one; read as main.py reads them), but for the row's `own_flags`, for WHERE_AND_HOW and for the
    per-process batch when the global batch is the recipe's; and fewer epochs logged than it set out to train.
    A seed other than its folder's (seed<T>) counts too: two folders of one seed would be averaged as two runs.
    Where the folder cannot say (no config.yaml, or its --config files gone), it says so: such a run is not
    shown as on-recipe."""
    import yaml
    try:
        with open(os.path.join(run_dir, 'config.yaml')) as f:
            ran = yaml.safe_load(f) or {}
        with open(os.path.join(run_dir, 'log.txt')) as f:
            epochs = len({json.loads(line).get('epoch') for line in f if line.strip()})
    except (OSError, ValueError, yaml.YAMLError):
        return [f'{seed}: recipe not checked (no readable config.yaml)']
    launched = launched_recipe(run_dir)
    recipe = {} if launched is None else {**launched, **{k: v for k, v in main_defaults().items() if k not in launched}}
    found = [f"{k} {ran[k]} (recipe {'none' if v in ('', None) else v})" for k, v in recipe.items()
             if k in ran and ran[k] != v and k not in own_flags and k not in WHERE_AND_HOW | no_effect()]
    if launched is None:
        found.append('recipe not checked (run_info.json or the --config files of its command are gone)')
    folder = RUN_FOLDER.fullmatch(seed)
    if isinstance(ran.get('seed'), int) and folder and ran['seed'] != int(folder.group(1)):
        found.append(f"seed {ran['seed']} (its folder says seed{folder.group(1)})")
    if ran.get('global_batch_size'):  # update_freq follows the GPUs: the per-process batch is not the recipe
        found = [f for f in found if not f.startswith(('batch_size ', 'update_freq '))]
    if isinstance(ran.get('epochs'), int) and epochs < ran['epochs']:
        found.append(f"unfinished ({epochs} of {ran['epochs']} epochs logged)")
    return [f'{seed}: ' + ', '.join(found)] if found else []


def launched_recipe(run_dir):
    """The flag values of the --config files in the run's command, read with main.py's own config reader
    (relative paths from the folder the run started in): {} for a command without one (main.py's defaults),
    None where run_info.json or a --config file cannot be read."""
    try:
        with open(os.path.join(run_dir, 'run_info.json')) as f:
            info = json.load(f)
        command = info['command']
        paths = [os.path.join(info.get('cwd', ''), value) for flag, value in zip(command, command[1:])
                 if flag == '--config']
    except (OSError, ValueError, KeyError, TypeError):
        return None
    recipe = read_recipe(tuple(paths))
    return None if recipe is None else dict(recipe)


@functools.lru_cache(maxsize=None)
def read_recipe(paths):
    """The flag values of these --config files, a later one overriding an earlier one, as main.py reads them
    (read once for all the runs that share them); None when one cannot be read (moved, deleted or edited since)."""
    import config
    from utils import UserError
    recipe = {}
    try:
        for path in paths:
            recipe.update(config.load_config(path, main_parser()))
    except UserError:
        return None
    return tuple(recipe.items())


@functools.lru_cache(maxsize=None)
def no_effect():
    import main
    return set(main.NO_EFFECT)


@functools.lru_cache(maxsize=None)
def main_defaults():
    """main.py's settings when no flag is given."""
    return vars(main_parser().parse_args([]))


@functools.lru_cache(maxsize=None)
def main_parser():
    import main
    return main.get_args_parser()


class Run(typing.NamedTuple):
    best: float         # the highest test acc@1 over epochs
    final: float        # the last epoch's
    departures: list    # recipe_departures
    folder: str         # seed<T>, or seed<T>_selection<S> in the median rows


RUN_FOLDER = re.compile(r'seed(\d+)(_selection\d+)?')  # as scripts/tables.py names them


def collect(root):
    """{(table, row, dataset, model): [Run per run folder]} from
    root/table<N>/<row>/<dataset>/<model>/seed<T>/ (departures: recipe_departures); in the median rows, only the
    seed<T>_selection<S>/ folders that scripts/tables.py writes there. Any other folder with a log.txt (a copy
    such as seed0_rerun, which would count twice), and a run that logged no test accuracy, is left out with a note."""
    import tables
    results, own = {}, {}
    for dirpath, dirnames, files in os.walk(root):
        dirnames.sort()  # runs, notes and departures in one order, whatever the file system's
        if 'log.txt' not in files:
            continue
        parts = os.path.relpath(dirpath, root).split(os.sep)
        if parts[0] in tables.FIGURES:  # Figure 4's runs, beside the tables: scripts/figures.py reads them
            continue
        if len(parts) != 5 or not re.fullmatch(r'table\d+', parts[0]) or not RUN_FOLDER.fullmatch(parts[4]):
            print(f'note: skipped {dirpath}: not a run folder of scripts/tables.py '
                  f'(table<N>/<row>/<dataset>/<model>/seed<T>[_selection<S>])', file=sys.stderr)
            continue
        if is_median_row(int(parts[0][5:]), parts[1]) != ('_selection' in parts[4]):
            print(f'note: skipped {dirpath}: scripts/tables.py writes seed<T>_selection<S> folders in the rows the '
                  f'paper reports as a median over selections, seed<T> folders elsewhere', file=sys.stderr)
            continue
        accs = run_accuracies(os.path.join(dirpath, 'log.txt'))
        if accs is None:
            print(f'note: skipped {dirpath}: it logged no test accuracy (stopped before its first evaluation, or '
                  f'--disable_eval)', file=sys.stderr)
            continue
        key = (int(parts[0][5:]), parts[1], parts[2], parts[3])
        if key not in own:
            own[key] = row_flags(*key)
        results.setdefault(key, []).append(Run(*accs, recipe_departures(dirpath, parts[4], own[key]), parts[4]))
    return results


def cell_values(runs, which, median):
    """The values a cell sums up: each run's accuracy (`which`: 'best' or 'final'); in a median row, for each
    training seed the median over its selections, so that the spread between selections and the one between
    training seeds are not mixed."""
    if not median:
        return [getattr(run, which) for run in runs]
    by_seed = {}
    for run in runs:
        by_seed.setdefault(run.folder.split('_selection')[0], []).append(getattr(run, which))
    return [statistics.median(v) for _, v in sorted(by_seed.items())]


def fmt(values, median=False, n_runs=None):
    if not values:
        return '-'
    if median:
        if len(values) == 1:
            return f'median {values[0]:.1f} (n={n_runs})'
        return (f'medians {statistics.mean(values):.1f} ± {statistics.stdev(values):.1f} '
                f'(n={n_runs}, {len(values)} seeds)')
    if len(values) == 1:
        return f'{values[0]:.1f}'
    return f'{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f} (n={len(values)})'


def _stats(values):
    """(mean, std, median) as CSV text; std empty for a single run."""
    if not values:
        return '', '', ''
    return (f'{statistics.mean(values):.2f}', f'{statistics.stdev(values):.2f}' if len(values) > 1 else '',
            f'{statistics.median(values):.2f}')


def is_median_row(table, row):
    """Whether the paper reports this row as a median over selections (scripts/tables.py's MEDIAN_OF_THREE)."""
    import tables
    return any((n, tables.slug(r)) == (table, row) for n, r in tables.MEDIAN_OF_THREE)


def write_tables(results, out):
    os.makedirs(out, exist_ok=True)
    tables = sorted({k[0] for k in results})
    md = ['# Results\n', 'Test acc@1 (%) as "best / final / paper": ours as mean ± std over seeds of each run\'s '
          'best epoch (the official code\'s "max accuracy", picked on the test set) and of its final epoch, '
          'then the paper\'s number; "median" where the paper reports the median of three selections ("medians '
          'm ± s" with several training seeds: mean ± std over training seeds of the median over selections; '
          'in tables.csv such rows sum up those medians).\n']
    rows_csv = [('table', 'row', 'dataset', 'model', 'n', 'best_mean', 'best_std', 'best_median', 'final_mean',
                 'final_std', 'final_median', 'paper', 'departures_from_recipe')]
    for t in tables:
        keys = sorted({k[1:] for k in results if k[0] == t} | set(PAPER.get(t, {})))
        columns = sorted({(d, m) for _, d, m in keys})
        row_names = list(dict.fromkeys(r for r, _, _ in keys))
        md.append(f'\n## Table {t}\n')
        md.append('| row | ' + ' | '.join(f'{d} {m} (best / final / paper)' for d, m in columns) + ' |')
        md.append('|---' * (len(columns) + 1) + '|')
        notes = []
        for r in row_names:
            cells = []
            for d, m in columns:
                runs = results.get((t, r, d, m), [])
                median = is_median_row(t, r)
                best, final = cell_values(runs, 'best', median), cell_values(runs, 'final', median)
                departures = [line for run in runs for line in run.departures]
                paper = PAPER.get(t, {}).get((r, d, m))
                mark = ''
                if departures:  # not the paper's recipe: the comparison with its number does not hold
                    notes.append(f'{len(notes) + 1}. {r}, {d} {m}: ' + '; '.join(departures))
                    mark = f' [off recipe: {len(notes)}]'
                paper_cell = paper if paper is not None else '-'
                cells.append(f'{fmt(best, median, len(runs))} / {fmt(final, median, len(runs))} / {paper_cell}{mark}')
                if runs or paper is not None:
                    rows_csv.append((t, r, d, m, len(runs), *_stats(best), *_stats(final),
                                     paper if paper is not None else '', '; '.join(departures)))
            md.append(f'| {r} | ' + ' | '.join(cells) + ' |')
        if notes:
            md.append('\nRuns whose settings are not the recipe they were launched with (their config.yaml against '
                      "main.py's defaults as the --config files of their command set them), or that did not "
                      'finish:\n')
            md.extend(notes)
    with open(os.path.join(out, 'tables.md'), 'w') as f:
        f.write('\n'.join(md) + '\n')
    with open(os.path.join(out, 'tables.csv'), 'w', newline='') as f:
        csv.writer(f).writerows(rows_csv)


def main(argv=None):
    p = utils.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('root', help='the OUTPUT folder of scripts/tables.py')
    p.add_argument('--out', default='results')
    args = p.parse_args(argv)
    if not os.path.isdir(args.root):
        print(f'error: {args.root} is not a folder; pass the OUTPUT folder of scripts/tables.py', file=sys.stderr)
        sys.exit(1)
    # before reading every run
    utils.check_folder_writable(args.out, '--out', ' for tables.md and tables.csv (made if missing)')
    results = collect(args.root)
    if not results:
        print(f'error: no runs under {args.root} (expected table<N>/<row>/<dataset>/<model>/seed<S>/log.txt)',
              file=sys.stderr)
        sys.exit(1)
    write_tables(results, args.out)
    print(f'{len(results)} settings from {sum(len(v) for v in results.values())} runs -> '
          f'{os.path.join(args.out, "tables.md")}, {os.path.join(args.out, "tables.csv")}')


if __name__ == '__main__':
    utils.run_cli(main)
