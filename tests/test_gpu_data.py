"""The GPU data path (gpu_transforms.py, gpu_data.GpuLoader) against its CPU counterparts (PIL, timm,
torchvision), run on CPU tensors: per-op parity bounds, sampling distributions, and training with it."""
import json
import os
import random
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, final_weights, kill_after_checkpoint, run_script, write_image_folder
import datasets
import gpu_data
import main
import utils
import gpu_transforms as gt
from timm.data import auto_augment as aa
from timm.data.transforms import RandomResizedCropAndInterpolation

BICUBIC = Image.Resampling.BICUBIC
FILL = (124, 116, 104)  # timm's img_mean fill for ImageNet's mean


def natural_image(seed, height=40, width=48):
    """A smooth random image with some texture, like a photo more than like noise."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray((rng.random((6, 7, 3)) * 255).astype('uint8')).resize((width, height), BICUBIC)
    pixels = np.asarray(coarse).astype(float) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(pixels.clip(0, 255).astype('uint8'))


def to_tensor(img):
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float()


def to_pil(x):
    return Image.fromarray(x[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy())


def diff(x, img):
    return (x[0] - to_tensor(img)[0]).abs()


@pytest.mark.parametrize('interpolation', ['bicubic', 'bilinear'])
@pytest.mark.parametrize('box,size', [((0, 0, 48, 40), (224, 224)), ((5, 3, 30, 31), (64, 64)),
                                      ((0, 0, 48, 40), (20, 17)), ((7, 2, 47, 38), (24, 24))])
def test_resized_crop_matches_pil(interpolation, box, size):
    """torchvision's crop + resize (PIL), up and down, within 1 level everywhere."""
    img = natural_image(0)
    left, top, right, bottom = box
    reference = img.crop(box).resize(size, {'bicubic': BICUBIC, 'bilinear': Image.Resampling.BILINEAR}[interpolation])
    t = lambda v: torch.tensor([float(v)])
    rows = gt.resample_matrix(t(top), t(bottom - top), 40, size[1], interpolation)
    cols = gt.resample_matrix(t(left), t(right - left), 48, size[0], interpolation)
    out = gt.apply_resample(to_tensor(img), rows, cols)
    assert diff(out, reference).max() <= 1
    flipped = gt.apply_resample(to_tensor(img), rows, gt.flip_columns(cols, torch.tensor([True])))
    assert diff(flipped, reference.transpose(Image.Transpose.FLIP_LEFT_RIGHT)).max() <= 1


def test_crop_with_padding_matches_torchvision():
    from torchvision import transforms
    img = natural_image(1, 32, 32)
    padded = transforms.functional.pad(img, 4)
    for dy, dx in [(0, 0), (8, 8), (3, 6)]:
        reference = padded.crop((dx, dy, dx + 32, dy + 32))
        rows = gt.shift_matrix(torch.tensor([dy - 4]), 32, 32)
        cols = gt.shift_matrix(torch.tensor([dx - 4]), 32, 32)
        assert diff(gt.apply_resample(to_tensor(img), rows, cols), reference).max() == 0


LEVELS = [(9.0, 1.0), (6.3, -1.0), (10.0, 1.0), (0.0, 1.0)]


def run_op(img, name, level, sign):
    x = to_tensor(img)
    one = lambda v, dtype=torch.float32: torch.tensor([v], dtype=dtype)
    return gt.apply_ops(x, one(gt.RAND_OPS.index(name), torch.long), one(level), one(sign),
                        torch.tensor([True]), torch.tensor(FILL, dtype=torch.float32))


def pil_reference(img, name, level, sign):
    datasets.install_posterize_shim()  # Pillow 13 refuses 0 bits; the recipe's meaning of it
    m = level / 10
    factor = max(0.1, 1.0 + sign * m * 0.9)
    geo = dict(resample=BICUBIC, fillcolor=FILL)
    return {
        'AutoContrast': lambda: aa.auto_contrast(img), 'Equalize': lambda: aa.equalize(img),
        'Invert': lambda: aa.invert(img),
        'PosterizeIncreasing': lambda: aa.posterize(img, 4 - int(m * 4)),
        'SolarizeIncreasing': lambda: aa.solarize(img, 256 - min(256, int(m * 256))),
        'SolarizeAdd': lambda: aa.solarize_add(img, min(128, int(m * 110))),
        'ColorIncreasing': lambda: aa.color(img, factor), 'ContrastIncreasing': lambda: aa.contrast(img, factor),
        'BrightnessIncreasing': lambda: aa.brightness(img, factor),
        'SharpnessIncreasing': lambda: aa.sharpness(img, factor),
        'Rotate': lambda: aa.rotate(img, sign * m * 30, **geo), 'ShearX': lambda: aa.shear_x(img, sign * m * 0.3, **geo),
        'ShearY': lambda: aa.shear_y(img, sign * m * 0.3, **geo),
        'TranslateXRel': lambda: aa.translate_x_rel(img, sign * m * 0.45, **geo),
        'TranslateYRel': lambda: aa.translate_y_rel(img, sign * m * 0.45, **geo),
    }[name]()


