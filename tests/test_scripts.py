"""scripts/: the commands they print, and their argument checks."""
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, assert_clean_failure, expect_cli_error, run_script

DATASETS = ['cifar10', 'cifar100', 'pets', 'flowers', 'stl10', 'food101', 'dtd', 'svhn', 'eurosat', 'imagenet']


def bash(script, *args, **env):
    full_env = {k: v for k, v in os.environ.items() if k not in ('DATA_PATH', 'DATA_ROOT')}
    full_env.update(PYTHON=sys.executable, **env)
    return subprocess.run(['bash', os.path.join(ROOT, 'scripts', script), *args], env=full_env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize('dataset', DATASETS)
def test_dataset_script_prints_selection_and_both_trainings(tmp_path, dataset):
    teachers = tmp_path / 'teachers'
    teachers.mkdir()
    (teachers / 'vit_small_patch16_224.augreg_in21k.pth').write_bytes(b'')
    proc = bash(f'{dataset}.sh', DRY_RUN='1', DATA_PATH='/data/x', OUTPUT='/out', NGPUS='8', TEACHER_DIR=str(teachers))
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith('+ ')]
    train = [line for line in lines if 'main.py' in line]
    select = [line for line in lines if 'weight_selection.py' in line]
    assert len(train) == 4 and len(select) == 2
    for model in ('vit_tiny', 'convnext_femto'):
        config = os.path.join(ROOT, 'configs', f'{model}_{dataset}.yaml')
        assert os.path.isfile(config)
        assert sum(f'--config {config}' in line for line in train) == 2
    assert all('--nproc_per_node=8' in line and '--data_path /data/x' in line for line in train)
    assert sum('--initialize /out/ws/' in line for line in train) == 2
    assert any(f'--teacher_checkpoint {teachers}/vit_small_patch16_224.augreg_in21k.pth' in line for line in select)
    assert sum('--teacher_checkpoint' in line for line in select) == 1  # no local ConvNeXt-T: from the hub


def test_failed_step_stops_the_table_with_its_own_error_and_names_the_step(tmp_path):
    """A step that fails (here: no data) stops the script with the step's one error line, then one line naming
    the step; no traceback (one GPU runs main.py without torchrun)."""
    proc = bash('cifar10.sh', DATA_PATH=str(tmp_path / 'data'), OUTPUT=str(tmp_path / 'out'), MODELS='vit_tiny')
    assert_clean_failure(proc, 'CIFAR10 not found')
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('stopped: this step failed (exit status 1)') and 'main.py' in last, last
    assert proc.stdout.count('+ ') == 1  # the steps after it were not run


def test_select_extra_reaches_the_selections_only():
    proc = bash('cifar10.sh', DRY_RUN='1', DATA_PATH='/d', MODELS='vit_tiny', SELECT_EXTRA='--quiet',
                EXTRA='--epochs 1')
    lines = [line for line in proc.stdout.splitlines() if line.startswith('+ ')]
    assert [line.endswith('--quiet') for line in lines] == ['weight_selection.py' in line for line in lines]
    assert all(line.endswith('--epochs 1') for line in lines if 'main.py' in line)


@pytest.mark.parametrize('var,flag,use', [('SELECT_EXTRA', '--seed 7', 'SELECTION_SEEDS'), ('EXTRA', '--seed=0', 'SEEDS'),
                                          ('EXTRA', '--output_dir /o', 'OUTPUT'), ('SELECT_EXTRA', '--output x.pth', 'OUTPUT')])
def test_extra_flags_may_not_override_what_the_table_sets_per_run(var, flag, use):
    """Table 3's three random selections given one --seed would be one selection three times (a median of
    nothing); every seed's run given one --seed, one run n times: refused before any step, naming the variable."""
    proc = bash('table3.sh', DRY_RUN='1', DATA_ROOT='/d', MODELS='vit_tiny', **{var: flag})
    assert_clean_failure(proc, f'{var} sets {flag.split()[0].split("=")[0]}, which the table sets for each run', use)
    assert '+ ' not in proc.stdout


