"""Training throughput of one model with the paper's recipe, in one process:

  (a) model only: one synthetic batch resident on the device, the full training step (autocast, loss,
      backward, optimizer) and nothing else;
  (b) end to end with the GPU data path (--gpu_data true: uint8 images on the device, RandAugment, random
      erasing, mixup/cutmix on the device);
  (c) end to end with the CPU loader (timm's transforms in --num_workers DataLoader workers);
  and evaluation throughput on the GPU path. Prints b/a and b/c and the projected time of a 300-epoch run
  (training plus one evaluation per epoch), and writes everything with device, versions and settings to
  --output (JSON). With --profile, a torch.profiler summary of a few more GPU-path batches goes beside it
  (where the time goes when a target is missed). Flags after the script's own are main.py's (recipe, data,
  model):

    python scripts/benchmark.py --output benchmarks/vit_tiny_eager.json -- \\
        --config configs/vit_tiny_cifar100.yaml --model vit_tiny_patch16_224 --data_set image_folder \\
        --data_path data/cifar10 --batch_size 256 --use_amp true --channels_last true --num_workers 15
"""
import argparse
import itertools
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import engine  # noqa: E402
import config  # noqa: E402
import datasets  # noqa: E402
import main as trainer  # noqa: E402
import recipe  # noqa: E402
from models import build  # noqa: E402
import utils  # noqa: E402


class Take:
    """The first n batches of a loader (with its sampler's epoch set), as a loader."""

    def __init__(self, loader, n, epoch=0):
        self.loader, self.n, self.epoch = loader, n, epoch

    def __len__(self):
        return self.n

    def __iter__(self):
        sampler = getattr(self.loader, 'sampler', None)
        if hasattr(sampler, 'set_epoch'):
            sampler.set_epoch(self.epoch)
        return itertools.islice(iter(self.loader), self.n)


class Labelled:
    """A loader whose batch fetches are one profiler range each, so a trace tells the data path from the step."""

    def __init__(self, loader, label):
        self.loader, self.label = loader, label

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        batches = iter(self.loader)
        while True:
            with torch.profiler.record_function(self.label):
                batch = next(batches, None)
            if batch is None:
                return
            yield batch


class Repeat:
    """One batch, n times: the model-only measurement."""

    def __init__(self, batch, n):
        self.batch, self.n = batch, n

    def __len__(self):
        return self.n

    def __iter__(self):
        return itertools.repeat(self.batch, self.n)


