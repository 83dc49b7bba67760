"""scripts/: the commands they print, and their argument checks."""
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, assert_clean_failure

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
    proc = bash('cifar10.sh', DRY_RUN='1', DATA_PATH='/d', MODELS='vit_tiny', SELECT_EXTRA='--seed 7',
                EXTRA='--epochs 1')
    lines = [line for line in proc.stdout.splitlines() if line.startswith('+ ')]
    assert [line.endswith('--seed 7') for line in lines] == ['weight_selection.py' in line for line in lines]
    assert all(line.endswith('--epochs 1') for line in lines if 'main.py' in line)


def test_select_extra_student_kwargs_merge_with_the_rows_and_name_their_own_files():
    extra = "--student_kwargs '{\"img_size\": 32}'"
    proc = bash('table5.sh', DRY_RUN='1', DATA_ROOT='/d', DATASETS='cifar10', MODELS='vit_tiny', SELECT_EXTRA=extra)
    select = [line for line in proc.stdout.splitlines() if 'weight_selection.py' in line]
    clip = [line for line in select if 'clip' in line]
    assert len(select) == 4 and len(clip) == 1, proc.stdout + proc.stderr
    assert '--student_kwargs \'{"pre_norm": true, "img_size": 32}\'' in clip[0]  # the CLIP row keeps pre_norm
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


@pytest.mark.parametrize('script,args,env,needle', [
    ('table2.sh', [], {'DATA_ROOT': '/d', 'DATASETS': 'cifar1000'}, "unknown dataset 'cifar1000'"),
    ('cifar10.sh', [], {}, 'set DATA_ROOT'),
    ('cifar10.sh', [], {'DATA_PATH': '/d', 'MODELS': 'resnet50'}, "unknown model 'resnet50'"),
    ('table2.sh', [], {}, 'set DATA_ROOT'),
])
def test_script_argument_checks(script, args, env, needle):
    assert_clean_failure(bash(script, *args, **env), needle)
