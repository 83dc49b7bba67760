"""Streaming weight selection, measured (a benchmark, not a test).

Makes (once, cached under --cache) a synthetic LLaMA-shaped teacher of bf16 weights in safetensors shards,
selects a ~5x smaller student from it with hf_selection.select_hf (in this process), and reports wall time,
bytes read, peak anonymous memory (RssAnon of /proc/self/status, polled every 5 ms by a thread) and the
time of one plain sequential read of the same shards. Before each timed pass the teacher's pages are
dropped from the page cache (posix_fadvise DONTNEED on its own files only), so both passes read from disk.
With --vit it measures the timm path too: weight_selection.py run on a random vit_large_patch16_224 saved
as .safetensors (RssAnon of that process, polled the same way).

The weights are not random numbers: one random chunk of 2^20 bf16 values is repeated through every tensor
(generating 13.5 GB of random numbers on 2 cores takes too long); selection neither knows nor cares.

    python scripts/benchmark_selection.py --cache /tmp/ws_bench --size 7b --delete_teacher
"""
import json
import os
import shutil
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import hf_selection  # noqa: E402
import utils  # noqa: E402
from hf_selection import Planned  # noqa: E402
from hf_selection.student import layer_map_for  # noqa: E402
from weight_selection import ELEMENT_SELECTIONS  # noqa: E402

LLAMA_BASE = {'architectures': ['LlamaForCausalLM'], 'model_type': 'llama', 'hidden_act': 'silu',
              'rms_norm_eps': 1e-5, 'rope_theta': 10000.0, 'max_position_embeddings': 4096,
              'tie_word_embeddings': False, 'attention_bias': False, 'mlp_bias': False, 'dtype': 'bfloat16',
              'initializer_range': 0.02, 'bos_token_id': 1, 'eos_token_id': 2}
# teacher config, student overrides (~5x fewer parameters: half the width, 3/4 of the layers)
SIZES = {
    '7b': ({'hidden_size': 4096, 'intermediate_size': 11008, 'num_hidden_layers': 32, 'num_attention_heads': 32,
            'num_key_value_heads': 32, 'vocab_size': 32000},
           {'hidden_size': 2048, 'intermediate_size': 5504, 'num_hidden_layers': 24, 'num_attention_heads': 16,
            'num_key_value_heads': 16}),
    '1b': ({'hidden_size': 2048, 'intermediate_size': 5504, 'num_hidden_layers': 16, 'num_attention_heads': 16,
            'num_key_value_heads': 16, 'vocab_size': 32000},
           {'hidden_size': 1024, 'intermediate_size': 2752, 'num_hidden_layers': 12, 'num_attention_heads': 8,
            'num_key_value_heads': 8}),
    'tiny': ({'hidden_size': 256, 'intermediate_size': 688, 'num_hidden_layers': 8, 'num_attention_heads': 4,
              'num_key_value_heads': 4, 'vocab_size': 1000},
             {'hidden_size': 128, 'intermediate_size': 344, 'num_hidden_layers': 6, 'num_attention_heads': 2,
              'num_key_value_heads': 2}),
}


def llama_tensors(c):
    """(key, shape) of every tensor of a LLaMA checkpoint with config c, in file order."""
    d, i, v = c['hidden_size'], c['intermediate_size'], c['vocab_size']
    kv = c['num_key_value_heads'] * d // c['num_attention_heads']
    out = [('model.embed_tokens.weight', (v, d))]
    for n in range(c['num_hidden_layers']):
        p = f'model.layers.{n}.'
        out += [(p + 'self_attn.q_proj.weight', (d, d)), (p + 'self_attn.k_proj.weight', (kv, d)),
                (p + 'self_attn.v_proj.weight', (kv, d)), (p + 'self_attn.o_proj.weight', (d, d)),
                (p + 'mlp.gate_proj.weight', (i, d)), (p + 'mlp.up_proj.weight', (i, d)),
                (p + 'mlp.down_proj.weight', (d, i)), (p + 'input_layernorm.weight', (d,)),
                (p + 'post_attention_layernorm.weight', (d,))]
    return out + [('model.norm.weight', (d,)), ('lm_head.weight', (v, d))]


