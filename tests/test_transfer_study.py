"""The CIFAR-10 transfer study's whole pipeline on the CPU (--smoke): data split, teacher pretraining,
every selection, students on the target subset, the DINOv2 student, the report."""
import json
import os

import pytest

import sys

from conftest import ROOT, expect_cli_error, run_script, shared_path



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
    assert len(records) == 9 + 8 + 2  # ViT-S and ViT-T have 12 blocks each: no uniform-layers row for ViT
    assert {'random init', 'ws uniform', 'ws random_inconsistent', 'ws l1', 'ws magnitude',
            'ws uniform, uniform layers', 'ws uniform (DINOv2)'} <= inits
    assert {r['family'] for r in records if r['init'] == 'ws uniform, uniform layers'} == {'convnext'}
    assert all(0 <= r['final_acc1'] <= 100 for r in records)
    report = (out / 'transfer_study.md').read_text()
    assert 'SMOKE RUN' in report and 'weight_selection.py' in report and report.count('\n| ') >= 20
    # the selections really came from the pretrained teachers
    assert (out / 'teachers' / 'vit' / 'checkpoint-best.pth').exists()
    assert len(os.listdir(out / 'ws')) == 7 + 8 + 1
    assert '--blr 0.002' in report and '--drop_path 0.0' in report and '--blr 0.004' in report
    assert not list((out / 'students').glob('**/checkpoint-*.pth'))  # students keep logs only
    assert sorted(os.listdir(out / 'teachers' / 'vit')) == [
        'checkpoint-0.pth', 'checkpoint-best.pth', 'config.yaml', 'log.txt', 'run_info.json']
    assert all(len(r['teacher_weights_sha256']) == 64 for r in records if r['init'].startswith('ws ')
               and not r['family'].startswith('dinov2'))
    assert all(len(r['teacher_file_sha256']) == 64 for r in records if r['init'] == 'ws uniform (DINOv2)')

    # A later call on a bare machine, given the records only: nothing runs again, not even the teachers.
    again = tmp_path / 'again'
    proc = run_script(os.path.join('scripts', 'transfer_study.py'), '--out', str(again), '--smoke',
                      '--make_imagefolder', make_imagefolder, '--dinov2', dinov2, '--done', str(out / 'runs.jsonl'))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (again / 'runs.jsonl').read_text() == (out / 'runs.jsonl').read_text()
    assert sorted(os.listdir(again)) == ['runs.jsonl', 'transfer_study.md']  # no data, teacher, selection, student
    merged = (again / 'transfer_study.md').read_text()
    assert f'{len(records)} of the {len(records)} runs came from --done' in merged
    assert 'No run in this call' in merged and '## Commands' not in merged and 'wall time' not in merged
    import torch  # the versions are the records', not the merging machine's
    assert f'(code {records[0]["code"]}; torch {torch.__version__}; timm ' in merged and 'Device:' not in merged

    # With one ViT record missing, that run alone trains, after its teacher (trained again, the same weights).
    kept = [line for line in (out / 'runs.jsonl').read_text().splitlines()
            if not ('"family": "vit"' in line and '"init": "ws l1"' in line)]
    (tmp_path / 'kept.jsonl').write_text('\n'.join(kept) + '\n')
    third = tmp_path / 'third'
    proc = run_script(os.path.join('scripts', 'transfer_study.py'), '--out', str(third), '--smoke', '--families',
                      'vit', 'convnext', '--make_imagefolder', make_imagefolder, '--done', str(tmp_path / 'kept.jsonl'))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.parent.name for p in (third / 'students').glob('**/log.txt')] == ['seed0']
    assert list((third / 'students').glob('vit_test4/n4/*/ws_l1_teacher*/seed0/log.txt'))
    assert not (third / 'teachers' / 'convnext').exists()
    redone = [json.loads(line) for line in (third / 'runs.jsonl').read_text().splitlines()]
    assert len(redone) == len(records)  # the DINOv2 records, not part of this call's grid, are kept too
    assert (third / 'transfer_study.md').read_text().count('| dinov2 vit_tiny/14 @224 |') == 2
    l1 = [r for r in redone if r['family'] == 'vit' and r['init'] == 'ws l1'][0]
    first = [r for r in records if r['family'] == 'vit' and r['init'] == 'ws l1'][0]
    assert l1['teacher_weights_sha256'] == first['teacher_weights_sha256']  # CPU: the same teacher again
    assert l1['final_acc1'] == first['final_acc1']