def whole_windows(batches, update_freq):
    """`batches` rounded up to whole accumulation windows: the batches train_throughput runs."""
    return -(-batches // update_freq) * update_freq


def train_throughput(setup, loader_of, warmup, steps, channels_last=False, update_freq=1):
    """Images per second of engine.train_one_epoch over `steps` batches after `warmup` ones (compile, cuDNN
    autotuning, worker start-up), in one pass over the loader: a second pass would first wait for the batches
    its workers had prefetched for the first, which training never does. An optimizer step every `update_freq`
    batches, as training accumulates them (both counts rounded up to whole windows)."""
    model, criterion, optimizer, scheduler, mixup_fn, device, amp_dtype = setup
    warmup, steps = whole_windows(warmup, update_freq), whole_windows(steps, update_freq)
    marks = []

    def mark(step, get_partial):
        if step * update_freq in (warmup, warmup + steps):
            seen = get_partial()['seen']  # waits for the device, as the timing needs
            marks.append((time.time(), seen))
    if warmup == 0:
        sync(device)
        marks.append((time.time(), 0))
    engine.train_one_epoch(model, criterion, loader_of(warmup + steps, 0), optimizer, device, 0, scheduler,
                           update_freq=update_freq, amp_dtype=amp_dtype, mixup_fn=mixup_fn, print_freq=10 ** 9,
                           on_step=mark, channels_last=channels_last)
    if len(marks) != 2:
        raise utils.UserError(f'the training set gives fewer than {warmup + steps} batches; lower --warmup or --steps')
    (start, seen_start), (end, seen_end) = marks
    return (seen_end - seen_start) / (end - start)


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def parse(argv):
    p = utils.ArgumentParser('benchmark.py', description=__doc__.split('\n\n')[0])
    p.add_argument('--output', required=True, help='JSON file for the results')
    p.add_argument('--warmup', type=int, default=20, help='batches before timing (per measurement)')
    p.add_argument('--steps', type=int, default=100, help='timed batches (per measurement)')
    p.add_argument('--skip_cpu_loader', action='store_true', help='leave out (c)')
    p.add_argument('--epochs_projected', type=int, default=300)
    p.add_argument('--profile', type=int, default=0, metavar='N',
                   help='profile N more GPU-path batches with torch.profiler; the summary goes to OUTPUT with '
                        '_profile.txt for .json (0: no profile)')
    p.add_argument('main_args', nargs=argparse.REMAINDER, help="-- then main.py's flags")
    bench = p.parse_args(argv)
    args = trainer.parse_args(bench.main_args[1:] if bench.main_args[:1] == ['--'] else bench.main_args)
    config.check_args(args)  # main.py's one-line answers to bad flags (--device gpu, no --data_path, ...)
    for flag, value, least in (('--warmup', bench.warmup, 0), ('--steps', bench.steps, 1),
                               ('--epochs_projected', bench.epochs_projected, 1), ('--profile', bench.profile, 0)):
        if value < least:
            raise utils.UserError(f'{flag} {value}: give a whole number of at least {least}')
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        raise utils.UserError('no CUDA device here; pass --device cpu (with small settings) to try the benchmark')
    return bench, args


def measure(bench, args, device):
    """{measurement: images per second}, the GPU-path loaders, the AMP dtype and the update_freq the optimizer
    stepped with, with main.py's recipe."""
    update_freq, global_batch = trainer.resolve_batch(args, 1)  # one process, as the benchmark runs
    lr = recipe.learning_rate(args, global_batch)
    gpu = datasets.build_loaders(argparse.Namespace(**{**vars(args), 'gpu_data': 'true'}), device)
    model = build.build_model(args, gpu.num_classes).to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    mixup_fn, criterion = recipe.build_criterion(args, gpu.num_classes)
    optimizer = recipe.build_optimizer(model, args, device, lr)
    scheduler = recipe.build_schedule(args, lr, len(gpu.train) // update_freq, args.epochs)
    amp_dtype, _ = recipe.build_amp(args, device)
    setup = (torch.compile(model) if args.compile else model, criterion, optimizer, scheduler, mixup_fn, device,
             amp_dtype)
    gpu.train.sampler.set_epoch(0)
    batch = next(iter(gpu.train))
    timed = dict(warmup=bench.warmup, steps=bench.steps, channels_last=args.channels_last, update_freq=update_freq)
    results = {'model_only': train_throughput(setup, lambda n, e: Repeat(batch, n), **timed),
               'gpu_path': train_throughput(setup, lambda n, e: Take(gpu.train, n, e), **timed)}
    errors = {}

    def attempt(name, measure_part):  # a later part that fails (15 workers' shared memory...) keeps the numbers
        try:
            measure_part()
        except Exception as e:  # noqa: BLE001 - recorded in the report, which is still written
            errors[name] = f'{type(e).__name__}: {utils.first_line(e)}'
            print(f'benchmark: {name} stopped: {errors[name]}; measuring the rest')  # the one error line: at the end

    def evaluation():  # the plain model, as main.py evaluates (compiled rows too)
        engine.evaluate(Take(gpu.val, 2), model, device, amp_dtype, channels_last=args.channels_last)  # warm up
        start = time.time()
        stats = engine.evaluate(gpu.val, model, device, amp_dtype, channels_last=args.channels_last)
        results['eval_gpu_path'] = stats['n'] / (time.time() - start)

    def cpu_loader():
        cpu_train = datasets.build_loaders(argparse.Namespace(**{**vars(args), 'gpu_data': 'false'}), device).train
        results['cpu_loader'] = train_throughput(setup, lambda n, e: Take(cpu_train, n, e), **timed)

    if gpu.val is not None:
        attempt('eval_gpu_path', evaluation)
    if not bench.skip_cpu_loader:
        attempt('cpu_loader', cpu_loader)
    if bench.profile:
        path = bench.output[:-len('.json')] if bench.output.endswith('.json') else bench.output
        attempt('profile', lambda: write_profile(setup, gpu.train, bench.profile, path + '_profile.txt',
                                                 args.channels_last, update_freq))
    return results, errors, gpu, amp_dtype, update_freq


def write_profile(setup, loader, steps, path, channels_last, update_freq=1):
    """torch.profiler over `steps` GPU-path training batches (after the timed ones, so compiled and warm): the
    ops by their own device time (CPU time without CUDA), the batch fetches under the range 'data_path'."""
    device = setup[5]
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == 'cuda':
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        train_throughput(setup, lambda n, e: Labelled(Take(loader, n, e), 'data_path'), 0, steps, channels_last,
                         update_freq)
        sync(device)
    sort_by = 'self_device_time_total' if device.type == 'cuda' else 'self_cpu_time_total'
    table = prof.key_averages().table(sort_by=sort_by, row_limit=40, max_name_column_width=60)
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'
    head = (f'torch.profiler over {whole_windows(steps, update_freq)} GPU-path training batches, sorted by '
            f'{sort_by}; the range data_path is the batch fetches (random resized crops, flips, RandAugment and '
            f'random erasing of uint8 images on the device).\ndevice: {name}; {utils.versions()}\n\n')
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    utils.atomic_write(path, lambda f: f.write((head + table + '\n').encode()))
    print(f'profile written to {path}')


def main(argv=None):
    bench, args = parse(argv)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    utils.seed_everything(args.seed)
    results, errors, gpu, amp_dtype, update_freq = measure(bench, args, device)
    ratios = {'gpu_path / model_only': results['gpu_path'] / results['model_only']}
    if 'cpu_loader' in results:
        ratios['gpu_path / cpu_loader'] = results['gpu_path'] / results['cpu_loader']
    n_train = gpu.num_train
    n_val = len(gpu.val.labels) if gpu.val is not None else 0
    if not n_val:
        eval_seconds = 0
    elif 'eval_gpu_path' in results:
        eval_seconds = n_val / results['eval_gpu_path']
    else:  # its measurement failed: no projection without the evaluation's time
        eval_seconds = None
    epoch_seconds = None if eval_seconds is None else n_train / results['gpu_path'] + eval_seconds
    report = {
        'images_per_sec': {k: round(v, 1) for k, v in results.items()},
        'ratios': {k: round(v, 3) for k, v in ratios.items()},
        f'projected_{bench.epochs_projected}_epoch_minutes':
            round(bench.epochs_projected * epoch_seconds / 60, 1) if epoch_seconds is not None else None,
        'settings': {'model': args.model, 'input_size': args.input_size, 'batch_size': args.batch_size,
                     'update_freq': update_freq,
                     'compile': args.compile, 'use_amp': args.use_amp, 'amp_dtype': str(amp_dtype),
                     'channels_last': args.channels_last, 'aa': args.aa, 'reprob': args.reprob,
                     'mixup': args.mixup, 'cutmix': args.cutmix, 'num_workers': args.num_workers,
                     'data_set': args.data_set, 'train_images': n_train, 'eval_images': n_val,
                     'warmup_batches': whole_windows(bench.warmup, update_freq),
                     'timed_batches': whole_windows(bench.steps, update_freq)},
        'device': torch.cuda.get_device_name(device) if device.type == 'cuda' else f'cpu ({os.cpu_count()} cores)',
        'versions': utils.versions(),
        'command': ['python', 'scripts/benchmark.py', *(argv if argv is not None else sys.argv[1:])],
        **({'errors': errors} if errors else {}),
    }
    print(json.dumps(report, indent=1))
    os.makedirs(os.path.dirname(os.path.abspath(bench.output)), exist_ok=True)
    utils.atomic_write(bench.output, lambda f: f.write(json.dumps(report, indent=1).encode()))
    if errors:
        raise utils.UserError(f'{", ".join(errors)} failed ({next(iter(errors.values()))}); the other measurements '
                              f'are in {bench.output}')
    return report


if __name__ == '__main__':
    utils.run_cli(main)
