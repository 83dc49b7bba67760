"""Checks that need a CUDA device (pytest -m cuda; scripts/gpu_check.sh runs them on a GPU): the GPU data path
on the device against the same path on CPU tensors, no host synchronisation in its steps, bf16 training steps
of ViT-T and ConvNeXt-F (eager and compiled, channels_last), torchrun with NCCL, exact resume after SIGKILL
with --deterministic true, deterministic runs that repeat bit for bit, the EMA, and --gpu_data auto's choice and memory rule. Skipped without a CUDA device.

Dry run without a GPU: WS_CUDA_TEST_DEVICE=cpu python -m pytest -m cuda tests/test_cuda.py runs every body
with 'cpu' in place of 'cuda' (and gloo in place of NCCL) to catch wrong flags and typos. The assertions that
only hold on a GPU (auto choosing the GPU path, the memory rule) fail there by design; never set it in CI.
"""
import math
import os

import pytest
import torch

import main
import gpu_transforms as gt
import datasets
import engine
import gpu_data
import recipe
from conftest import (ROOT, final_weights, free_port, kill_after_checkpoint, log_lines, run_script, run_torchrun,
                      write_image_folder)
from test_gpu_data import FILL, natural_image, to_tensor
from utils import UserError

DEVICE = os.environ.get('WS_CUDA_TEST_DEVICE', 'cuda')
BACKEND = 'nccl' if DEVICE == 'cuda' else 'gloo'
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(DEVICE == 'cuda' and not torch.cuda.is_available(),
                                                   reason='needs a CUDA device')]

VIT = ['--model', 'vit_tiny_patch16_224', '--model_kwargs', '{"patch_size": 8, "depth": 2}']
CONVNEXT = ['--model', 'convnext_femto_linear', '--model_kwargs', '{"depths": [1, 1, 1, 1]}']
TINY = ['--input_size', '32', '--data_set', 'image_folder', '--device', DEVICE, '--batch_size', '4',
        '--num_workers', '0', '--print_freq', '1', '--warmup_epochs', '0', '--epochs', '1']
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LIMIT = 150  # seconds for one subprocess: a hang costs one test, not the rest


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp('data'), seed=3)  # 24 train, 9 val images at 32 px


def train(data, out, *flags):
    """main.py in this process; returns its last log record."""
    return main.main([*VIT, *TINY, '--data_path', data, '--output_dir', str(out), *flags])


# ------------------------------------------------------------------------------------- the GPU data path
def assert_close_levels(ours, ref, exact=True):
    """uint8-valued images: within 1 level everywhere (exact), or on all but < 1% of pixels and a mean
    under 0.1 levels (affine ops, whose fill mask may flip on a boundary pixel)."""
    d = (ours.cpu() - ref).abs()
    assert (d.max() <= 1) if exact else ((d > 1).float().mean() < 0.01 and d.mean() < 0.1), (d.max(), d.mean())


def test_transform_steps_on_device_match_cpu_tensors():
    """Same crop boxes, flips, ops and host seeds on both devices: crop + resize + flip, each RandAugment op,
    two RandAugment layers and the eval transform agree within test_gpu_data.py's 1-level bound."""
    dev = torch.device(DEVICE)
    images = torch.cat([to_tensor(natural_image(s)) for s in range(len(gt.RAND_OPS))])  # (15, 3, 40, 48)
    top, left, h, w = gt.resized_crop_params(torch.Generator().manual_seed(0), 15, 40, 48, torch.device('cpu'))
    flip = torch.arange(15) % 2 == 0

    def crop(x, top, left, h, w, flip):
        cols = gt.flip_columns(gt.resample_matrix(left, w, 48, 56), flip)
        return gt.apply_resample(x, gt.resample_matrix(top, h, 40, 56), cols)
    params = (images, top, left, h, w, flip)
    assert_close_levels(crop(*(t.to(dev) for t in params)), crop(*params))

    op, level = torch.arange(15), torch.full((15,), 9.0)
    sign, on, fill = torch.where(flip, 1.0, -1.0), torch.ones(15, dtype=torch.bool), torch.tensor(FILL).float()
    ours = gt.apply_ops(images.to(dev), op, level, sign, on, fill.to(dev)).cpu()
    ref = gt.apply_ops(images, op, level, sign, on, fill)
    for k, name in enumerate(gt.RAND_OPS):
        assert_close_levels(ours[k:k + 1], ref[k:k + 1], exact=name not in gt.GEOMETRIC_OPS)
    layers = [gt.rand_augment_layer(gt.rand_augment_layer(x, g, f), g, f) for x, g, f in
              [(images.to(dev), torch.Generator().manual_seed(5), fill.to(dev)),
               (images, torch.Generator().manual_seed(5), fill)]]
    assert_close_levels(layers[0], layers[1], exact=False)
    for size in (32, 56):
        tf = gt.GpuEvalTransform(size, MEAN, STD)
        scale = torch.tensor(STD).view(1, 3, 1, 1) * 255
        d = (tf(images.byte().to(dev)).cpu() - tf(images.byte())) * scale
        assert d.abs().max() <= 1.01