@pytest.mark.parametrize('name', gt.LUT_OPS + gt.BLEND_OPS)
def test_colour_ops_match_pil(name):
    """Lookup-table and blend ops: within 1 level of timm's PIL ops, on every pixel."""
    for seed, (level, sign) in enumerate(LEVELS):
        img = natural_image(seed)
        if name == 'AutoContrast':  # a narrow range, so that the stretch does something
            img = Image.fromarray((np.asarray(img) // 3 + 60).astype('uint8'))
        d = diff(run_op(img, name, level, sign), pil_reference(img, name, level, sign))
        assert d.max() <= 1 and d.mean() < 0.01, (level, sign, d.max(), d.mean())  # exact here, measured


@pytest.mark.parametrize('name', gt.GEOMETRIC_OPS)
def test_geometric_ops_close_to_pil(name):
    """Affine ops: the same map and fill as PIL; only the cubic kernel differs (a=-0.75 vs -0.5). Bounds:
    mean difference under 1 level (about 0.7 measured), at most 6, and fill placed alike on all but a thin
    edge band (< 4% of pixels)."""
    for seed, (level, sign) in enumerate(LEVELS):
        img = natural_image(seed)
        ours, reference = run_op(img, name, level, sign), to_tensor(pil_reference(img, name, level, sign))
        d = (ours - reference).abs()[0]
        assert d.mean() < 1.0 and d.max() <= 6, (level, sign, d.mean(), d.max())
        fill = torch.tensor(FILL).view(3, 1, 1)
        ours_fill, ref_fill = (ours[0] == fill).all(0), (reference[0] == fill).all(0)
        assert (ours_fill != ref_fill).float().mean() < 0.04
        inside = ~(ours_fill | ref_fill)
        assert d[:, inside].mean() < 1.2


def test_ops_off_or_at_zero_leave_images_unchanged():
    img = to_tensor(natural_image(3)).repeat(len(gt.RAND_OPS), 1, 1, 1)
    ops = torch.arange(len(gt.RAND_OPS))
    n = len(ops)
    off = gt.apply_ops(img, ops, torch.full((n,), 9.0), torch.ones(n), torch.zeros(n, dtype=torch.bool),
                       torch.tensor(FILL, dtype=torch.float32))
    assert torch.equal(off, img)
    # at magnitude 0 (timm's level_to_arg): no angle, shear or shift, enhance factor 1, solarize threshold 256,
    # nothing added; AutoContrast, Equalize and Invert have no magnitude, Posterize keeps 4 bits at 0
    identity_at_zero = {'Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel', 'ColorIncreasing',
                        'ContrastIncreasing', 'BrightnessIncreasing', 'SharpnessIncreasing', 'SolarizeIncreasing',
                        'SolarizeAdd'}
    img = (img * 0.5 + 40).round()  # a narrower range, which AutoContrast stretches
    zero = gt.apply_ops(img, ops, torch.zeros(n), torch.ones(n), torch.ones(n, dtype=torch.bool),
                        torch.tensor(FILL, dtype=torch.float32))
    unchanged = {name for i, name in enumerate(gt.RAND_OPS) if (zero[i] - img[i]).abs().max() < 1e-4}
    assert unchanged == identity_at_zero


def test_rand_augment_sampling_frequencies():
    """Each layer: op uniform over timm's 15 (with replacement), applied with p 0.5, magnitude N(9, 0.5)
    clipped to [0, 10], sign +-1 alike."""
    g = torch.Generator().manual_seed(0)
    n = 60_000
    op, apply, level, sign = gt.sample_layer(g, n, torch.device('cpu'), magnitude=9.0, magnitude_std=0.5, prob=0.5)
    counts = torch.bincount(op, minlength=15).double()
    expected = n / 15
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 36.1  # 14 degrees of freedom, p = 0.001
    assert abs(apply.double().mean().item() - 0.5) < 0.01
    assert abs(level.mean().item() - 9.0) < 0.01 and level.max() <= 10 and level.min() >= 0
    assert abs(level.std().item() - 0.5) < 0.01
    assert abs((sign > 0).double().mean().item() - 0.5) < 0.01


def test_resized_crop_distribution_matches_timm():
    """Crop area fraction and aspect ratio: the same distribution as timm's get_params (quantiles)."""
    g = torch.Generator().manual_seed(0)
    n = 20_000
    top, left, h, w = gt.resized_crop_params(g, n, 32, 40, torch.device('cpu'))
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 40).all()
    random.seed(0)
    img = Image.new('RGB', (40, 32))
    ref = torch.tensor([RandomResizedCropAndInterpolation.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3))
                        for _ in range(n)], dtype=torch.float64)
    q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
    area, ref_area = (h * w).double() / (32 * 40), ref[:, 2] * ref[:, 3] / (32 * 40)
    ratio, ref_ratio = (w / h).double(), ref[:, 3] / ref[:, 2]
    assert (area.quantile(q) - ref_area.quantile(q)).abs().max() < 0.02
    assert (ratio.quantile(q) - ref_ratio.quantile(q)).abs().max() < 0.03
    centre = (top + h / 2).double()
    ref_centre = ref[:, 0] + ref[:, 2] / 2
    assert abs(centre.mean() - ref_centre.mean()) < 0.15