def make_teacher(folder, config):
    """The synthetic teacher in 2 GB shards, written with the selector's own streaming writer; reused when
    a teacher of the same config is already there."""
    path = os.path.join(folder, 'config.json')
    if os.path.isfile(path) and json.load(open(path)) == config:
        return False
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    chunk = (torch.randn(1 << 20, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)

    def fill(p):
        n = torch.Size(p.shape).numel()
        return chunk.repeat(n // chunk.numel() + 1)[:n].reshape(p.shape)
    planned = [Planned(k, None, shape, 'BF16') for k, shape in llama_tensors(config)]
    hf_selection.write_student(folder, planned, 2 * 10 ** 9, fill)
    hf_selection.write_json(path, config)
    return True


class PeakRssAnon:
    """Peak RssAnon (bytes) of a process while the block runs, polled by a thread."""

    def __init__(self, pid='self'):
        self.path, self.peak, self.running = f'/proc/{pid}/status', 0, False

    def read(self):
        try:
            with open(self.path) as f:
                for line in f:
                    if line.startswith('RssAnon:'):
                        return int(line.split()[1]) * 1024
        except OSError:
            return 0
        return 0

    def _poll(self):
        while self.running:
            self.peak = max(self.peak, self.read())
            time.sleep(0.005)

    def __enter__(self):
        self.running = True
        self.peak = self.read()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def io_read_bytes():
    with open('/proc/self/io') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('read_bytes:'))


def evict(paths):
    """Drop these files' pages from the page cache, so that the next pass reads them from disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def sequential_read(paths):
    buf = bytearray(64 << 20)
    total = 0
    for path in paths:
        with open(path, 'rb', buffering=0) as f:
            while True:
                n = f.readinto(buf)
                if not n:
                    break
                total += n
    return total


def shard_paths(folder):
    return [os.path.join(folder, n) for n in sorted(os.listdir(folder)) if n.endswith('.safetensors')]


def timed_read(paths):
    evict(paths)
    start, io0 = time.time(), io_read_bytes()
    with PeakRssAnon() as mem:
        nbytes = sequential_read(paths)
    return {'s': round(time.time() - start, 2), 'bytes': nbytes, 'disk_bytes': io_read_bytes() - io0,
            'peak_rss_anon': mem.peak, 'loadavg': load_average()}


def timed_select(paths, teacher, overrides, student, layer_selection, element_selection):
    evict(paths)
    shutil.rmtree(student, ignore_errors=True)
    baseline = PeakRssAnon().read()
    start, io0 = time.time(), io_read_bytes()
    with PeakRssAnon() as mem:
        report = hf_selection.select_hf(teacher, overrides, student, layer_selection=layer_selection,
                                        element_selection=element_selection)
    out = {'s': round(time.time() - start, 2), 'bytes_requested': report['meta']['teacher_bytes_read'],
           'disk_bytes': io_read_bytes() - io0, 'peak_rss_anon': mem.peak, 'rss_anon_before': baseline,
           'student_bytes': sum(os.path.getsize(p) for p in shard_paths(student)), 'loadavg': load_average(),
           'layer_map': report['meta']['layer_map']}
    shutil.rmtree(student)
    return out


def load_average():
    """The 1-minute load average: the machine is shared, so timings say little without it."""
    with open('/proc/loadavg') as f:
        return float(f.read().split()[0])


def bench_hf(args):
    """Sequential read and selection, alternating --repeat times (the machine's load varies)."""
    t_cfg, s_over = SIZES[args.size]
    teacher = os.path.join(args.cache, f'llama_{args.size}_teacher')
    start = time.time()
    made = make_teacher(teacher, {**LLAMA_BASE, **t_cfg})
    made_s = time.time() - start
    paths = shard_paths(teacher)
    student = os.path.join(args.cache, f'llama_{args.size}_student')
    reads, selections = [], []
    for _ in range(args.repeat):
        reads.append(timed_read(paths))
        selections.append(timed_select(paths, teacher, s_over, student, args.layer_selection, args.element_selection))
    if args.delete_teacher:
        shutil.rmtree(teacher)
    return {'path': 'hf', 'size': args.size, 'teacher_config': t_cfg, 'student_overrides': s_over,
            'element_selection': args.element_selection,
            'teacher_made_s': round(made_s, 1) if made else None, 'sequential_reads': reads, 'selections': selections,
            'select_over_read': [round(s['s'] / r['s'], 2) for r, s in zip(reads, selections)]}


def bench_timm(args):
    """weight_selection.py's timm path on a random ViT-L saved as .safetensors, in its own process."""
    import timm
    from safetensors.torch import save_file
    path = os.path.join(args.cache, f'vit_large_patch16_224.{args.vit_format}')
    if not os.path.isfile(path):
        model = timm.create_model('vit_large_patch16_224', pretrained=False)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if args.vit_format == 'safetensors':
            save_file(state, path)
        else:
            torch.save(state, path)
        del model, state
    out = os.path.join(args.cache, 'vit_base_ws.pth')
    evict([path])
    cmd = [sys.executable, os.path.join(ROOT, 'weight_selection.py'), '--teacher', 'vit_large_patch16_224',
           '--teacher_checkpoint', path, '--student', 'vit_base_patch16_224', '--output', out, '--quiet']
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with PeakRssAnon(proc.pid) as mem:
        stdout, stderr = proc.communicate()
    wall = time.time() - start
    if proc.returncode:
        raise SystemExit(f'the timm path failed: {stderr.strip()[-500:]}')
    if os.path.exists(out):
        os.remove(out)
    read_s = timed_read([path])['s']
    size = os.path.getsize(path)
    if args.delete_teacher:
        os.remove(path)
    return {'path': 'timm', 'teacher': f'vit_large_patch16_224 (fp32 .{args.vit_format})',
            'student': 'vit_base_patch16_224',
            'teacher_bytes': size, 'select_s': round(wall, 2), 'select_peak_rss_anon': mem.peak,
            'sequential_read_s': read_s, 'stdout': stdout.strip()}


def check_args(args):
    """Mistakes that would stop the benchmark after its teacher (13.5 GB at 7b) was written: one line, before."""
    if args.repeat < 1:
        raise utils.UserError(f'--repeat {args.repeat} must be 1 or more (passes of read and selection)')
    t_cfg, s_over = SIZES[args.size]
    layer_map_for(args.layer_selection)(t_cfg['num_hidden_layers'], s_over['num_hidden_layers'])  # raises if bad
    utils.check_folder_writable(args.cache, '--cache', ' for the synthetic teacher (made if missing)')
    if args.output:
        utils.check_writable(args.output)


def main(argv=None):
    p = utils.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--cache', required=True, help='folder for the synthetic teacher (kept unless --delete_teacher)')
    p.add_argument('--size', choices=sorted(SIZES), default='7b')
    p.add_argument('--layer_selection', default='uniform')
    p.add_argument('--element_selection', default='uniform', choices=ELEMENT_SELECTIONS)
    p.add_argument('--delete_teacher', action='store_true',
                   help='remove the synthetic teachers afterwards (with --vit, the ViT-L too)')
    p.add_argument('--repeat', type=int, default=1, help='alternate read and selection this many times')
    p.add_argument('--vit', action='store_true', help='also the timm path on a random ViT-L')
    p.add_argument('--vit_format', choices=('safetensors', 'pth'), default='safetensors',
                   help="the ViT-L teacher's file: .safetensors, or a torch.save .pth")
    p.add_argument('--output', default=None, help='write the results as JSON here')
    args = p.parse_args(argv)
    check_args(args)
    os.makedirs(args.cache, exist_ok=True)
    memory = os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2 ** 30
    results = {'machine': f'{os.cpu_count()} CPU cores, {memory:.0f} GiB',
               'versions': utils.versions(('safetensors', 'timm')), 'runs': [bench_hf(args)]}
    if args.vit:
        results['runs'].append(bench_timm(args))
    print(json.dumps(results, indent=2))
    if args.output:
        hf_selection.write_json(args.output, results)


if __name__ == '__main__':
    utils.run_cli(main)