def test_filters_that_leave_no_run_stop_the_table():
    proc = bash('table3.sh', DRY_RUN='1', DATA_ROOT='/d', DATASETS='cifar10')
    assert_clean_failure(proc, "DATASETS='cifar10' leaves no run of table 3, whose runs cover datasets cifar100")


def test_select_extra_student_kwargs_reach_every_selection_and_name_their_own_files():
    extra = "--student_kwargs '{\"img_size\": 32}'"
    proc = bash('table5.sh', DRY_RUN='1', DATA_ROOT='/d', DATASETS='cifar10', MODELS='vit_tiny', SELECT_EXTRA=extra)
    select = [line for line in proc.stdout.splitlines() if 'weight_selection.py' in line]
    clip = [line for line in select if 'clip' in line]
    assert len(select) == 4 and len(clip) == 1, proc.stdout + proc.stderr
    assert all(line.endswith(extra) for line in select)
    # the CLIP row: a ViT-T in CLIP's layout, selected from and trained as that model
    assert '--student vit_tiny_patch16_clip_224' in clip[0]
    plain = bash('table5.sh', DRY_RUN='1', DATA_ROOT='/d', DATASETS='cifar10', MODELS='vit_tiny')
    files = [set(re.findall(r'--output (\S+)', p.stdout)) for p in (proc, plain)]
    assert len(files[0]) == 4 and not files[0] & files[1]  # a trial's selections are never reused as the recipe's
    assert all(f'--initialize {f}' in proc.stdout for f in files[0])
    bad = bash('table5.sh', DRY_RUN='1', DATA_ROOT='/d', DATASETS='cifar10', SELECT_EXTRA='--student_kwargs {"a":1}')
    assert_clean_failure(bad, 'SELECT_EXTRA: --student_kwargs needs a JSON object')


def test_table2_runs_every_dataset():
    proc = bash('table2.sh', DRY_RUN='1', DATA_ROOT='/data')
    assert proc.returncode == 0, proc.stderr
    for d in DATASETS:
        assert f'--data_path /data/{d} ' in proc.stdout


def test_table4_tunes_alpha_on_the_distillation_rows_alone():
    """The paper tunes α on its distillation runs: ROWS=distill runs those alone, with DISTILL_ALPHA in both
    halves (logit on ImageNet, feature on CIFAR-100); the default is 1."""
    proc = bash('table4.sh', DRY_RUN='1', DATA_ROOT='/d', ROWS='distill', DISTILL_ALPHA='0.5', OUTPUT='/o')
    lines = [line for line in proc.stdout.splitlines() if line.startswith('+ ')]
    assert len(lines) == 2, proc.stdout + proc.stderr
    assert all('/o/table4/distill/' in line and line.count('--distill_alpha') == 1 and '--distill_alpha 0.5' in line
               for line in lines)
    assert {re.search(r'--distill (\w+)', line).group(1) for line in lines} == {'logit', 'feature'}
    plain = bash('table4.sh', DRY_RUN='1', DATA_ROOT='/d').stdout
    assert plain.count('--distill_alpha 1.0') == 4 and plain.count('--distill_alpha') == 4  # 2 rows x 2 halves