@pytest.mark.parametrize('size', [48, 32])
def test_train_transform_on_device_is_seeded_and_matches_cpu_statistics(size):
    """The whole training transform: repeatable per seed on the device; its draws come from the device's
    generator, so against CPU tensors only statistics compare (2,000 draws, as in test_gpu_data.py)."""
    x = to_tensor(natural_image(7)).byte().expand(2000, -1, -1, -1).contiguous()
    tf = gt.GpuTrainTransform(size, MEAN, STD)
    a, b, c = tf(x.to(DEVICE), 0), tf(x.to(DEVICE), 0), tf(x.to(DEVICE), 1)
    assert a.device.type == DEVICE and a.shape == (2000, 3, size, size) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    a, cpu = a.cpu(), gt.GpuTrainTransform(size, MEAN, STD)(x, 0)
    # two CPU seeds differ by up to 0.059 in these statistics (seed 0 against 1..20, both sizes): 0.05 would
    # fail about one device stream in ten for no fault; a wrong op or normalization moves them further
    assert (cpu.mean((0, 2, 3)) - a.mean((0, 2, 3))).abs().max() < 0.08
    assert (cpu.std((0, 2, 3)) - a.std((0, 2, 3))).abs().max() < 0.08
    q = torch.tensor([0.1, 0.5, 0.9])
    assert (cpu.std((1, 2, 3)).quantile(q) - a.std((1, 2, 3)).quantile(q)).abs().max() < 0.08


def test_gpu_loaders_on_device_match_cpu_tensors(data):
    """build_gpu_loaders on the device: the same shuffle and labels per epoch as on the CPU (host sampler),
    channels_last batches on the device, and evaluation images within 1 level."""
    def build(device):
        args = main.parse_args([*VIT, *TINY, '--data_path', data, '--device', device, '--channels_last', 'true'])
        train, val, _, how = gpu_data.build_loaders(args, torch.device(device), 0, 1, datasets.eval_plan(args, 1))
        return train, val, how
    (train_dev, val_dev, how), (train_cpu, val_cpu, _) = build(DEVICE), build('cpu')
    assert f'on {DEVICE}' in how
    for epoch in (0, 1):
        train_dev.sampler.set_epoch(epoch), train_cpu.sampler.set_epoch(epoch)
        batches = list(train_dev)
        assert len(batches) == 6 and all(x.device.type == DEVICE and x.shape == (4, 3, 32, 32) for x, _ in batches)
        assert all(x.is_contiguous(memory_format=torch.channels_last) for x, _ in batches)
        assert torch.equal(torch.cat([y.cpu() for _, y in batches]), torch.cat([y for _, y in train_cpu]))
    scale = torch.tensor(STD).view(1, 3, 1, 1) * 255
    for (x, y), (x_cpu, y_cpu) in zip(val_dev, val_cpu, strict=True):
        assert torch.equal(y.cpu(), y_cpu) and ((x.cpu() - x_cpu) * scale).abs().max() <= 1.01