def test_random_erasing_matches_timm_distribution():
    g = torch.Generator().manual_seed(0)
    x = torch.full((4000, 3, 24, 24), 100.0)
    out = gt.random_erasing(x, g, prob=0.25)
    erased = (out != 100.0).any(1)  # (n, h, w)
    fraction = erased.flatten(1).float().mean(1)
    hit = fraction > 0
    assert abs(hit.float().mean().item() - 0.25) < 0.025
    assert fraction[hit].min() >= 0.015 and fraction[hit].max() <= 0.36
    rows, cols = erased.any(2), erased.any(1)  # each erased region is one box
    assert torch.equal(erased[hit].sum((1, 2)), (rows.sum(1) * cols.sum(1))[hit])
    values = out[hit[:, None, None, None].expand_as(out) & (out != 100.0)]
    assert abs(values.mean().item()) < 0.05 and abs(values.std().item() - 1) < 0.05


def test_train_transform_output_and_seed():
    images = torch.from_numpy(np.stack([np.asarray(natural_image(s)) for s in range(6)])).permute(0, 3, 1, 2)
    tf = gt.GpuTrainTransform(56, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    a, b, c = tf(images, 5), tf(images, 5), tf(images, 6)
    assert a.shape == (6, 3, 56, 56) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    small = gt.GpuTrainTransform(32, (0.5,) * 3, (0.5,) * 3, aa=None, reprob=0)
    assert small(images, 0).shape == (6, 3, 32, 32)


@pytest.mark.parametrize('size', [48, 32])
def test_train_transform_statistics_match_cpu_path(size):
    """The whole training transform (crop, flip, RandAugment, normalization, erasing) against
    datasets.build_transform over 2,000 draws of one image: channel means and stds, and the spread of
    per-sample contrast, agree within sampling noise (seed-to-seed differences here are about 0.02)."""
    from types import SimpleNamespace
    img = natural_image(7)
    args = SimpleNamespace(input_size=size, crop_pct=None, imagenet_default_mean_and_std=True, color_jitter=0.4,
                           aa='rand-m9-mstd0.5-inc1', train_interpolation='bicubic', reprob=0.25, remode='pixel',
                           recount=1)
    cpu_tf = datasets.build_transform(True, args)
    random.seed(0), torch.manual_seed(0), np.random.seed(0)
    cpu = torch.stack([cpu_tf(img) for _ in range(2000)])
    ours = gt.GpuTrainTransform(size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))(
        to_tensor(img).byte().expand(2000, -1, -1, -1).contiguous(), 0)
    assert (cpu.mean((0, 2, 3)) - ours.mean((0, 2, 3))).abs().max() < 0.05
    assert (cpu.std((0, 2, 3)) - ours.std((0, 2, 3))).abs().max() < 0.05
    q = torch.tensor([0.1, 0.5, 0.9])
    assert (cpu.std((1, 2, 3)).quantile(q) - ours.std((1, 2, 3)).quantile(q)).abs().max() < 0.05