@pytest.mark.slow
def test_transfer_study_carries_a_teacher_between_calls(tmp_path):
    """--teachers DIR --only_teachers pretrains the teacher and writes its weights there in fp16 (a plain
    torch.load reads them), and runs no student (not the DINOv2 ones either); a later call given DIR trains no
    teacher, and every selection names that file's weights; one trained otherwise is refused before any run."""
    import torch
    sys.path.insert(0, os.path.join(ROOT, 'scripts'))
    import transfer_study
    make_imagefolder = shared_path('data', 'cifar10', 'make_imagefolder.py')
    teachers = tmp_path / 'teachers'
    flags = ['--smoke', '--families', 'vit', '--make_imagefolder', make_imagefolder, '--teachers', str(teachers)]
    proc = run_script(os.path.join('scripts', 'transfer_study.py'), '--out', str(tmp_path / 'first'), '--only_teachers',
                      *flags, '--dinov2', shared_path('teachers', 'dinov2_vits14_imgfocus_fp16.pt'))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.listdir(teachers) == ['vit.pth'] and not (tmp_path / 'first' / 'students').exists()
    weights = torch.load(teachers / 'vit.pth')['model']
    assert {v.dtype for v in weights.values()} == {torch.float16}
    trained = torch.load(tmp_path / 'first' / 'teachers' / 'vit' / 'checkpoint-best.pth')['model']
    assert all(torch.equal(weights[k], trained[k].half()) for k in trained)

    proc = run_script(os.path.join('scripts', 'transfer_study.py'), '--out', str(tmp_path / 'second'), *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / 'second' / 'teachers').exists() and 'main.py --model vit_small' not in proc.stdout
    records = [json.loads(line) for line in (tmp_path / 'second' / 'runs.jsonl').read_text().splitlines()]
    shas = {r['teacher_weights_sha256'] for r in records if r['init'] != 'random init'}
    assert shas == {transfer_study.weights_sha256(teachers / 'vit.pth')} and len(records) == 8

    # a teacher trained otherwise (here: the smoke run's, for a study of real settings) is refused, not used
    proc = run_script(os.path.join('scripts', 'transfer_study.py'), '--out', str(tmp_path / 'third'), '--families', 'vit',
                      '--make_imagefolder', make_imagefolder, '--teachers', str(teachers), '--subsets', '4',
                      '--per_class_test', '4', '--device', 'cpu', '--student_epochs', '1', '1', '--num_workers', '0',
                      '--batch_size', '4')
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr
    assert "was trained with {'family': 'vit', 'teacher_epochs': 1" in proc.stderr and "'teacher_epochs': 100" in proc.stderr
    assert not (tmp_path / 'third' / 'data').exists()  # found at the start, not after the random-init runs


@pytest.mark.slow
def test_transfer_study_time_budget_writes_partial_report(tmp_path):
    make_imagefolder = shared_path('data', 'cifar10', 'make_imagefolder.py')
    out = tmp_path / 'study'
    proc = run_script(os.path.join('scripts', 'transfer_study.py'), '--out', str(out), '--smoke',
                      '--make_imagefolder', make_imagefolder, '--time_budget_min', '1e-6')
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'run the same command again to continue' in proc.stdout
    assert 'PARTIAL' in (out / 'transfer_study.md').read_text()
    assert (out / 'runs.jsonl').read_text() == ''


@pytest.mark.slow
def test_transfer_study_dinov2_only_at_another_size(tmp_path):
    """--families with no value runs only the DINOv2 study (no source task unpacked); its input size and
    the number of target test images are settings, and they name their own folders. --lr_search trains
    random init once per candidate on the carved validation split, and the study uses the chosen one."""
    make_imagefolder = shared_path('data', 'cifar10', 'make_imagefolder.py')
    dinov2 = shared_path('teachers', 'dinov2_vits14_imgfocus_fp16.pt')
    out = tmp_path / 'study'
    proc = run_script(os.path.join('scripts', 'transfer_study.py'), '--out', str(out), '--smoke', '--families',
                      '--make_imagefolder', make_imagefolder, '--dinov2', dinov2, '--dinov2_input_size', '56',
                      '--lr_search', '1e-3', '3e-3')
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / 'runs.jsonl').read_text().splitlines()]
    assert [(r['split'], r['blr']) for r in records[:2]] == [('validation', 1e-3), ('validation', 3e-3)]
    chosen = max(records[:2], key=lambda r: r['final_acc1'])['blr']  # the first of equals
    assert [(r['family'], r['init'], r['split'], r['blr']) for r in records[2:]] == [
        ('dinov2 vit_tiny/14 @56', 'random init', 'test', chosen),
        ('dinov2 vit_tiny/14 @56', 'ws uniform (DINOv2)', 'test', chosen)]
    assert sorted(os.listdir(out / 'data')) == ['target_4_test4', 'target_4_test4_val1']
    tag = f"teacher{records[-1]['teacher_file_sha256'][:8]}"  # the files name their teacher
    assert os.listdir(out / 'ws') == [f'dinov2_vit_tiny_14_56px_{tag}.pth']
    run_dir = out / 'students' / 'dinov2_56px_test4' / 'n4' / f'blr{chosen:g}' / f'ws_{tag}' / 'seed0'
    config = (run_dir / 'config.yaml').read_text()
    assert 'input_size: 56' in config and f'blr: {chosen}' in config
    val_config = (out / 'lr_search' / 'dinov2_vit_tiny_14_56' / 'n4' / 'blr0.003' / 'seed0' / 'config.yaml').read_text()
    assert 'target_4_test4_val1' in val_config
    report = (out / 'transfer_study.md').read_text()
    assert 'on 20 target test images' in report
    assert f'| dinov2 vit_tiny/14 @56 | 4 | 1 | {chosen:g} | random init |' in report
    assert '| dinov2 vit_tiny/14 @56 | 3 + 1 | 1 | ' in report and f'**{chosen:g}**' in report


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
    # a seed without its random-init run: the difference says over how many seeds it is
    rows = transfer_study.report_rows([run('random init', 0, 40.0, 42.0), run('ws uniform', 0, 41.0, 43.0),
                                       run('ws uniform', 2, 60.0, 60.0)])
    assert rows[1] == '| vit | 100 | 30 | 0.002 | ws uniform | 50.5 ± 13.4 | 1.0 (n=1: the seeds with a random-init run) | 51.5 ± 12.0 | 2 |'