@pytest.mark.parametrize('script,args,env,needle', [
    ('table4.sh', [], {'DATA_ROOT': '/d', 'ROWS': 'distil'},
     "unknown row 'distil' in ROWS; choose from baseline distill weight_selection distill_weight_selection"),
    ('table4.sh', [], {'DATA_ROOT': '/d', 'DISTILL_ALPHA': '-1'}, "DISTILL_ALPHA='-1': give Table 4's distillation"),
    ('table4.sh', [], {'DATA_ROOT': '/d', 'DISTILL_ALPHA': 'x'}, "DISTILL_ALPHA='x': give Table 4's distillation"),
    ('table2.sh', [], {'DATA_ROOT': '/d', 'DATASETS': 'cifar1000'}, "unknown dataset 'cifar1000'"),
    ('cifar10.sh', [], {}, 'set DATA_ROOT'),
    ('cifar10.sh', [], {'DATA_PATH': '/d', 'MODELS': 'resnet50'}, "unknown model 'resnet50'"),
    ('table2.sh', [], {}, 'set DATA_ROOT'),
])
def test_script_argument_checks(script, args, env, needle):
    assert_clean_failure(bash(script, *args, **env), needle)


@pytest.mark.parametrize('ngpus', ['0', 'abc', '-1'])
def test_tables_refuse_a_number_of_gpus_that_is_not_one_or_more(ngpus):
    """NGPUS=0 printed (and ran) torchrun --nproc_per_node=0."""
    proc = bash('cifar10.sh', DRY_RUN='1', DATA_PATH='/d', NGPUS=ngpus)
    assert_clean_failure(proc, f"NGPUS='{ngpus}': give the number of GPUs, a whole number 1 or more")
    assert '+ ' not in proc.stdout


def scripts_module(name):
    sys.path.insert(0, os.path.join(ROOT, 'scripts'))
    import importlib
    return importlib.import_module(name)


def run_folder(root, lines):
    folder = root / 'table2' / 'random_init' / 'cifar100' / 'vit_tiny' / 'seed0'
    folder.mkdir(parents=True)
    (folder / 'log.txt').write_text(''.join(line + '\n' for line in lines))
    return folder


@pytest.mark.parametrize('case', ['log line not JSON', 'log line not a record', 'out is a file', 'out under a file'])
def test_collect_results_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, case):
    collect_results = scripts_module('collect_results')
    good = '{"epoch": 0, "test_acc1": 50.0}'
    lines = {'log line not JSON': [good, '{"epoch": 1, "test_a'], 'log line not a record': [good, '[1, 2]']}
    run_folder(tmp_path / 'runs', lines.get(case, [good]))
    (tmp_path / 'a_file').write_text('')
    out = {'out is a file': tmp_path / 'a_file', 'out under a file': tmp_path / 'a_file' / 'res'}.get(case,
                                                                                                    tmp_path / 'res')
    needle = {'log line not JSON': 'log.txt, line 2: not JSON', 'log line not a record': 'line 2: not a JSON record',
              'out is a file': 'a_file is a file; give a folder for tables.md',
              'out under a file': 'a_file is a file'}[case]
    expect_cli_error(collect_results.main, [str(tmp_path / 'runs'), '--out', str(out)], capsys, needle)
    assert not (tmp_path / 'res').exists()


def test_figures_refuse_a_format_matplotlib_cannot_write_before_drawing(tmp_path, capsys):
    pytest.importorskip('matplotlib', reason='figures need matplotlib (requirements-figures.txt)')
    figures = scripts_module('figures')
    run = run_folder(tmp_path / 'runs', ['{"epoch": 0, "test_acc1": 50.0, "train_loss": 1.0}'])
    expect_cli_error(figures.main, ['curves', str(run), '--out', str(tmp_path / 'fig.txt')], capsys,
                     'fig.txt: matplotlib cannot write .txt files; give one of', '.png')
    assert not (tmp_path / 'fig.txt').exists()
    (run / 'log.txt').write_text('{"epoch": 0, "test_acc1": 50.0, "train_loss": 1.0}\n{"epo\n')
    expect_cli_error(figures.main, ['budget', str(run), '--out', str(tmp_path / 'fig.png')], capsys,
                     'log.txt, line 2: not JSON')
    assert not (tmp_path / 'fig.png').exists()


