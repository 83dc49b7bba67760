"""Build OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md from what scripts/gpu_check.sh left in WORK_DIR:
parts.tsv (part, exit status, seconds), pytest.xml (junit) or cuda_tests.log (pytest -v), nvidia_smi.txt and <part>.log;
the benchmark's JSONs and summary.md in OUT_DIR/benchmark.

    python scripts/gpu_report.py OUT_DIR WORK_DIR
"""
import glob
import json
import os
import re
import sys
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTCOMES = ('passed', 'failed', 'errors', 'skipped')


def read(path, default=''):
    return open(path).read() if os.path.isfile(path) else default


def device(work):
    info = {'name': 'none', 'memory_gib': None, 'nvidia_smi': read(os.path.join(work, 'nvidia_smi.txt')).strip()}
    try:
        import torch
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(name=props.name, memory_gib=round(props.total_memory / 2 ** 30, 1),
                        capability='.'.join(map(str, torch.cuda.get_device_capability(0))),
                        # TF32 matmuls (an image's override, as NGC containers set) would move the data path's
                        # resampling off the CPU path's values by a level or two
                        tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                        tf32_override_env=os.environ.get('TORCH_ALLOW_TF32_CUBLAS_OVERRIDE'))
    except Exception as e:
        info['error'] = str(e)
    return info


def cuda_tests(work):
    """Counts and per-test outcomes from pytest's junit XML; from its -v lines if pytest was stopped."""
    log = read(os.path.join(work, 'cuda_tests.log'))
    summary = [line.strip('= ') for line in log.splitlines() if re.match(r'=+ .*\d+ \w+.* in [\d.]+s', line)]
    tests = []
    try:
        root = ET.parse(os.path.join(work, 'pytest.xml')).getroot()
        for case in root.iter('testcase'):
            outcome, message = 'passed', ''
            for tag, name in (('failure', 'failed'), ('error', 'errors'), ('skipped', 'skipped')):
                node = case.find(tag)
                if node is not None:
                    outcome, message = name, (node.get('message') or '').split('\n')[0][:300]
            tests.append({'name': case.get('name'), 'outcome': outcome, 'seconds': float(case.get('time', 0)),
                          'message': message})
        source = 'junit xml'
    except (OSError, ET.ParseError):
        for name, word in re.findall(r'^tests/\S+::(\S+) (PASSED|FAILED|SKIPPED|ERROR)', log, re.M):
            tests.append({'name': name, 'outcome': {'ERROR': 'errors'}.get(word, word.lower()), 'message': ''})
        source = 'pytest -v lines (no junit xml: pytest did not finish)'
    counts = {k: sum(t['outcome'] == k for t in tests) for k in OUTCOMES}
    return {**counts, 'total': len(tests), 'source': source, 'summary': summary[-1] if summary else None,
            'tests': tests}


def benchmark(out):
    folder = os.path.join(out, 'benchmark')
    settings = {os.path.basename(p)[:-5]: json.load(open(p)) for p in sorted(glob.glob(os.path.join(folder, '*.json')))}
    profiles = sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, '*_profile.txt')))
    return {'settings': settings, 'summary_md': read(os.path.join(folder, 'summary.md')) or None,
            'profiles': profiles}


def parts(work):
    out = {}
    for line in read(os.path.join(work, 'parts.tsv')).splitlines():
        name, rc, seconds, *note = line.split('\t')
        # timeout's exit status: 124 when the command stopped on SIGTERM, 137 when it needed the SIGKILL after it;
        # a 137 well inside the part's limit is another SIGKILL (the kernel's, out of memory)
        status = {'0': 'ok', '124': 'timed out', '137': 'killed (SIGKILL: the time limit, or out of memory)',
                  '127': 'not found', 'skip': 'skipped'}.get(rc, 'failed')
        out[name] = {'status': status, 'exit_status': rc, 'seconds': int(seconds), 'note': note[0] if note else ''}
    return out