def test_eval_transform_matches_cpu_path():
    """Resize (short side 224/0.875) + centre crop, and the <= 32 px resize, within 1 level of
    datasets.build_transform before normalization."""
    from types import SimpleNamespace
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    img = natural_image(4)
    for size in (32, 24, 56):
        args = SimpleNamespace(input_size=size, crop_pct=None, imagenet_default_mean_and_std=True)
        reference = datasets.build_transform(False, args)(img)
        ours = gt.GpuEvalTransform(size, mean, std)(to_tensor(img).byte())[0]
        assert ours.shape == reference.shape
        scale = torch.tensor(std).view(3, 1, 1) * 255
        assert ((ours - reference) * scale).abs().max() <= 1.01



def test_gpu_loader_batch_seeds_fit_a_generator_for_any_run_seed():
    """The per-batch seed mixes run seed, epoch, rank and batch; from --seed ~1800 on it passed 2**64, which
    torch.Generator.manual_seed refuses. Reduced modulo 2**64, a seed that fitted is unchanged (the CUDA
    generator reads all 64 bits, so a smaller modulus would change the crops of runs that already worked)."""
    images, labels = torch.zeros(8, 3, 2, 2, dtype=torch.uint8), torch.arange(8)
    seeds = []

    def transform(x, seed):
        torch.Generator().manual_seed(seed)
        seeds.append(seed)
        return x.float()
    loader = gpu_data.GpuLoader(images, labels, 2, transform, train=True, seed=10 ** 6, rank=1, world_size=2)
    loader.sampler.set_epoch(5)
    assert len(list(loader)) == 2 and len(set(seeds)) == 2 and all(0 <= s < 2 ** 64 for s in seeds)
    seeds.clear()
    loader = gpu_data.GpuLoader(images, labels, 8, transform, train=True, seed=1000, rank=0, world_size=1)
    loader.sampler.set_epoch(0)
    list(loader)
    assert seeds == [1000 * 1_000_003 * 1_009 * 10_000_019] and seeds[0] > 2 ** 63  # fits 64 bits: as it was


def test_gpu_loader_shards_and_reshuffles():
    """Two ranks take disjoint halves of one seeded shuffle, a new one each epoch; skipping k batches resumes
    at batch k with the same augmentation; evaluation shards cover every image once."""
    images = torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1).expand(20, 3, 2, 2).contiguous()
    labels = torch.arange(20)
    tf = lambda x, seed=None: x.float() + (0 if seed is None else seed % 7)
    ranks = [gpu_data.GpuLoader(images, labels, 5, tf, train=True, seed=3, rank=r, world_size=2) for r in (0, 1)]
    seen = {}
    for epoch in (0, 1):
        for loader in ranks:
            loader.sampler.set_epoch(epoch)
        seen[epoch] = [torch.cat([y for _, y in loader]) for loader in ranks]
        assert len(set(seen[epoch][0].tolist()) | set(seen[epoch][1].tolist())) == 20
        assert not set(seen[epoch][0].tolist()) & set(seen[epoch][1].tolist())
    assert not torch.equal(seen[0][0], seen[1][0])
    ranks[0].sampler.set_epoch(1)
    full = list(ranks[0])
    ranks[0].sampler.set_epoch(1, skip=5)
    resumed = list(ranks[0])
    assert len(resumed) == len(full) - 1
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[1:], resumed))
    evals = [gpu_data.GpuLoader(images, labels, 3, lambda x: x.float(), train=False, rank=r, world_size=2)
             for r in (0, 1)]
    assert sorted(torch.cat([y for e in evals for _, y in e]).tolist()) == list(range(20))

# ------------------------------------------------------------------------------ training on the GPU path
SMALL = ['--model', 'vit_tiny_patch16_224', '--model_kwargs', '{"patch_size": 8, "depth": 2}', '--data_set',
         'image_folder', '--device', 'cpu', '--print_freq', '1', '--warmup_epochs', '1', '--gpu_data', 'true',
         '--num_workers', '0', '--batch_size', '4']


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp('data'), seed=2, varied_sizes=True)


@pytest.mark.slow
def test_gpu_path_trains_with_varied_sizes(tmp_path, data):
    proc = run_script('main.py', *SMALL, '--data_path', data, '--output_dir', str(tmp_path), '--epochs', '1',
                      '--input_size', '40', '--gpu_data_size', '44')
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'GPU data path' in proc.stdout and 'short side resized to 44' in proc.stdout
    assert '"test_acc1"' in proc.stdout