def test_report_pairs_each_init_with_random_init_of_the_same_recipe():
    sys.path.insert(0, os.path.join(ROOT, 'scripts'))
    import transfer_study
    run = lambda init, epochs, final: {'family': 'vit', 'per_class': 100, 'epochs': epochs, 'init': init,  # noqa: E731
                                       'seed': 0, 'blr': 2e-3, 'final_acc1': final, 'best_acc1': final}
    rows = transfer_study.report_rows([run('random init', 200, 60.0), run('random init', 100, 50.0),
                                       run('ws uniform', 100, 55.0)])
    assert rows[2] == '| vit | 100 | 100 | 0.002 | ws uniform | 55.0 | 5.0 | 55.0 | 1 |'  # not 55 - 60


def test_report_keeps_runs_of_different_devices_apart():
    """A record made on the CPU (float32) and one made on a GPU (bf16) under the same settings are two rows, each
    paired with random init on its own device; with one device the rows do not name it."""
    sys.path.insert(0, os.path.join(ROOT, 'scripts'))
    import transfer_study
    run = lambda init, device, final: {'family': 'vit', 'per_class': 100, 'epochs': 30, 'init': init,  # noqa: E731
                                       'seed': 0, 'blr': 2e-3, 'final_acc1': final, 'best_acc1': final,
                                       'device': device}
    rows = transfer_study.report_rows([run('random init', 'H100', 60.0), run('random init', 'cpu', 50.0),
                                       run('ws uniform', 'H100', 65.0), run('ws uniform', 'cpu', 51.0)])
    assert rows == ['| vit (H100) | 100 | 30 | 0.002 | random init | 60.0 |  | 60.0 | 1 |',
                    '| vit (cpu) | 100 | 30 | 0.002 | random init | 50.0 |  | 50.0 | 1 |',
                    '| vit (H100) | 100 | 30 | 0.002 | ws uniform | 65.0 | 5.0 | 65.0 | 1 |',
                    '| vit (cpu) | 100 | 30 | 0.002 | ws uniform | 51.0 | 1.0 | 51.0 | 1 |']
    # two GPU models are one kind: one row, named plainly
    rows = transfer_study.report_rows([run('random init', 'H100', 60.0), {**run('random init', 'H200', 62.0), 'seed': 1}])
    assert rows == ['| vit | 100 | 30 | 0.002 | random init | 61.0 ± 1.4 |  | 61.0 ± 1.4 | 2 |']


def test_report_keeps_the_selections_of_two_dinov2_files_apart():
    sys.path.insert(0, os.path.join(ROOT, 'scripts'))
    import transfer_study
    run = lambda init, final, sha=None: {'family': 'dinov2', 'per_class': 100, 'epochs': 30, 'init': init,  # noqa: E731
                                         'seed': 0, 'blr': 2e-3, 'final_acc1': final, 'best_acc1': final,
                                         'teacher_file_sha256': sha}
    rows = transfer_study.report_rows([run('random init', 50.0), run('ws', 55.0, 'd' * 64), run('ws', 53.0, 'e' * 64)])
    assert rows[1:] == ['| dinov2 | 100 | 30 | 0.002 | ws (teacher dddddddd) | 55.0 | 5.0 | 55.0 | 1 |',
                        '| dinov2 | 100 | 30 | 0.002 | ws (teacher eeeeeeee) | 53.0 | 3.0 | 53.0 | 1 |']


def study_args(monkeypatch, tmp_path, *flags):
    sys.path.insert(0, os.path.join(ROOT, 'scripts'))
    import transfer_study
    monkeypatch.setattr(sys, 'argv', ['transfer_study.py', '--out', str(tmp_path / 'out'), *flags])
    return transfer_study, transfer_study.get_args()