class SyncChecked:
    """A loader under torch.cuda.set_sync_debug_mode('error') from its second batch's fetch until its last batch is
    handed out: a host synchronisation there (fetching a batch, or the training step of a batch other than the
    first, which makes the optimizer's state, and the last, which prints the loss) raises, naming the op. Off on
    the CPU dry run."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        check, last = DEVICE == 'cuda', len(self.loader) - 1
        try:
            for k, batch in enumerate(self.loader):  # the first fetch copies the epoch's order to the device
                if check and k in (0, last):
                    torch.cuda.set_sync_debug_mode('default')
                yield batch
                if check:
                    torch.cuda.set_sync_debug_mode('error')
        finally:
            if check:
                torch.cuda.set_sync_debug_mode('default')


@pytest.mark.parametrize('model,size,mixing', [(VIT, '32', ['--mixup', '0.8', '--cutmix', '0']),
                                                (CONVNEXT, '64', ['--mixup', '0', '--cutmix', '1.0'])],
                         ids=['vit_tiny_32px_mixup', 'convnext_femto_64px_cutmix'])
def test_gpu_path_training_steps_never_wait_for_the_device(data, model, size, mixing):
    """The GPU data path with the paper's augmentation (at 32 px resize, pad and crop; above, random resized
    crops) and a bf16, channels_last training step (mixup or cutmix, AdamW, gradient clipping) make no host
    synchronisation between an epoch's first batch and its last: each one would leave the GPU idle while Python
    catches up, which the benchmark's ratio to the model alone shows."""
    args = main.parse_args([*model, *TINY, '--data_path', data, '--gpu_data', 'true', '--use_amp', 'true',
                            '--channels_last', 'true', '--clip_grad', '1.0', '--aa', 'rand-m9-mstd0.5-inc1',
                            '--reprob', '0.25', '--input_size', size, *mixing])
    t = main.build_training(main.setup(args))
    assert 'GPU data path' in t.data.how and t.mixup_fn is not None
    t.data.train.sampler.set_epoch(0)
    stats = engine.train_one_epoch(t.forward_model, t.criterion, SyncChecked(t.data.train), t.state.optimizer,
                                   torch.device(DEVICE), 0, t.schedule, amp_dtype=t.amp_dtype, scaler=t.state.scaler,
                                   clip_grad=args.clip_grad, mixup_fn=t.mixup_fn, print_freq=10 ** 6)
    assert stats['steps'] == 6 and math.isfinite(stats['loss'])


# ------------------------------------------------------------------------------------------- training
def check_bf16_step(tmp_path, data, model, compile):
    """One epoch (6 steps) with --use_amp true (bf16 on CUDA) and channels_last: a finite loss, a checkpoint
    whose weights and AdamW moments are finite, and moments that moved (the steps ran)."""
    out = tmp_path / 'run'
    record = main.main([*model, *TINY, '--data_path', data, '--output_dir', str(out), '--use_amp', 'true',
                        '--channels_last', 'true', '--compile', compile])
    assert math.isfinite(record['train_loss']) and math.isfinite(record['test_loss'])
    ckpt = torch.load(out / 'checkpoint-0.pth', map_location='cpu', weights_only=True)
    assert ckpt['args']['compile'] == (compile == 'true') and ckpt['args']['use_amp']
    assert all(torch.isfinite(v).all() for v in ckpt['model'].values() if v.is_floating_point())
    moments = [s['exp_avg'] for s in ckpt['optimizer']['state'].values()]
    assert moments and all(torch.isfinite(m).all() for m in moments) and any(m.abs().sum() > 0 for m in moments)
    if DEVICE == 'cuda':
        assert recipe.build_amp(main.parse_args(['--use_amp', 'true']), torch.device('cuda'))[0] == torch.bfloat16


@pytest.mark.parametrize('model', [VIT, CONVNEXT], ids=['vit_tiny', 'convnext_femto'])
def test_bf16_training_step_eager(tmp_path, data, model):
    check_bf16_step(tmp_path, data, model, 'false')