@pytest.mark.slow
def test_gpu_path_kill_and_resume_is_exact(tmp_path, data):
    flags = ['--input_size', '32', '--epochs', '2', '--save_every_steps', '1', '--data_path', data]
    reference, killed = tmp_path / 'reference', tmp_path / 'killed'
    proc = run_script('main.py', *SMALL, *flags, '--output_dir', str(reference))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert kill_after_checkpoint(['main.py', *SMALL, *flags, '--output_dir', str(killed)], killed)
    proc = run_script('main.py', *SMALL, *flags, '--output_dir', str(killed))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'resumed from' in proc.stdout and 'continuing at epoch 2' not in proc.stdout  # killed mid-run
    a, b = final_weights(reference, 1)['model'], final_weights(killed, 1)['model']
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_gpu_path_rejects_policies_it_does_not_implement(tmp_path, data):
    from conftest import assert_clean_failure
    proc = run_script('main.py', *SMALL, '--data_path', data, '--output_dir', str(tmp_path / 'x'), '--epochs', '1',
                      '--aa', 'rand-m9-mstd0.5')
    assert_clean_failure(proc, 'inc1', '--gpu_data false')
    assert not (tmp_path / 'x').exists() or not any(f.startswith('checkpoint') for f in os.listdir(tmp_path / 'x'))


@pytest.mark.slow
def test_benchmark_smoke_on_cpu(tmp_path, data):
    """scripts/benchmark.py end to end with tiny settings: all three measurements, the JSON record and the
    profiler summary, in which the batch fetches are a range of their own; with update_freq 2, the batch counts
    it ran (rounded up to whole accumulation windows) are the ones it reports."""
    import json
    out = tmp_path / 'bench' / 'b.json'
    proc = run_script('scripts/benchmark.py', '--output', str(out), '--warmup', '1', '--steps', '2', '--profile', '2',
                      '--',
                      '--model', 'vit_tiny_patch16_224', '--model_kwargs', '{"patch_size": 8, "depth": 2}',
                      '--input_size', '32', '--data_set', 'image_folder', '--data_path', data, '--device', 'cpu',
                      '--batch_size', '4', '--num_workers', '0', '--update_freq', '2')
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert [report['settings'][k] for k in ('update_freq', 'warmup_batches', 'timed_batches')] == [2, 2, 2]
    assert set(report['images_per_sec']) == {'model_only', 'gpu_path', 'cpu_loader', 'eval_gpu_path'}
    assert all(v > 0 for v in report['images_per_sec'].values())
    assert set(report['ratios']) == {'gpu_path / model_only', 'gpu_path / cpu_loader'}
    assert report['settings']['batch_size'] == 4 and report['versions']['torch'] == torch.__version__
    assert report['projected_300_epoch_minutes'] > 0
    profile = (tmp_path / 'bench' / 'b_profile.txt').read_text()
    assert 'over 2 GPU-path training batches, sorted by self_cpu_time_total' in profile and 'Self CPU' in profile
    rows = {line.split()[0] for line in profile.splitlines() if line.strip()}
    assert {'data_path', 'aten::addmm'} <= rows, sorted(rows)[:20]


def test_benchmark_times_warmup_and_steps_in_one_pass_over_the_loader(monkeypatch):
    """Warm-up and timed batches come from one iterator, as in training: a fresh iterator over a loader with
    workers would first wait for the batches they had prefetched for the last one. The rate counts the timed
    batches' images only."""
    sys.path.insert(0, os.path.join(ROOT, 'scripts'))
    import benchmark
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    passes = []

    class Batches:
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

        def __iter__(self):
            passes.append(self.n)
            return iter([(torch.randn(5, 3, 2, 2), torch.randint(0, 3, (5,)))] * self.n)
    setup = (model, lambda images, output, targets: torch.nn.functional.cross_entropy(output, targets), optimizer,
             lambda optimizer, step: None, None, torch.device('cpu'), None)
    # benchmark's clock reads 10 s after the warm-up and 12 s after the timed batches: 4 batches of 5 in 2 s
    from types import SimpleNamespace
    clock = iter([10.0, 12.0])
    monkeypatch.setattr(benchmark, 'time', SimpleNamespace(time=lambda: next(clock)))
    assert benchmark.train_throughput(setup, lambda n, epoch: Batches(n), warmup=3, steps=4) == 4 * 5 / 2
    assert passes == [7]
    clock = iter([10.0])  # one mark only: the loader ends before the timed batches do
    with pytest.raises(utils.UserError, match='fewer than 7 batches'):
        benchmark.train_throughput(setup, lambda n, epoch: Batches(n - 1), warmup=3, steps=4)
    # with the recipe's accumulation (update_freq 2), one optimizer step per two batches, as in training, and
    # the counts rounded up to whole windows: 4 warm-up and 4 timed batches, 4 optimizer steps
    steps = []
    optimizer.register_step_post_hook(lambda *_: steps.append(1))
    passes.clear()
    clock = iter([10.0, 14.0])  # 4 timed batches of 5 in 4 s
    assert benchmark.train_throughput(setup, lambda n, epoch: Batches(n), warmup=3, steps=3, update_freq=2) == 5
    assert passes == [8] and len(steps) == 4