def test_done_records_pass_through_whole_and_only_those_of_the_same_settings_are_reported(tmp_path, monkeypatch,
                                                                                         capsys):
    ts, args = study_args(monkeypatch, tmp_path, '--eval_freq', '5', '--done', str(tmp_path / 'done.jsonl'))
    settings = {'batch_size': 128, 'test_per_class': 1000, 'teacher_epochs': 100, 'source': None, 'eval_freq': 5,
                'smoke': False}
    measured = {'final_acc1': 50.0, 'best_acc1': 51.0, 'train_minutes': 1.0, 'device': 'H100', 'run_dir': 'x'}
    random0 = {**ts.run_fields('vit', 100, 'random init', 0, 200, 2e-3), **settings, **measured}
    other_part = {**ts.run_fields('convnext', 100, 'random init', 0, 200, 4e-3), **settings, **measured}
    other_settings = {**random0, 'eval_freq': 1, 'final_acc1': 40.0}
    (tmp_path / 'done.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in (random0, other_part, other_settings)))
    out = tmp_path / 'out'
    out.mkdir()
    study = ts.Study(args, str(out))
    study.ran_on = {'device': 'NVIDIA H200', 'code': 'x'}  # another GPU: its records are reused
    got = study.measured(ts.run_fields('vit', 100, 'random init', 0, 200, 2e-3), lambda: pytest.fail('ran again'))
    assert got == random0
    ts.write_report(str(out), study, 60.0, args)
    kept = [json.loads(line) for line in (out / 'runs.jsonl').read_text().splitlines()]
    assert kept == [random0, other_part, other_settings]  # nothing lost for the next call
    report = (out / 'transfer_study.md').read_text()
    assert '| vit | 100 | 200 | 0.002 | random init | 50.0 |' in report
    assert '| convnext | 100 | 200 | 0.004 | random init | 50.0 |' in report and '40.0' not in report
    assert 'also keeps 1 record(s) of --done with other settings' in report
    assert '2 of the 2 runs came from --done' in report
    assert 'mean ± std over seeds 0;' in report  # the records' seeds, not this call's --seeds (0 1 2)

    # one run trained twice (two calls sent before the first's records were merged): the first record given is kept
    (tmp_path / 'done.jsonl').write_text(json.dumps(random0) + '\n' + json.dumps({**random0, 'final_acc1': 1.0}) + '\n')
    assert list(ts.Study(args, str(out)).done.values()) == [random0]
    assert 'note: --done holds two records of one run (vit, 100 per class, random init, seed 0' in capsys.readouterr().out


def test_a_selection_is_reused_only_from_its_teacher_where_the_teacher_is_known(tmp_path, monkeypatch):
    """A family's teacher retrained in a later session (its carried file lost) gives other weights: with that
    teacher known (carried), a selection recorded from the first one runs again, and both records are kept,
    in rows of their own; with the teacher not known yet (none carried), a record of any teacher is reused, so
    that a call whose runs are all recorded trains no teacher."""
    ts, args = study_args(monkeypatch, tmp_path, '--done', str(tmp_path / 'done.jsonl'))
    settings = {'batch_size': 128, 'test_per_class': 1000, 'teacher_epochs': 100, 'source': None, 'eval_freq': 1,
                'smoke': False}
    measured = {'final_acc1': 50.0, 'best_acc1': 51.0, 'train_minutes': 1.0, 'device': 'H100', 'run_dir': 'x'}
    a, b = 'a' * 64, 'b' * 64
    random0 = {**ts.run_fields('vit', 100, 'random init', 0, 200, 2e-3), **settings, **measured}
    l1_a = {**ts.run_fields('vit', 100, 'ws l1', 0, 200, 2e-3, teacher_weights_sha256=a), **settings, **measured,
            'final_acc1': 55.0}
    (tmp_path / 'done.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in (random0, l1_a)))
    out = tmp_path / 'out'
    out.mkdir()
    study = ts.Study(args, str(out))
    study.ran_on = {'device': 'NVIDIA H100', 'code': 'x'}
    fields = ts.run_fields('vit', 100, 'ws l1', 0, 200, 2e-3, teacher_weights_sha256=ts.ANY_TEACHER)
    assert study.measured(fields, lambda: pytest.fail('ran again')) == l1_a  # teacher not known yet: any
    study = ts.Study(args, str(out))
    study.ran_on = {'device': 'NVIDIA H100', 'code': 'x'}
    assert study.measured(ts.run_fields('vit', 100, 'random init', 0, 200, 2e-3), lambda: pytest.fail('ran')) == random0
    fields = ts.run_fields('vit', 100, 'ws l1', 0, 200, 2e-3, teacher_weights_sha256=b)
    l1_b = study.measured(fields, lambda: {**measured, 'final_acc1': 52.0, 'teacher_weights_sha256': b})
    assert l1_b['teacher_weights_sha256'] == b and l1_b['final_acc1'] == 52.0  # trained again, from teacher b
    ts.write_report(str(out), study, 60.0, args)
    kept = [json.loads(line) for line in (out / 'runs.jsonl').read_text().splitlines()]
    assert kept == [random0, l1_b, l1_a]
    report = (out / 'transfer_study.md').read_text()
    assert '| vit | 100 | 200 | 0.002 | ws l1 (teacher bbbbbbbb) | 52.0 | 2.0 | 51.0 | 1 |' in report
    assert '| vit | 100 | 200 | 0.002 | ws l1 (teacher aaaaaaaa) | 55.0 | 5.0 | 51.0 | 1 |' in report
    assert 'Teacher trainings behind the selections, per family: vit: 2.' in report
    ts.Study(argparse_done(args, out / 'runs.jsonl'), str(tmp_path))  # the next call reads both: two runs, not one


def fake_runs(ts, monkeypatch, study):
    """Study.train, select and imagefolder faked (no data, no training): returns the list of the student and
    teacher folders that 'trained', each run reaching 50% at its one epoch."""
    trained = []
    monkeypatch.setattr(study, 'imagefolder', lambda dest, *a, **k: dest)
    monkeypatch.setattr(study, 'select', lambda out, *a, **k: out)

    def train(out, *a, **k):
        trained.append(os.path.relpath(out, study.out))
        return [{'epoch': 0, 'test_acc1': 50.0, 'epoch_seconds': 1.0}]
    monkeypatch.setattr(study, 'train', train)
    return trained


def test_run_study_reruns_the_selections_of_another_teacher_than_the_carried_one(tmp_path, monkeypatch):
    """The grid as run_study walks it, with a carried teacher B and --done records of the selections of an
    earlier teacher A: random init is reused, every selection trains again from B (its folder named by B), and
    A's records are kept apart."""
    import torch
    done = tmp_path / 'done.jsonl'
    done.write_text('')
    ts, args = study_args(monkeypatch, tmp_path, '--families', 'vit', '--subsets', '4', '--seeds', '0',
                          '--student_epochs', '1', '1', '--blr', '2e-3', '--device', 'cpu',
                          '--teachers', str(tmp_path / 'teachers'), '--done', str(done))
    out = tmp_path / 'out'
    out.mkdir()
    study = ts.Study(args, str(out))
    (tmp_path / 'teachers').mkdir()
    settings = ts.Teacher(study, 'vit', None, str(out)).settings()
    torch.save({'model': {'w': torch.ones(2, dtype=torch.float16)}, 'teacher_settings': settings},
               tmp_path / 'teachers' / 'vit.pth')
    b = ts.weights_sha256(tmp_path / 'teachers' / 'vit.pth')
    a = 'a' * 64
    measured = {'final_acc1': 40.0, 'best_acc1': 40.0, 'train_minutes': 1.0, 'device': 'cpu', 'run_dir': 'x'}
    earlier = [{**ts.run_fields('vit', 4, init, 0, 1, 2e-3, teacher_weights_sha256=None if init == 'random init'
                                else a), **study.settings(), **measured}
               for init in ['random init'] + [f'ws {e}' for e in ts.ELEMENTS]]
    done.write_text(''.join(json.dumps(r) + '\n' for r in earlier))
    study = ts.Study(args, str(out))
    trained = fake_runs(ts, monkeypatch, study)
    ts.run_study(args, str(out), study)
    assert trained == [f'students/vit/n4/blr0.002/ws_{e}_teacher{b[:8]}/seed0' for e in ts.ELEMENTS]
    assert study.records[0] == earlier[0]  # random init: reused
    assert [r['teacher_weights_sha256'] for r in study.records[1:]] == [b] * len(ts.ELEMENTS)
    assert study.earlier() == earlier[1:]  # A's selections: kept, apart


def test_run_study_without_a_known_teacher_reuses_any_until_it_trains_one(tmp_path, monkeypatch):
    """No teacher carried: the selections recorded from teacher A are reused, and the teacher is not trained,
    until a selection is missing; the teacher trained then (C) names every later selection, which runs again
    rather than mixing with A's."""
    ts, args = study_args(monkeypatch, tmp_path, '--families', 'vit', '--subsets', '4', '--seeds', '0',
                          '--student_epochs', '1', '1', '--blr', '2e-3', '--device', 'cpu',
                          '--done', str(tmp_path / 'done.jsonl'))
    out = tmp_path / 'out'
    out.mkdir()
    (tmp_path / 'done.jsonl').write_text('')
    settings = ts.Study(args, str(out)).settings()
    a, c = 'a' * 64, 'c' * 64
    measured = {'final_acc1': 40.0, 'best_acc1': 40.0, 'train_minutes': 1.0, 'device': 'cpu', 'run_dir': 'x'}
    earlier = [{**ts.run_fields('vit', 4, init, 0, 1, 2e-3, teacher_weights_sha256=None if init == 'random init'
                                else a), **settings, **measured}
               for init in ['random init'] + [f'ws {e}' for e in ts.ELEMENTS] if init != 'ws l1']
    (tmp_path / 'done.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in earlier))
    study = ts.Study(args, str(out))
    trained = fake_runs(ts, monkeypatch, study)

    def checkpoint(teacher):  # the teacher "trained": weights C
        if teacher.weights_sha256 is None:
            trained.append('teacher')
            teacher.weights_sha256 = c
        return 'teacher.pth'
    monkeypatch.setattr(ts.Teacher, 'checkpoint', checkpoint)
    ts.run_study(args, str(out), study)
    after = ts.ELEMENTS[ts.ELEMENTS.index('l1'):]
    assert trained == ['teacher'] + [f'students/vit/n4/blr0.002/ws_{e}_teacher{c[:8]}/seed0' for e in after]
    shas = [r.get('teacher_weights_sha256') for r in study.records]
    assert shas == [None] + [a] * (len(ts.ELEMENTS) - len(after)) + [c] * len(after)


def argparse_done(args, path):
    import copy
    args = copy.copy(args)
    args.done = [str(path)]
    return args


def test_measurement_takes_final_and_best_among_the_evaluated_epochs():
    sys.path.insert(0, os.path.join(ROOT, 'scripts'))
    import transfer_study
    log = [{'epoch': 0, 'epoch_seconds': 30}, {'epoch': 1, 'test_acc1': 40.0, 'epoch_seconds': 60},
           {'epoch': 2, 'epoch_seconds': 30}, {'epoch': 3, 'test_acc1': 38.0, 'epoch_seconds': 60}]
    m = transfer_study.measurement(log, 'students/x', transfer_study.ran_on('cpu'))
    assert (m['final_acc1'], m['best_acc1'], m['train_minutes'], m['device']) == (38.0, 40.0, 3.0, 'cpu')
    fields = transfer_study.run_fields('vit', 100, 'ws l1', 0, 4, 2e-3)
    settings = {'batch_size': 128, 'test_per_class': 1000, 'teacher_epochs': 100, 'source': None, 'eval_freq': 2,
                'smoke': False}
    key = transfer_study.run_key({**fields, **settings, **m})
    assert key == transfer_study.run_key({**fields, **settings, 'device': 'cpu'})  # what was measured is not
    assert key != transfer_study.run_key({**fields, **settings, 'device': 'NVIDIA H100'})  # a GPU's run is another
    assert key != transfer_study.run_key({**fields, **settings, 'eval_freq': 1})


def test_validation_split_is_carved_from_the_training_subset_only(tmp_path):
    """--lr_search's validation set: the last K training images of each class, held out of its train/; the
    subset's test/ (the study's test set) is never copied or read."""
    sys.path.insert(0, os.path.join(ROOT, 'scripts'))
    import transfer_study
    subset = tmp_path / 'target_5'
    for cls in ('dog', 'frog'):
        for i in range(5):
            (subset / 'train' / cls).mkdir(parents=True, exist_ok=True)
            (subset / 'train' / cls / f'{i:05d}.jpg').write_bytes(f'{cls}{i}'.encode())
        (subset / 'test' / cls).mkdir(parents=True)
        (subset / 'test' / cls / '99999.jpg').write_bytes(b'test image')
    val = transfer_study.carve_validation(str(subset), 2)
    assert val == f'{subset}_val2' and sorted(os.listdir(val)) == ['test', 'train']
    for cls in ('dog', 'frog'):
        assert sorted(os.listdir(os.path.join(val, 'train', cls))) == ['00000.jpg', '00001.jpg', '00002.jpg']
        assert sorted(os.listdir(os.path.join(val, 'test', cls))) == ['00003.jpg', '00004.jpg']
        assert open(os.path.join(val, 'test', cls, '00004.jpg'), 'rb').read() == f'{cls}4'.encode()
    assert transfer_study.carve_validation(str(subset), 2) == val  # kept, not rebuilt
    with pytest.raises(transfer_study.utils.UserError, match='--val_per_class 5 leaves no training image of class dog'):
        transfer_study.carve_validation(str(subset), 5)
    assert not os.path.exists(f'{subset}_val5')


def test_lr_search_report_marks_the_highest_mean_final_validation_accuracy():
    sys.path.insert(0, os.path.join(ROOT, 'scripts'))
    import transfer_study
    run = lambda blr, seed, final, best: {'family': 'vit', 'per_class': 100, 'val_per_class': 20,  # noqa: E731
                                          'epochs': 30, 'blr': blr, 'seed': seed, 'final_acc1': final,
                                          'best_acc1': best}
    # 4e-3 has the best single run and the best "best epoch", 2e-3 the best mean final accuracy
    rows = transfer_study.lr_search_rows([run(2e-3, 0, 50.0, 51.0), run(2e-3, 1, 48.0, 50.0),
                                          run(4e-3, 0, 60.0, 70.0), run(4e-3, 1, 36.0, 40.0)], batch_size=32)
    assert rows == ['| vit | 80 + 20 | 30 | **0.002** | 0.000125 | 49.0 ± 1.4 | 50.5 ± 0.7 | 2 |',
                    '| vit | 80 + 20 | 30 | 0.004 | 0.00025 | 48.0 ± 17.0 | 55.0 ± 21.2 | 2 |']
    # merged from calls of other seeds: the test runs trained with 4e-3 (what their own call chose); bold says so,
    # and a dagger marks the highest mean over all these seeds
    test_runs = [{'family': 'vit', 'per_class': 100, 'epochs': 30, 'blr': 4e-3, 'seed': 0}]
    rows = transfer_study.lr_search_rows([run(2e-3, 0, 50.0, 51.0), run(2e-3, 1, 48.0, 50.0),
                                          run(4e-3, 0, 60.0, 70.0), run(4e-3, 1, 36.0, 40.0)], 32, test_runs)
    assert [row.split(' | ')[3] for row in rows] == ['0.002†', '**0.004**']


def test_a_finished_run_is_reused_only_with_the_same_flags(tmp_path, monkeypatch):
    """Study.train finds a finished log in its run folder: reused as it is when its config.yaml holds the flags this
    call would pass; another --batch_size (or no config.yaml) stops the study in one line instead of reporting the
    old numbers under the new settings."""
    from types import SimpleNamespace
    import checkpoint
    import main
    import utils
    ts, args = study_args(monkeypatch, tmp_path, '--batch_size', '32', '--device', 'cpu')
    study = ts.Study(args, str(tmp_path / 'out'))
    run = tmp_path / 'run'
    run.mkdir()
    monkeypatch.setattr(study, 'run', lambda cmd: ran.append(cmd))
    ran = []
    study.train(str(run), 'vit_tiny_patch16_224', {'patch_size': 4}, '/data', 2, 0, 2e-3)  # nothing there: it runs
    flags = ran[0][2:]
    (run / 'log.txt').write_text(''.join(json.dumps({'epoch': e, 'test_acc1': 1.0}) + '\n' for e in range(2)))
    checkpoint.save_run_config(main.parse_args(flags), SimpleNamespace(type='cpu'), {})
    assert study.train(str(run), 'vit_tiny_patch16_224', {'patch_size': 4}, '/data', 2, 0, 2e-3)[-1]['epoch'] == 1
    assert len(ran) == 1  # reused, not run again
    # the same folder named otherwise is the same data; the run folder itself is not compared
    ts.check_same_run(str(run), [*flags[:flags.index('--data_path') + 1], '/data/../data',
                                 *flags[flags.index('--data_path') + 2:]])
    args.batch_size = 64
    with pytest.raises(utils.UserError, match=r'holds a run of other settings \(--batch_size 32 \(now 64\)\)'):
        study.train(str(run), 'vit_tiny_patch16_224', {'patch_size': 4}, '/data', 2, 0, 2e-3)
    (run / 'log.txt').write_text(json.dumps({'epoch': 0, 'test_acc1': 1.0}) + '\n')  # unfinished: resumed only if
    with pytest.raises(utils.UserError, match=r'--batch_size 32 \(now 64\)'):  # the same run, not continued otherwise
        study.train(str(run), 'vit_tiny_patch16_224', {'patch_size': 4}, '/data', 2, 0, 2e-3)
    assert len(ran) == 1
    (run / 'config.yaml').unlink()
    args.batch_size = 32
    with pytest.raises(utils.UserError, match='no readable config.yaml'):
        study.train(str(run), 'vit_tiny_patch16_224', {'patch_size': 4}, '/data', 2, 0, 2e-3)


def test_lr_search_refuses_a_validation_split_that_leaves_nothing_to_train(tmp_path):
    proc = run_script(os.path.join('scripts', 'transfer_study.py'), '--out', str(tmp_path / 'study'), '--families',
                      '--subsets', '20', '100', '--lr_search', '1e-3', '2e-3', '--val_per_class', '20')
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr
    assert '--val_per_class 20 must hold out at least one and leave at least one' in proc.stderr
    assert not (tmp_path / 'study').exists()


@pytest.mark.parametrize('flags,needle', [
    (['--dinov2', 'missing.pt'], '--dinov2 missing.pt: file not found'),  # before hours of teachers and students
    (['--families'], 'nothing to run: --families with no family and no --dinov2'),
    (['--families', 'vitt'], "argument --families: invalid choice: 'vitt'"),
])
def test_a_study_that_would_fail_or_run_nothing_stops_at_once(tmp_path, flags, needle):
    proc = run_script(os.path.join('scripts', 'transfer_study.py'), '--out', str(tmp_path / 'study'), '--smoke',
                      *flags)
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr
    assert proc.stderr.strip().count('\n') == 0 and needle in proc.stderr, proc.stderr
    assert not (tmp_path / 'study').exists()


class RunsCode:
    """Unpickling this runs a shell command: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def bad_inputs(tmp_path):
    """{name: (flags, needles)}: mistakes that must stop the study in one line before it writes anything."""
    import torch
    marker = tmp_path / 'MARKER'
    torch.save({'pos_embed': torch.zeros(1), 'x': RunsCode(marker)}, tmp_path / 'evil.pth')
    torch.save({'w': torch.zeros(2)}, tmp_path / 'other.pth')
    (tmp_path / 'bad.jsonl').write_text('{"family": "vit", "split": "test"}\n{"family": \n')
    (tmp_path / 'list.jsonl').write_text('[1, 2]\n')
    (tmp_path / 'a_file').write_text('')
    for name, content in (('evil', None), ('truncated', b'PK\x03\x04' + bytes(40)), ('other', None)):
        (tmp_path / name).mkdir()
        if content is None:
            os.link(tmp_path / f'{name}.pth', tmp_path / name / 'vit.pth')
        else:
            (tmp_path / name / 'vit.pth').write_bytes(content)
    teacher = ['--families', 'vit', '--device', 'cpu', '--teachers']
    return {
        'subsets 0': (['--subsets', '0'], ['--subsets 0: give 1 to 5,000 training images per target class']),
        'per_class_test 0': (['--per_class_test', '0'], ['--per_class_test 0', 'leave the flag out for all']),
        'time budget 0': (['--time_budget_min', '0'], ['--time_budget_min 0 must be positive']),
        'time budget < 0': (['--time_budget_min', '-2'], ['--time_budget_min -2 must be positive']),
        'device': (['--device', 'tpu'], ['--device tpu: pass cuda, cuda:N or cpu']),
        'dinov2 size': (['--families', '--dinov2', str(tmp_path / 'evil.pth'), '--dinov2_input_size', '50'],
                        ['--dinov2_input_size 50 is not a multiple of the patch size 14; use e.g. 42 or 56']),
        'dinov2 pickle': (['--families', '--dinov2', str(tmp_path / 'evil.pth')],
                          ['refused to load', 'posix.system', '--trust_checkpoint true']),
        'dinov2 other model': (['--families', '--dinov2', str(tmp_path / 'other.pth')],
                               ['is not a DINOv2 ViT-S/14 checkpoint', 'missing']),
        'done not JSON': (['--families', '--done', str(tmp_path / 'bad.jsonl')], ['bad.jsonl, line 2: not JSON']),
        'done missing': (['--families', '--done', str(tmp_path / 'missing.jsonl')], ['missing.jsonl: file not found']),
        'done not records': (['--families', '--done', str(tmp_path / 'list.jsonl')],
                             ['list.jsonl, line 1: not a JSON record']),
        'done not text': (['--families', '--done', str(tmp_path / 'evil.pth')], ['evil.pth is not a text file']),
        'out is a file': (['--out', str(tmp_path / 'a_file'), '--families', '--done', str(tmp_path / 'bad.jsonl')],
                          ['--out', 'a_file is a file']),
        'teacher pickle': ([*teacher, str(tmp_path / 'evil')], ['refused to load', '--trust_checkpoint true']),
        'teacher truncated': ([*teacher, str(tmp_path / 'truncated')], ['cannot read checkpoint', 'truncated']),
        'teacher not ours': ([*teacher, str(tmp_path / 'other')], ['is not a teacher this study wrote']),
    }


@pytest.mark.parametrize('name', [
    'subsets 0', 'per_class_test 0', 'time budget 0', 'time budget < 0', 'device', 'dinov2 size', 'dinov2 pickle',
    'dinov2 other model', 'done not JSON', 'done missing', 'done not records', 'done not text', 'out is a file',
    'teacher pickle', 'teacher truncated', 'teacher not ours'])
def test_a_bad_input_stops_the_study_in_one_line_before_anything_is_written(tmp_path, capsys, name):
    """Each mistake is one line, before any data, teacher or student: not after the random-init students trained
    (a --dinov2 file the selection refuses, --device tpu), not as a traceback (a --teachers file that is
    malicious or truncated, --done with a broken line, --out a file), not silently (--subsets 0: all images)."""
    sys.path.insert(0, os.path.join(ROOT, 'scripts'))
    import transfer_study
    flags, needles = bad_inputs(tmp_path)[name]
    imagefolder = tmp_path / 'make_imagefolder.py'
    imagefolder.write_text('')
    out = tmp_path / 'study'
    expect_cli_error(transfer_study.main, ['--out', str(out), '--make_imagefolder', str(imagefolder), *flags],
                     capsys, *needles)
    assert not out.exists() and not (tmp_path / 'MARKER').exists()


def test_dinov2_file_is_checked_as_its_selection_reads_it(tmp_path, monkeypatch):
    """The real DINOv2 file passes the early check; --trust_checkpoint true reaches the selections."""
    ts, args = study_args(monkeypatch, tmp_path, '--families', '--dinov2',
                          shared_path('teachers', 'dinov2_vits14_imgfocus_fp16.pt'), '--trust_checkpoint', 'true')
    ts.check_dinov2(args)
    study = ts.Study(args, str(tmp_path / 'out'))
    commands = []
    monkeypatch.setattr(study, 'run', commands.append)
    study.select(str(tmp_path / 'out' / 'ws' / 'a.pth'), 'vit_small_patch14_dinov2', {}, args.dinov2,
                 'vit_tiny_patch14_dinov2', {}, 'first', 'uniform')
    assert commands[0][-2:] == ['--trust_checkpoint', 'true']