NCCL_SCRIPT = """
import os, sys
import torch, torch.distributed as dist
sys.path.insert(0, {root!r})
import main, utils
args = main.parse_args(['--device', {device!r}])
rank, world_size, local = (int(os.environ[k]) for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'))
backend = utils.join_process_group(args, rank, world_size, local)  # main.py's, with a group of one
device = torch.device({device!r}, local) if {device!r} == 'cuda' else torch.device('cpu')
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 4).to(device),
                                                  device_ids=[local] if device.type == 'cuda' else None)
with torch.autocast(device.type, dtype=torch.bfloat16):
    loss = model(torch.ones(2, 8, device=device)).float().square().mean()
loss.backward()
total = torch.full((3,), 2.0, device=device)
dist.all_reduce(total)
dist.barrier()
bound = getattr(dist.distributed_c10d._get_default_group(), 'bound_device_id', None)  # NCCL's device_id
print('backend', backend, dist.get_backend(), 'bound', bound, 'all_reduce', total.tolist(),
      'grad finite', bool(torch.isfinite(model.module.weight.grad).all()), flush=True)
del model  # DDP holds the group: alive when it is destroyed, it can abort at exit (utils.close_distributed)
dist.destroy_process_group()
"""


def test_torchrun_one_process_nccl(tmp_path, data):
    """One torchrun process: a process group with NCCL (joined by main.py's utils.join_process_group) runs DDP
    and an all_reduce; main.py itself trains on LOCAL_RANK's device (with one process it makes no process group)."""
    script = tmp_path / 'nccl_check.py'
    script.write_text(NCCL_SCRIPT.format(root=ROOT, device=DEVICE))
    torchrun = ['--nproc_per_node=1', f'--master_port={free_port()}']
    proc = run_torchrun(*torchrun, str(script), timeout=LIMIT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    bound = 'cuda:0' if DEVICE == 'cuda' else None  # join_process_group passes NCCL its device
    assert f'backend {BACKEND} {BACKEND} bound {bound} ' in proc.stdout and 'all_reduce [2.0, 2.0, 2.0] grad finite True' in proc.stdout
    out = tmp_path / 'run'
    proc = run_torchrun(*torchrun, 'main.py', *VIT, *TINY, '--data_path', data, '--output_dir', str(out),
                      '--use_amp', 'true', timeout=LIMIT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'world_size 1 x batch_size 4' in proc.stdout and (out / 'checkpoint-0.pth').exists()
    assert math.isfinite(log_lines(out)[0]['train_loss'])


def test_sigkill_then_resume_is_exact_deterministic(tmp_path, data):
    """--deterministic true, bf16, the GPU data path: killed after its first mid-epoch checkpoint and
    restarted, the run ends with bit-identical weights, EMA and log lines (as on the CPU, test_reliability)."""
    flags = [*VIT, *TINY, '--data_path', data, '--epochs', '2', '--deterministic', 'true', '--use_amp', 'true',
             '--gpu_data', 'true', '--save_every_steps', '1', '--model_ema', 'true', '--model_ema_decay', '0.9',
             '--batch_size', '2']  # 12 steps an epoch, each checkpointed: time to kill it on a fast GPU
    reference, killed = tmp_path / 'reference', tmp_path / 'killed'
    proc = run_script('main.py', *flags, '--output_dir', str(reference), timeout=LIMIT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert kill_after_checkpoint(['main.py', *flags, '--output_dir', str(killed)], killed, timeout=LIMIT), \
        'the run ended before it could be killed'
    proc = run_script('main.py', *flags, '--output_dir', str(killed), timeout=LIMIT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'resumed from' in proc.stdout and 'continuing at epoch 2' not in proc.stdout
    a, b = final_weights(reference, 1), final_weights(killed, 1)
    for part in ('model', 'model_ema'):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert log_lines(reference) == log_lines(killed)


@pytest.mark.parametrize('model', [VIT, CONVNEXT], ids=['vit', 'convnext'])
def test_deterministic_runs_repeat_bit_for_bit(tmp_path, data, model):
    """--deterministic true, bf16, the GPU data path: two runs give bit-identical weights and log lines (the
    transfer study's teachers rely on it: a later session trains the same teacher again). ConvNeXt's global
    pooling must not reach adaptive_avg_pool2d's backward, which has no deterministic CUDA kernel."""
    flags = [*model, *TINY, '--data_path', data, '--deterministic', 'true', '--use_amp', 'true', '--gpu_data', 'true']
    for run in ('a', 'b'):
        proc = run_script('main.py', *flags, '--output_dir', str(tmp_path / run), timeout=LIMIT)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = final_weights(tmp_path / 'a', 0), final_weights(tmp_path / 'b', 0)
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    assert log_lines(tmp_path / 'a') == log_lines(tmp_path / 'b')


def test_ema_on_device_follows_its_update_rule(tmp_path, data):
    """--model_ema with the CPU loader (pinned memory): the EMA lives on the device, and between mid-epoch
    checkpoints ema_k = d_k * ema_(k-1) + (1 - d_k) * model_k, d_k being timm's decay for the step (ModelEmaV3
    starts with copies, then 0.9); its evaluation is logged."""
    from timm.utils import ModelEmaV3
    decays = [ModelEmaV3(torch.nn.Linear(1, 1), decay=0.9).get_decay(k - 1) for k in range(2, 6)]  # update k-1
    assert decays[-1] == 0.9
    out = tmp_path / 'run'
    record = train(data, out, '--model_ema', 'true', '--model_ema_decay', '0.9', '--model_ema_eval', 'true',
                   '--gpu_data', 'false', '--num_workers', '1', '--save_every_steps', '1', '--save_ckpt_num', '10')
    assert 'test_acc1_ema' in record
    steps = [torch.load(out / f'checkpoint-0-step{k}.pth', weights_only=True) for k in range(1, 6)]
    assert all(v.device.type == DEVICE for v in steps[0]['model_ema'].values())
    for k, d, before, now in zip(range(2, 6), decays, steps, steps[1:]):
        for name, model_v in now['model'].items():
            expected = d * before['model_ema'][name] + (1 - d) * model_v
            torch.testing.assert_close(now['model_ema'][name], expected, rtol=1e-5, atol=1e-6,
                                       msg=f'step {k} {name}')
    assert any(not torch.equal(now['model_ema'][n], now['model'][n]) for n in now['model'])


# ---------------------------------------------------------------------------- --gpu_data auto and memory
def test_gpu_data_auto_takes_the_device_path_when_it_fits(tmp_path, data, monkeypatch, capsys):
    train(data, tmp_path / 'auto', '--use_amp', 'true')
    lines = [line for line in capsys.readouterr().out.splitlines() if 'GPU data path' in line]
    assert lines and f'on {DEVICE}' in lines[0], lines
    monkeypatch.setattr(torch.cuda, 'mem_get_info', lambda device=None: (4096, 10 ** 12))
    record = train(data, tmp_path / 'small_gpu')
    assert 'GPU data path' not in capsys.readouterr().out and math.isfinite(record['train_loss'])


def test_gpu_data_fits_rule_on_device(data, monkeypatch, tmp_path):
    """Both splits as stored (the fixture's 32 px images at their own size) within half of the free memory;
    --gpu_data true stops with one line when they do not fit."""
    args = main.parse_args([*VIT, *TINY, '--data_path', data])
    device = torch.device(DEVICE, 0) if DEVICE == 'cuda' else torch.device(DEVICE)
    assert gpu_data.fits(args, device)  # the real free memory
    need = (24 + 9) * 3 * 32 * 32
    monkeypatch.setattr(torch.cuda, 'mem_get_info', lambda device=None: (2 * need, 10 ** 12))
    assert gpu_data.fits(args, device)
    monkeypatch.setattr(torch.cuda, 'mem_get_info', lambda device=None: (2 * need - 2, 10 ** 12))
    assert not gpu_data.fits(args, device)
    with pytest.raises(UserError, match='does not fit in half of the free GPU memory'):
        train(data, tmp_path / 'run', '--gpu_data', 'true')


@pytest.mark.parametrize('model', [VIT, CONVNEXT], ids=['vit_tiny', 'convnext_femto'])
def test_bf16_training_step_compiled(tmp_path, data, model):
    """Last: the slowest tests (compilation); if the check's time runs out, only they are lost."""
    check_bf16_step(tmp_path, data, model, 'true')