@pytest.mark.parametrize('channels_last', [False, True])
def test_engine_gives_batches_in_the_models_memory_format(channels_last):
    """With --channels_last the CPU loader's batches reach the model channels-last, as the GPU path's do (a
    compiled model would otherwise compile again for the other layout), in training, evaluation and the k-NN
    probe."""
    import engine
    seen, grads = [], []

    class Record(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(12, 3)

        def forward(self, x):
            return self.forward_head(self.forward_features(x))

        def forward_features(self, x):
            seen.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
            grads.append(torch.is_grad_enabled())
            return x.flatten(1)

        def forward_head(self, x, pre_logits=False):
            return x if pre_logits else self.linear(x)
    model = Record()
    batches = [(torch.randn(5, 3, 2, 2), torch.randint(0, 3, (5,)))] * 2
    engine.train_one_epoch(model, lambda images, output, targets: torch.nn.functional.cross_entropy(output, targets),
                           batches, torch.optim.SGD(model.parameters(), lr=0.1), torch.device('cpu'), 0,
                           lambda optimizer, step: None, print_freq=10 ** 9, channels_last=channels_last)
    engine.evaluate(batches, model, torch.device('cpu'), channels_last=channels_last)
    engine.knn_accuracy(batches, batches, model, torch.device('cpu'), k=1, channels_last=channels_last)
    assert seen == [channels_last] * 8
    assert grads == [True, True] + [False] * 6  # evaluation and the probe run without autograd


@pytest.mark.slow
@pytest.mark.parametrize('flags, expected', [
    ([], ('no CUDA device', '--device cpu')),
    (['--device', 'gpu'], ('--device gpu', 'cuda:N or cpu')),  # main.py's own check, not torch's traceback
])
def test_benchmark_refuses_a_device_it_cannot_use(tmp_path, data, capsys, flags, expected):
    from conftest import expect_cli_error
    if torch.cuda.is_available() and not flags:
        pytest.skip('a CUDA device is present')
    sys.path.insert(0, os.path.join(ROOT, 'scripts'))
    import benchmark
    expect_cli_error(benchmark.main, ['--output', str(tmp_path / 'b.json'), '--', '--data_set', 'image_folder',
                                      '--data_path', data, *flags], capsys, *expected)
    assert not (tmp_path / 'b.json').exists()


def test_benchmark_keeps_what_it_measured_when_a_later_part_fails(tmp_path, data, capsys, monkeypatch):
    """A CPU loader that fails (15 workers' shared memory on a GPU machine) leaves the model-only, GPU-path and
    evaluation numbers in the JSON, with the failure named there and in one line (exit status 1)."""
    from conftest import expect_cli_error
    sys.path.insert(0, os.path.join(ROOT, 'scripts'))
    import benchmark
    build_loaders = datasets.build_loaders

    def failing_cpu_loader(args, device):
        if args.gpu_data == 'false':
            raise RuntimeError('DataLoader worker (pid 1) is killed by signal: Bus error.\nmore')
        return build_loaders(args, device)
    monkeypatch.setattr(datasets, 'build_loaders', failing_cpu_loader)
    out = tmp_path / 'b.json'
    expect_cli_error(benchmark.main, ['--output', str(out), '--warmup', '0', '--steps', '1', '--', *SMALL,
                                      '--data_path', data, '--device', 'cpu', '--batch_size', '4'], capsys,
                     'cpu_loader failed (RuntimeError: DataLoader worker (pid 1) is killed', str(out))
    report = json.loads(out.read_text())
    assert set(report['images_per_sec']) == {'model_only', 'gpu_path', 'eval_gpu_path'}
    assert report['errors'] == {'cpu_loader': 'RuntimeError: DataLoader worker (pid 1) is killed by signal: Bus error.'}
    assert set(report['ratios']) == {'gpu_path / model_only'} and report['projected_300_epoch_minutes'] > 0


def _fits_on_rank(rank, store_file, free_per_rank, results):
    """gpu_data.fits on this rank, for each case of free memory per rank; the vote runs on the CPU (gloo)."""
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'file://{store_file}', rank=rank, world_size=2)
    on_every_rank = utils.on_every_rank
    utils.on_every_rank = lambda flag, device: on_every_rank(flag, torch.device('cpu'))
    args = main.parse_args(['--data_set', 'CIFAR10', '--input_size', '224'])
    for case, free in enumerate(free_per_rank):
        torch.cuda.mem_get_info = lambda device=None: (free[rank], 10 ** 12)
        results[(case, rank)] = gpu_data.fits(args, torch.device('cuda'))
    dist.destroy_process_group()