@pytest.mark.parametrize('flags,needle', [
    (['--element_selection', 'unifrom'], "--element_selection: invalid choice: 'unifrom'"),
    (['--layer_selection', 'bogus'], "unknown layer selection 'bogus'"),
    (['--layer_selection', '0,1'], '--layer_selection for \'layers\' must list 6 teacher blocks'),
    (['--repeat', '0'], '--repeat 0 must be 1 or more'),
    (['--output', 'nodir/bench.json'], 'cannot write nodir/bench.json: folder'),
])
def test_benchmark_selection_checks_its_options_before_writing_a_teacher(tmp_path, capsys, monkeypatch, flags, needle):
    """A mistake is one line, before the synthetic teacher (13.5 GB at 7b) is written into --cache."""
    benchmark_selection = scripts_module('benchmark_selection')
    monkeypatch.chdir(tmp_path)
    expect_cli_error(benchmark_selection.main, ['--cache', str(tmp_path / 'cache'), '--size', 'tiny', *flags],
                     capsys, needle)
    assert not (tmp_path / 'cache').exists()


def test_benchmark_selection_reports_a_mistake_in_one_line(tmp_path):
    """Its main runs through utils.run_cli: a UserError is one line, not a traceback; --cache a file too."""
    (tmp_path / 'a_file').write_text('')
    proc = run_script(os.path.join('scripts', 'benchmark_selection.py'), '--cache', str(tmp_path / 'a_file'),
                      '--size', 'tiny', timeout=120)
    assert_clean_failure(proc, 'a_file is a file; give a folder for the synthetic teacher')


GPU_STUDY_USAGE = ('usage: bash scripts/gpu_study.sh prepare | teacher FAMILY OUT | unpack FAMILY FILES | family FAMILY '
                   'MINUTES OUT | dinov2 MINUTES OUT | merge OUT RUNS.jsonl...')


@pytest.mark.parametrize('args, first', [([], ''), (['teacher', 'vit'], 'teacher needs 2 argument(s), got 1; '),
                                         (['family', 'vit', '3'], 'family needs 3 argument(s), got 2; '),
                                         (['dinov2', ''], 'dinov2 needs 2 argument(s), got 0; '),
                                         (['merge'], 'merge needs 1 argument(s), got 0; ')])
def test_gpu_study_without_its_arguments_prints_the_usage_line(args, first):
    """One line, status 2, naming what is missing: not bash's 'line 41: 1: usage: ...' of ${1:?}."""
    proc = bash('gpu_study.sh', *args)
    expected = (f'gpu_study.sh: {first}' if first else '') + GPU_STUDY_USAGE + '\n'
    assert proc.returncode == 2 and proc.stderr == expected, proc.stderr


def test_gpu_study_unpack_names_a_missing_files_folder(tmp_path):
    proc = bash('gpu_study.sh', 'unpack', 'vit', str(tmp_path / 'nope'))
    assert proc.returncode == 1 and proc.stderr.strip().count('\n') == 0, proc.stderr
    assert proc.stderr.startswith(f'gpu_study.sh: FILES folder {tmp_path / "nope"} does not exist'), proc.stderr


@pytest.mark.parametrize('argv,env,needle', [
    (['fig4a'], {'EPOCHS': '0 100'}, "EPOCHS='0 100': give whole numbers of epochs above 0, e.g. EPOCHS='50 100 150"),
    (['fig4b'], {'EPOCHS': 'ten'}, "EPOCHS='ten': give whole numbers of epochs above 0, e.g. EPOCHS='10 20 40"),
    (['fig5'], {}, 'usage: tables.py TABLE (2 3 4 5 6 7 8 9 10 11 12 16 17) or FIGURE (fig4a fig4b)'),
])
def test_figure_runs_argument_checks(argv, env, needle):
    proc = run_script(os.path.join('scripts', 'tables.py'), *argv, env={**os.environ, 'DRY_RUN': '1', 'DATA_ROOT': '/d', **env})
    assert_clean_failure(proc, needle)
    assert '+ ' not in proc.stdout