def markdown(r, work):
    t = r['cuda_tests']
    lines = [f"# GPU check: {r['device']['name']}", '',
             f"code {r['versions']['code']}, {r['date']}; {r['seconds']} s in all", '',
             *([f"**A dry run: WS_CUDA_TEST_DEVICE={r['test_device_override']} ran the CUDA tests there.**", '']
               if r['test_device_override'] else []),
             '| ' + ' | '.join(r['versions']) + ' | device | memory |',
             '|' + ' --- |' * (len(r['versions']) + 2),
             '| ' + ' | '.join(str(v) for v in r['versions'].values()) + f" | {r['device']['name']} | "
             f"{r['device']['memory_gib'] or '-'} GiB |", '',
             f"nvidia-smi: {r['device']['nvidia_smi'] or '-'}", '',
             '| part | status | seconds | note |', '| --- | --- | ---: | --- |']
    lines += [f"| {k} | {p['status']} | {p['seconds']} | {p['note']} |" for k, p in r['parts'].items()]
    lines += ['', '## CUDA tests (tests/test_cuda.py)', '',
              f"{t['passed']} passed, {t['failed']} failed, {t['errors']} errors, {t['skipped']} skipped "
              f"(from {t['source']}); pytest: {t['summary']}", '']
    lines += [f"- {x['outcome']}: `{x['name']}` {x['message']}" for x in t['tests'] if x['outcome'] != 'passed']
    slowest = sorted((x for x in t['tests'] if x.get('seconds')), key=lambda x: -x['seconds'])[:5]
    if slowest:
        lines += ['', 'Slowest: ' + ', '.join(f"`{x['name']}` {x['seconds']:.0f} s" for x in slowest)]
    lines += ['', '## Throughput (scripts/benchmark.sh)', '']
    b = r['benchmark']
    if b['summary_md']:
        lines.append(b['summary_md'])
    elif b['settings']:
        lines += [f"No summary.md (the benchmark stopped early); {len(b['settings'])} of 4 settings measured:", '']
        lines += [f"- {k}: images/s {v['images_per_sec']}, ratios {v['ratios']}" for k, v in b['settings'].items()]
    else:
        lines.append('no result')
    if b['profiles']:
        lines += ['', 'torch.profiler summaries (ops by their own device time, batch fetches as `data_path`): ' +
                  ', '.join(f'`benchmark/{name}`' for name in b['profiles'])]
    for name, p in r['parts'].items():  # the end of each failed part's output
        if p['status'] not in ('ok', 'skipped'):
            tail = read(os.path.join(work, f'{name}.log')).splitlines()[-20:]
            lines += ['', f'## {name}: {p["status"]} (last lines)', '', '```', *tail, '```']
    return '\n'.join(lines) + '\n'


def check_folders(out, work):
    """Both folders as scripts/gpu_check.sh leaves them, before anything is written: a report made from a folder that
    is not its work folder would say 'none' of everything."""
    if not os.path.isdir(out):
        sys.exit(f'error: OUT_DIR {out} is not a folder; pass the OUT_DIR of scripts/gpu_check.sh')
    if not os.path.isfile(os.path.join(work, 'parts.tsv')):
        sys.exit(f'error: WORK_DIR {work} has no parts.tsv (or does not exist); pass the folder scripts/gpu_check.sh '
                 f'ran its parts in')


def main(out, work):
    check_folders(out, work)
    sys.path.insert(0, ROOT)
    import time
    import utils
    r = {'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
         'seconds': int(read(os.path.join(work, 'elapsed'), '0') or 0),
         'versions': utils.versions(('torchvision', 'timm', 'numpy', 'PIL')),
         'device': device(work), 'test_device_override': os.environ.get('WS_CUDA_TEST_DEVICE'),
         'parts': parts(work), 'cuda_tests': cuda_tests(work), 'benchmark': benchmark(out)}
    with open(os.path.join(out, 'gpu_check.json'), 'w') as f:
        json.dump(r, f, indent=1)
    text = markdown(r, work)
    with open(os.path.join(out, 'gpu_check.md'), 'w') as f:
        f.write(text)
    print(text)


if __name__ == '__main__':
    if len(sys.argv) != 3:
        sys.exit('usage: python scripts/gpu_report.py OUT_DIR WORK_DIR')
    main(*sys.argv[1:])