@pytest.mark.slow
def test_gpu_data_fits_only_where_every_process_has_room(tmp_path):
    """Each process measures its own device's free memory; all must take the same path, so one short of room
    sends every process to the CPU loader (a rank on another path, or stopping alone, would hang the others)."""
    import torch.multiprocessing as mp
    cifar = 60_000 * 3 * 32 * 32
    results = mp.Manager().dict()
    mp.spawn(_fits_on_rank, args=(str(tmp_path / 'store'), [(2 * cifar, 2 * cifar), (2 * cifar, cifar)], results),
             nprocs=2)
    assert dict(results) == {(0, 0): True, (0, 1): True, (1, 0): False, (1, 1): False}


def test_gpu_data_fits_counts_against_free_memory(monkeypatch, tmp_path):
    """--gpu_data auto's rule: CIFAR-10's training and test splits as uint8 at 32 px within half of the free
    memory; Food-101 at 256 px squares (18.5 GiB) fits 80 GiB free, not 36 GiB, and ImageNet (by its table) does
    not fit 80 GiB, with a refusal that names the way for a subset; never on the CPU."""
    from types import SimpleNamespace
    args = main.parse_args(['--data_set', 'CIFAR10', '--input_size', '224'])
    cuda = torch.device('cuda')
    cifar_bytes = 60_000 * 3 * 32 * 32
    monkeypatch.setattr(torch.cuda, 'mem_get_info', lambda device=None: (2 * cifar_bytes, 10 ** 12))
    assert gpu_data.fits(args, cuda)
    monkeypatch.setattr(torch.cuda, 'mem_get_info', lambda device=None: (2 * cifar_bytes - 2, 10 ** 12))
    assert not gpu_data.fits(args, cuda)
    args.gpu_data = 'true'  # refused in one line, with the exact size of a named dataset (no "at least")
    with pytest.raises(utils.UserError, match=r'--gpu_data true: CIFAR10 \(175.8 MiB as uint8\) does not fit'):
        gpu_data.choose(args, cuda)
    args.gpu_data = 'auto'
    assert not gpu_data.fits(args, torch.device('cpu'))
    monkeypatch.setattr(torch.cuda, 'mem_get_info', lambda device=None: (80 * 2 ** 30, 10 ** 12))
    assert gpu_data.fits(SimpleNamespace(**{**vars(args), 'data_set': 'food101'}), cuda)  # 256 px: 19.9 GB
    monkeypatch.setattr(torch.cuda, 'mem_get_info', lambda device=None: (2 * 18 * 2 ** 30, 10 ** 12))  # 18.5 GiB
    assert not gpu_data.fits(SimpleNamespace(**{**vars(args), 'data_set': 'food101'}), cuda)
    monkeypatch.setattr(torch.cuda, 'mem_get_info', lambda device=None: (80 * 2 ** 30, 10 ** 12))
    imagenet = SimpleNamespace(**{**vars(args), 'data_set': 'IMNET', 'gpu_data': 'true'})
    assert not gpu_data.fits(imagenet, cuda)
    with pytest.raises(utils.UserError, match='for a subset pass --data_set image_folder'):
        gpu_data.choose(imagenet, cuda)


