"""The CIFAR-10 transfer study's whole pipeline on the CPU (--smoke): data split, teacher pretraining,
every selection, students on the target subset, the DINOv2 student, the report."""
import json
import os

import pytest

import sys

from conftest import ROOT, run_script, shared_path



@pytest.mark.slow
def test_transfer_study_smoke(tmp_path):
    make_imagefolder = shared_path('data', 'cifar10', 'make_imagefolder.py')
    dinov2 = shared_path('teachers', 'dinov2_vits14_imgfocus_fp16.pt')
    out = tmp_path / 'study'
    proc = run_script(os.path.join('scripts', 'transfer_study.py'), '--out', str(out), '--smoke',
                      '--make_imagefolder', make_imagefolder, '--dinov2', dinov2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / 'runs.jsonl').read_text().splitlines()]
    inits = {r['init'] for r in records}
    assert len(records) == 2 * 9 + 2
    assert {'random init', 'ws uniform', 'ws random_inconsistent', 'ws l1', 'ws magnitude',
            'ws uniform, uniform layers', 'ws uniform (DINOv2)'} <= inits
    assert all(0 <= r['final_acc1'] <= 100 for r in records)
    report = (out / 'transfer_study.md').read_text()
    assert 'SMOKE RUN' in report and 'weight_selection.py' in report and report.count('\n| ') >= 21
    # the selections really came from the pretrained teachers
    assert (out / 'teachers' / 'vit' / 'checkpoint-best.pth').exists()
    assert len(os.listdir(out / 'ws')) == 2 * 8 + 1
    assert '--blr 0.002' in report and '--drop_path 0.0' in report and '--blr 0.004' in report


@pytest.mark.slow
def test_transfer_study_time_budget_writes_partial_report(tmp_path):
    make_imagefolder = shared_path('data', 'cifar10', 'make_imagefolder.py')
    out = tmp_path / 'study'
    proc = run_script(os.path.join('scripts', 'transfer_study.py'), '--out', str(out), '--smoke',
                      '--make_imagefolder', make_imagefolder, '--time_budget_min', '0')
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'run the same command again to continue' in proc.stdout
    assert 'PARTIAL' in (out / 'transfer_study.md').read_text()
    assert (out / 'runs.jsonl').read_text() == ''


@pytest.mark.slow
def test_transfer_study_dinov2_only_at_another_size(tmp_path):
    """--families with no value runs only the DINOv2 study (no source task unpacked); its input size and
    the number of target test images are settings, and they name their own folders."""
    make_imagefolder = shared_path('data', 'cifar10', 'make_imagefolder.py')
    dinov2 = shared_path('teachers', 'dinov2_vits14_imgfocus_fp16.pt')
    out = tmp_path / 'study'
    proc = run_script(os.path.join('scripts', 'transfer_study.py'), '--out', str(out), '--smoke', '--families',
                      '--make_imagefolder', make_imagefolder, '--dinov2', dinov2, '--dinov2_input_size', '56')
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / 'runs.jsonl').read_text().splitlines()]
    assert [(r['family'], r['init']) for r in records] == [('dinov2 vit_tiny/14 @56', 'random init'),
                                                         ('dinov2 vit_tiny/14 @56', 'ws uniform (DINOv2)')]
    assert sorted(os.listdir(out / 'data')) == ['target_4_test4']
    assert os.listdir(out / 'ws') == ['dinov2_vit_tiny_14_56px.pth']
    config = (out / 'students' / 'dinov2_56px_test4' / 'n4' / 'ws' / 'seed0' / 'config.yaml').read_text()
    assert 'input_size: 56' in config
    report = (out / 'transfer_study.md').read_text()
    assert 'on 20 target test images' in report and '| dinov2 vit_tiny/14 @56 | 4 | 1 | 0.002 | random init |' in report


def test_report_gives_paired_differences_from_random_init():
    sys.path.insert(0, os.path.join(ROOT, 'scripts'))
    import transfer_study
    run = lambda init, seed, final, best: {'family': 'vit', 'per_class': 100, 'epochs': 30, 'init': init,  # noqa: E731
                                           'seed': seed, 'blr': 2e-3, 'final_acc1': final, 'best_acc1': best}
    rows = transfer_study.report_rows([run('random init', 0, 40.0, 42.0), run('random init', 1, 44.0, 45.0),
                                       run('ws uniform', 1, 47.0, 48.0), run('ws uniform', 0, 41.0, 43.0)])
    assert rows == ['| vit | 100 | 30 | 0.002 | random init | 42.0 ± 2.8 |  | 43.5 ± 2.1 | 2 |',
                    # seed 1: 47 - 44 = 3, seed 0: 41 - 40 = 1 -> 2.0 ± 1.4 (paired, not 44.0 - 42.0 by chance)
                    '| vit | 100 | 30 | 0.002 | ws uniform | 44.0 ± 4.2 | 2.0 ± 1.4 | 45.5 ± 3.5 | 2 |']