@pytest.mark.parametrize('folder', [dict(shape=(48, 72)), dict(varied_sizes=True)], ids=['one_size', 'varied'])
def test_gpu_data_fit_rule_counts_the_bytes_it_will_store(tmp_path, folder):
    """--gpu_data auto's estimate is what decode_to_uint8 then stores: an image folder of one size kept at that
    size (however much larger than the input), one of varied sizes at gpu_side squares."""
    root = write_image_folder(tmp_path / 'data', train=4, val=2, classes=2, **folder)
    args = main.parse_args(['--data_set', 'image_folder', '--data_path', root, '--input_size', '32',
                            '--num_workers', '0'])
    assert gpu_data.varied_sizes(args) == ('varied_sizes' in folder)
    stored = sum(gpu_data.decode_to_uint8(is_train, args)[0].numel() for is_train in (True, False))
    assert gpu_data.stored_bytes(args) == stored
    assert stored == (12 * 3 * 48 * 72 if 'shape' in folder else 12 * 3 * 36 * 36)  # 32 / 0.875 -> 36


def test_gpu_data_fit_rule_declines_a_large_folder_from_one_header(tmp_path, monkeypatch):
    """least_bytes reads one header per split and never exceeds stored_bytes; a folder it already puts past the
    room is declined without reading every header (minutes for an ImageNet-sized folder)."""
    root = write_image_folder(tmp_path / 'data', train=4, val=2, classes=2, shape=(48, 72))
    args = main.parse_args(['--data_set', 'image_folder', '--data_path', root, '--input_size', '32'])
    assert gpu_data.least_bytes(args) == 12 * 3 * 36 * 36 <= gpu_data.stored_bytes(args)  # min(48 x 72, 36 x 36)
    reads = []
    monkeypatch.setattr(gpu_data, '_image_sizes', lambda dataset: reads.append(dataset) or frozenset({(72, 48)}))
    monkeypatch.setattr(utils, 'on_every_rank', lambda flag, device: flag)
    monkeypatch.setattr(torch.cuda, 'mem_get_info', lambda device=None: (2 * 12 * 3 * 36 * 36 - 2, 10 ** 12))
    assert not gpu_data.fits(args, torch.device('cuda')) and reads == []
    args.gpu_data = 'true'  # and its one-line refusal says so without reading them either
    with pytest.raises(utils.UserError, match=r'--gpu_data true: image_folder \(at least 0.0 MiB as uint8\)'):
        gpu_data.choose(args, torch.device('cuda'))
    assert reads == []
    args.gpu_data = 'auto'
    monkeypatch.setattr(torch.cuda, 'mem_get_info', lambda device=None: (2 * 12 * 3 * 48 * 72, 10 ** 12))
    assert gpu_data.fits(args, torch.device('cuda')) and len(reads) == 2


def test_gpu_data_fit_rule_leaves_out_the_evaluation_split_when_evaluation_is_off(tmp_path):
    """--disable_eval true: the GPU path stores the training split only, so the rule counts only that one, and
    an image folder without val/ (or test/) is no error; CIFAR-10 counts its 50,000 training images."""
    import shutil
    root = write_image_folder(tmp_path / 'data', train=4, val=1, classes=2)
    shutil.rmtree(os.path.join(root, 'val'))
    args = main.parse_args(['--data_set', 'image_folder', '--data_path', root, '--input_size', '32',
                            '--disable_eval', 'true'])
    assert gpu_data.stored_bytes(args) == 8 * 3 * 32 * 32
    cifar = main.parse_args(['--data_set', 'CIFAR10', '--input_size', '224'])
    assert gpu_data.stored_bytes(cifar) == 60_000 * 3 * 32 * 32
    cifar.disable_eval = True
    assert gpu_data.stored_bytes(cifar) == 50_000 * 3 * 32 * 32


@pytest.mark.parametrize('bench_flags, expected', [
    (['--steps', '0'], '--steps 0: give a whole number of at least 1'),
    (['--warmup', '-1'], '--warmup -1: give a whole number of at least 0'),
    (['--profile', '-2'], '--profile -2: give a whole number of at least 0'),
])
def test_benchmark_refuses_counts_it_cannot_time(tmp_path, capsys, bench_flags, expected):
    """A count of batches that cannot be timed is one line naming the flag, not the loader's 'fewer than N
    batches' (which then named the wrong cause)."""
    from conftest import expect_cli_error
    sys.path.insert(0, os.path.join(ROOT, 'scripts'))
    import benchmark
    expect_cli_error(benchmark.main, ['--output', str(tmp_path / 'b.json'), *bench_flags, '--', '--data_set',
                                      'image_folder', '--data_path', str(tmp_path), '--device', 'cpu'], capsys,
                     expected)
    assert not (tmp_path / 'b.json').exists()
