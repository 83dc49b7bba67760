"""Train a (small) timm model with the paper's recipe (Appendix A, recipe.py), from random init or from a
weight-selection file (--initialize). One GPU, many GPUs (torchrun), or the CPU:

    torchrun --nproc_per_node=8 main.py --config configs/vit_tiny_cifar100.yaml \
        --data_path data --initialize ws/vit_tiny_cifar100.pth --output_dir runs/vit_tiny_ws
    python main.py --config configs/vit_tiny_cifar100.yaml --data_path data --output_dir runs/x   # 1 GPU

This file parses the flags and wires the pieces: datasets.py / gpu_data.py (loaders), models/build.py
(the model, its initialization, the distillation teacher), recipe.py (loss, optimizer, schedule),
checkpoint.py (save and resume), engine.py (the loops). Three runs: train, --eval, --knn_probe.
"""
import argparse
import json
import os
import sys
import time
from dataclasses import dataclass

import torch

import checkpoint
import config
import datasets
import engine
import losses
import recipe
import utils
from models import build
from utils import UserError, str2bool


def get_args_parser():
    p = utils.ArgumentParser('main.py', description=__doc__.split('\n\n')[0], add_help=True,
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a('--config', action='append', default=None, metavar='YAML',
      help='YAML file of flag values (flag names as keys); may be repeated: a later file overrides an earlier '
           'one, and command-line flags override every file')
    for add_flags in (_model_and_optimizer_flags, _augmentation_and_init_flags, _data_and_run_flags):
        add_flags(a)
    # official flags without effect here (a warning when given): Weights & Biases and ITP clusters
    for flag in ('--enable_wandb', '--wandb_ckpt', '--dist_on_itp'):
        a(flag, type=str2bool, default=None, help='no effect (official flag, kept for its commands)')
    a('--project', default=None, help='no effect (official W&B flag, kept for its commands)')
    a('--eval_data_path', default=None, help='no effect: the evaluation split comes from --data_path (see datasets.py)')
    return p


def _model_and_optimizer_flags(a):
    """Run length, batch, model, optimizer and schedule."""
    # run length and batch
    a('--batch_size', default=64, type=int, help='per-GPU (per-process) batch size')
    a('--global_batch_size', default=None, type=int,
      help='world_size x batch_size x update_freq; derives update_freq from the number of processes')
    a('--epochs', default=300, type=int, help='training epochs (at least --warmup_epochs)')
    a('--update_freq', default=1, type=int, help='gradient accumulation steps')
    # model
    a('--model', default='convnext_tiny', type=str, help='timm model name or one registered in models/')
    a('--model_kwargs', default='', help='JSON keyword arguments for timm.create_model')
    a('--input_size', default=224, type=int, help='image size (passed as img_size to models that take it)')
    a('--drop_path', type=float, default=0.0, help='stochastic depth rate')
    a('--layer_scale_init_value', default=1e-6, type=float, help='ConvNeXt layer scale init')
    a('--head_init_scale', default=1.0, type=float, help='ConvNeXt classifier init scale')
    a('--model_ema', type=str2bool, default=False, help='keep an exponential moving average of the weights')
    a('--model_ema_decay', type=float, default=0.9999, help='EMA decay per optimizer step')
    a('--model_ema_force_cpu', type=str2bool, default=False, help='hold the EMA on the CPU')
    a('--model_ema_eval', type=str2bool, default=False, help='also evaluate the EMA model each epoch')
    # optimizer and schedule
    a('--opt', default='adamw', type=str, help='optimizer: a timm name (adamw, sgd, ...) or lars (lars.py)')
    a('--opt_eps', default=1e-8, type=float, help='optimizer epsilon')
    a('--opt_betas', default=None, type=float, nargs='+', help='Adam betas (None: the optimizer\'s own)')
    a('--clip_grad', type=float, default=None, help='gradient norm clip (None: off)')
    a('--momentum', type=float, default=0.9, help='SGD momentum')
    a('--weight_decay', type=float, default=0.05, help='weight decay (not on biases and norms)')
    a('--weight_decay_end', type=float, default=None, help='cosine schedule of weight decay to this value')
    a('--lr', type=float, default=4e-3, help='learning rate at the global batch (ignored with --blr)')
    a('--blr', type=float, default=None,
      help='base learning rate per 512 images of global batch: lr = blr x global batch / 512 (DeiT\'s rule; '
           'MAE\'s blr is per 256 images, so MAE\'s --blr x is --blr 2x here)')
    a('--layer_decay', type=float, default=1.0, help="layer-wise lr decay (1.0: off), through timm's group matchers")
    a('--min_lr', type=float, default=1e-6, help='learning rate at the end of the cosine schedule')
    a('--warmup_epochs', type=int, default=50, help='linear warmup from 0 (the official default, 50)')
    a('--warmup_steps', type=int, default=-1, help='overrides warmup_epochs when > 0')


def _augmentation_and_init_flags(a):
    """Augmentation, initialization and distillation."""
    # augmentation
    a('--color_jitter', type=float, default=0.4, help='color jitter strength (with --aa none)')
    a('--aa', type=str, default='rand-m9-mstd0.5-inc1', help='RandAugment policy (timm syntax); none to disable')
    a('--smoothing', type=float, default=0.1, help='label smoothing')
    a('--train_interpolation', type=str, default='bicubic', help='resize interpolation of training images',
      choices=('bicubic', 'bilinear', 'nearest', 'box', 'hamming', 'lanczos', 'random'))
    a('--crop_pct', type=float, default=None, help='evaluation center crop fraction (None: 224/256)')
    a('--reprob', type=float, default=0.25, help='random erasing probability')
    a('--remode', type=str, default='pixel', help='random erasing fill mode', choices=('pixel', 'rand', 'const'))
    a('--recount', type=int, default=1, help='random erasing count')
    a('--resplit', type=str2bool, default=None, help='no effect (official flag, kept for its commands)')
    a('--mixup', type=float, default=0.8, help='mixup alpha (0: off)')
    a('--cutmix', type=float, default=1.0, help='cutmix alpha (0: off)')
    a('--cutmix_minmax', type=float, nargs='+', default=None, help='cutmix min/max box ratio (overrides --cutmix alpha)')
    a('--mixup_prob', type=float, default=1.0, help='probability of applying mixup or cutmix to a batch')
    a('--mixup_switch_prob', type=float, default=0.5, help='probability of cutmix instead of mixup when both are on')
    a('--mixup_mode', type=str, default='batch', help='mixup per batch, pair or elem',
      choices=('batch', 'pair', 'elem'))
    # initialization
    a('--initialize', default=None, help='weight selection output (weight_selection.py), a state dict, or the '
                                         'folder of the official release holding vit.pth / convnext.pth')
    a('--init', default='timm', choices=('timm', 'xavier', 'kaiming', 'mimetic'),
      help='initialization of a model trained without --initialize (Tables 3, 12)')
    a('--linear_probe', type=str2bool, default=False,
      help='freeze the backbone, train BatchNorm (no affine) + a new linear classifier (MAE recipe, Table 9)')
    # knowledge distillation (Table 4)
    a('--distill', default='none', choices=('none', 'logit', 'feature'), help='knowledge distillation (Table 4)')
    a('--distill_teacher', default=None, help='timm name of the distillation teacher')
    a('--distill_teacher_checkpoint', default=None, help='its weights (default: timm pretrained from the hub)')
    a('--distill_teacher_kwargs', default='', help='JSON keyword arguments, e.g. {"dynamic_img_size": true}')
    a('--distill_alpha', type=float, default=1.0, help='weight of the distillation loss')
    a('--distill_tau', type=float, default=1.0, help='temperature of logit distillation')
    a('--trust_checkpoint', type=str2bool, default=False,
      help='fully unpickle checkpoints that hold Python objects besides tensors (can run code: only for files '
           'you trust, e.g. checkpoints written before weights-only saving); default: such files are refused')
    a('--model_key', default='model|module', type=str, help='keys under which --initialize may wrap the weights')
    a('--model_prefix', default='', type=str, help='prefix to strip from --initialize keys')


def _data_and_run_flags(a):
    """Data, output, run control and distributed set-up."""
    # data
    a('--data_path', default=None, type=str, help='dataset folder')
    a('--nb_classes', default=None, type=int, help='no effect: the number of classes comes from the dataset')
    a('--imagenet_default_mean_and_std', type=str2bool, default=True, help='ImageNet mean/std normalization (false: inception 0.5)')
    a('--data_set', default='IMNET', type=str, help='dataset: ' + ', '.join(datasets.DATASETS))
    a('--download', type=str2bool, default=False, help='let torchvision download the dataset into --data_path')
    a('--check_data', type=str2bool, default=False,
      help='decode every image of an image_folder/IMNET dataset once before training and list the unreadable ones')
    a('--num_workers', default=10, type=int, help='data-loading worker processes per process (0: in the main one)')
    a('--gpu_data', default='auto', choices=('auto', 'true', 'false'),
      help='hold the dataset on the device as uint8 and augment there (gpu_transforms.py); auto: on CUDA when '
           'the stored splits (training, and evaluation unless --disable_eval) take at most half of the free GPU '
           'memory')
    a('--gpu_data_size', default=None, type=int,
      help='GPU data path: short side to which datasets of varied image sizes are resized once '
           '(default input_size / crop_pct, e.g. 256 for 224)')
    a('--pin_mem', type=str2bool, default=True, help='pinned host memory for faster GPU copies')
    # output and run control
    a('--output_dir', default='', help='checkpoints, log.txt, config.yaml')
    a('--log_dir', default=None, help='TensorBoard folder')
    a('--device', default='cuda', help='cuda or cpu (cuda falls back to the CPU when absent)')
    a('--seed', default=0, type=int, help='random seed (plus the process rank)')
    a('--resume', default='', help='checkpoint to resume from (or to evaluate with --eval)')
    a('--auto_resume', type=str2bool, default=True, help='resume from the newest checkpoint in --output_dir')
    a('--save_ckpt', type=str2bool, default=True, help='save checkpoints in --output_dir')
    a('--save_ckpt_freq', default=1, type=int, help='save an epoch checkpoint every N epochs (and the last)')
    a('--save_ckpt_num', default=3, type=int,
      help='keep the newest N resumable checkpoints, epoch and mid-epoch ones (0: all), plus the best')
    a('--save_every_steps', default=0, type=int,
      help='also checkpoint every N optimizer steps inside an epoch (mid-epoch resume; 0: off)')
    a('--deterministic', type=str2bool, default=False,
      help='deterministic kernels (torch.use_deterministic_algorithms); bit-exact resume on the CPU holds without it')
    a('--start_epoch', default=0, type=int, help='first epoch when not resuming')
    a('--eval', type=str2bool, default=False, help='only evaluate (with --resume CKPT)')
    a('--knn_probe', type=int, default=0, metavar='K',
      help='only measure the initial model (--initialize, --init) by a K-nearest-neighbour vote of its features: '
           'training images (eval transform) as neighbours, accuracy on the test split; no training')
    a('--knn_features', default='model', choices=('model', 'pixels'),
      help="--knn_probe's features: the model's pre-logits, or the raw normalized pixels (a baseline)")
    a('--dist_eval', type=str2bool, default=True, help='shard evaluation over processes')
    a('--disable_eval', type=str2bool, default=False, help='no evaluation after each epoch')
    a('--eval_freq', default=1, type=int,
      help='evaluate every N epochs and after the last; the best checkpoint is chosen among evaluated epochs')
    a('--print_freq', default=50, type=int,
      help='print training progress every N batches (micro-batches with --update_freq)')
    a('--use_amp', type=str2bool, default=False,
      help='mixed precision on CUDA: bf16 where supported, else fp16 + GradScaler (the CPU: float32)')
    a('--compile', type=str2bool, default=False, help='torch.compile the model')
    a('--channels_last', type=str2bool, default=False, help='channels-last memory format')
    # distributed
    a('--world_size', default=None, type=int, help='no effect: the number of processes comes from the launcher')
    a('--local_rank', '--local-rank', default=-1, type=int, help='set by torch.distributed.launch')
    a('--dist_url', default='env://', help='process group init method')


# Official flags kept so that the official commands run, but which do nothing here: a warning when given.
NO_EFFECT = {'nb_classes': 'the number of classes comes from the dataset',
             'world_size': 'the number of processes comes from the launcher (torchrun, SLURM)',
             'resplit': 'random erasing is not split by augmentation here',
             'enable_wandb': 'Weights & Biases is not a dependency; see log.txt and --log_dir (TensorBoard)',
             'wandb_ckpt': 'Weights & Biases is not a dependency', 'project': 'Weights & Biases is not a dependency',
             'dist_on_itp': 'torchrun, SLURM and torch.distributed.launch are detected from the environment',
             'eval_data_path': 'the evaluation split comes from --data_path'}


def parse_args(argv=None):
    """Flags < YAML configs (in order: a later file overrides an earlier one) < command line; unknown
    YAML keys are an error naming the closest flags."""
    args = config.parse_with_configs(get_args_parser, argv if argv is not None else sys.argv[1:])
    for flag, why in NO_EFFECT.items():
        if getattr(args, flag) is not None:
            utils.print_main(f'warning: --{flag} has no effect ({why})')
    return args


@dataclass(frozen=True)
class Run:
    """What a run derives from its flags (which stay as parsed) and its launcher."""
    args: object
    device: torch.device
    dist: utils.Dist
    update_freq: int        # gradient accumulation steps
    global_batch: int       # world_size x batch_size x update_freq
    lr: float               # --lr, or --blr x global batch / 512

    @property
    def layout(self):
        """How an epoch's batches are counted per process: what a checkpoint taken inside an epoch must share
        with the run that finishes the epoch."""
        return {'world_size': self.dist.world_size, 'batch_size': self.args.batch_size, 'update_freq': self.update_freq}


def resolve_batch(args, world_size):
    """(update_freq, global batch): --global_batch_size derives update_freq from the number of processes."""
    update_freq = args.update_freq
    if args.global_batch_size:
        per_step = world_size * args.batch_size
        if args.global_batch_size % per_step:
            raise UserError(f'--global_batch_size {args.global_batch_size} is not a multiple of world_size x '
                            f'batch_size = {world_size} x {args.batch_size}; change --batch_size')
        update_freq = args.global_batch_size // per_step
        if args.update_freq not in (1, update_freq):  # 1 is also the default: only another value is a choice
            raise UserError(f'--update_freq {args.update_freq} disagrees with --global_batch_size '
                            f'{args.global_batch_size}, which gives update_freq {update_freq} with world_size x '
                            f'batch_size = {world_size} x {args.batch_size}; give one of the two')
    return update_freq, world_size * args.batch_size * update_freq


def setup(args):
    """Process group, device, batch and lr, seeds, determinism and the output folder of a run."""
    config.check_args(args)
    device_name = args.device
    if utils.launched_world_size() > 1 and device_name.startswith('cuda:'):  # NCCL, set_device: the local rank
        raise UserError(f'--device {device_name} under torchrun: each process takes the GPU of its local rank; '
                        f'pass --device cuda (choose GPUs with CUDA_VISIBLE_DEVICES)')
    place = utils.init_distributed(args)
    if device_name.startswith('cuda') and not torch.cuda.is_available():
        utils.print_main('no CUDA device: running on the CPU (pass --device cpu to silence this)')
        device_name = 'cpu'
    if args.model_ema and args.model_ema_eval and args.model_ema_force_cpu and not device_name.startswith('cpu'):
        raise UserError('--model_ema_force_cpu true holds the EMA on the CPU, where --model_ema_eval true cannot '
                        'evaluate it on the GPU\'s batches; pass --model_ema_eval false (as timm does) or hold the '
                        'EMA on the GPU')
    device = torch.device(device_name, place.local_rank) if device_name == 'cuda' else torch.device(device_name)
    if args.eval and not args.resume:
        raise UserError('--eval true needs --resume CHECKPOINT')
    if args.knn_probe < 0:
        raise UserError(f'--knn_probe {args.knn_probe}: pass the number of neighbours, e.g. --knn_probe 20')
    update_freq, global_batch = resolve_batch(args, place.world_size)
    lr = recipe.learning_rate(args, global_batch)
    # --output_dir is created only once the run has passed its checks (train, knn_probe): a run that
    # stops on a mistake leaves no empty folder behind
    checkpoint.remove_stale_temporaries(args.output_dir)
    utils.seed_everything(args.seed + place.rank)  # torch, numpy (timm's Mixup) and random
    if args.deterministic:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
    # set either way: runs in one process (the transfer study, tests) must not inherit an earlier run's mode
    torch.use_deterministic_algorithms(bool(args.deterministic))
    torch.backends.cudnn.benchmark = not args.deterministic
    return Run(args, device, place, update_freq, global_batch, lr)


# ----------------------------------------------------------------------------------------------
# The three runs.

@dataclass
class Training:
    """The objects of a training run, built once."""
    data: datasets.Loaders
    state: checkpoint.TrainState      # plain model, optimizer, scaler, EMA, projector
    forward_model: torch.nn.Module    # what the loop calls: DDP and/or compiled, with the projector
    criterion: torch.nn.Module
    mixup_fn: object
    schedule: recipe.StepSchedule
    amp_dtype: object
    steps_per_epoch: int
    n_parameters: int


def build_training(run):
    args, device = run.args, run.device
    data = datasets.build_loaders(args, device, run.dist.rank, run.dist.world_size)
    model = build.place(build.initialize(build.build_model(args, data.num_classes), args), args, device)
    teacher = build.build_distill_teacher(args, data.num_classes, device)
    # what the optimizer updates: the model, with feature distillation also its projector
    trainable = losses.FeatureDistillStudent(model, teacher.num_features).to(device) if args.distill == 'feature' \
        else model
    steps_per_epoch = len(data.train) // run.update_freq
    if steps_per_epoch == 0:
        raise UserError(f'{data.num_train} training images give {len(data.train)} batches of {args.batch_size} per '
                        f'process, fewer than one optimizer step of update_freq {run.update_freq} (global batch '
                        f'{run.global_batch}): nothing would be trained; lower --global_batch_size (or --batch_size / '
                        f'--update_freq) or train on more images')
    if args.warmup_steps > steps_per_epoch * args.epochs:
        raise UserError(f'--warmup_steps {args.warmup_steps} is more than the run\'s {steps_per_epoch * args.epochs} '
                        f'optimizer steps: the learning rate would never reach --lr; lower --warmup_steps')
    mixup_fn, criterion = recipe.build_criterion(args, data.num_classes, teacher)
    optimizer = recipe.build_optimizer(trainable, args, device, run.lr)
    amp_dtype, scaler = recipe.build_amp(args, device)
    forward_model = trainable
    if run.dist.distributed:  # DDP broadcasts rank 0's weights: every rank then holds the same model
        forward_model = torch.nn.parallel.DistributedDataParallel(
            trainable, device_ids=[run.dist.local_rank] if device.type == 'cuda' else None)
    model_ema = None
    if args.model_ema:  # after the broadcast, so that the EMA starts from the same weights on every rank
        from timm.utils import ModelEmaV3
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay, device='cpu' if args.model_ema_force_cpu else None)
    projector = trainable.projector if args.distill == 'feature' else None
    schedule = recipe.build_schedule(args, run.lr, steps_per_epoch, args.epochs)
    state = checkpoint.TrainState(model, optimizer, scaler, model_ema, projector, schedule)
    return Training(data, state, torch.compile(forward_model) if args.compile else forward_model, criterion,
                    mixup_fn, schedule, amp_dtype, steps_per_epoch,
                    sum(p.numel() for p in model.parameters() if p.requires_grad))


def train(run):
    args, started = run.args, time.time()
    t = build_training(run)
    count = f'{t.n_parameters / 1e6:.2f}M' if t.n_parameters >= 10 ** 5 else f'{t.n_parameters:,}'
    utils.print_main(f'model {args.model}: {count} trainable parameters'
                     + (' (the backbone frozen: --linear_probe)' if args.linear_probe else '')
                     + f'; {t.data.num_train} training images, {t.data.num_classes} classes; {t.data.how}')
    utils.print_main(f'global batch = world_size {run.dist.world_size} x batch_size {args.batch_size} x update_freq '
                     f'{run.update_freq} = {run.global_batch}; lr {run.lr:g}; {t.steps_per_epoch} optimizer steps '
                     f'per epoch')
    resumed = checkpoint.resume(args, t.state, run.layout)
    if resumed.start_epoch > args.epochs:  # its config.yaml and log would otherwise disagree on what it trained
        raise UserError(f'the run resumed from {resumed.path} has trained {resumed.start_epoch} epochs, more than '
                        f'--epochs {args.epochs}: pass --epochs {resumed.start_epoch} or more to continue it, or '
                        f'another --output_dir for a new run')
    log_writer = None
    if args.log_dir and utils.is_main_process():
        from torch.utils.tensorboard import SummaryWriter
        os.makedirs(args.log_dir, exist_ok=True)
        log_writer = SummaryWriter(log_dir=args.log_dir)
    if not args.output_dir:
        utils.print_main('warning: no --output_dir: no checkpoint, log or config will be written, and the run '
                         'cannot be resumed')
    else:
        os.makedirs(args.output_dir, exist_ok=True)
        if utils.is_main_process() and resumed.start_epoch < args.epochs:  # a finished run's record stays its own
            derived = {'world_size': run.dist.world_size, 'update_freq': run.update_freq,
                       'global_batch': run.global_batch, 'lr': run.lr}
            checkpoint.save_run_config(args, run.device, derived)
    utils.print_main(f'training epochs {resumed.start_epoch}..{args.epochs - 1}')
    best, record = resumed.best, {}
    for epoch in range(resumed.start_epoch, args.epochs):
        done = resumed.step_in_epoch if epoch == resumed.start_epoch else 0
        record = train_epoch(run, t, epoch, done, resumed.partial if done else None, best, log_writer)
        checkpoint.append_log(args.output_dir, record)  # first: a kill before the checkpoint redoes the epoch
        best = checkpoint.save_epoch(args, epoch, record, best, t.state)
        if log_writer is not None:
            for k in ('test_acc1', 'test_acc5', 'test_loss', 'train_loss'):
                if k in record:
                    log_writer.add_scalar(f'epoch/{k}', record[k], epoch)
            log_writer.flush()
        utils.print_main(json.dumps(record))
    utils.print_main(checkpoint.run_summary(args, record, best, time.time() - started))
    return record


def train_epoch(run, t, epoch, done, partial, best, log_writer):
    """One epoch (the rest of it after `done` optimizer steps), its evaluation, and its log record."""
    args, start = run.args, time.time()
    t.data.train.sampler.set_epoch(epoch, skip=done * run.update_freq * args.batch_size)

    def on_step(step, get_partial):
        k = step - epoch * t.steps_per_epoch  # optimizer steps of this epoch done
        if args.output_dir and args.save_ckpt and args.save_every_steps and k % args.save_every_steps == 0 \
                and k < t.steps_per_epoch:
            partial_state = get_partial()
            # decided alike on every process: one stopping alone would leave the others waiting in the save
            if not utils.on_every_rank(bool(torch.isfinite(partial_state['loss_sum'])), run.device):
                raise engine.NonFiniteLoss(f'non-finite loss before optimizer step {step} of epoch {epoch}; '
                                           f'stopped, the last good checkpoint is kept')
            checkpoint.save_mid_epoch(args, epoch, k, partial_state, best, t.state, run.layout)

    stats = engine.train_one_epoch(
        t.forward_model, t.criterion, t.data.train, t.state.optimizer, run.device, epoch, t.schedule,
        update_freq=run.update_freq, amp_dtype=t.amp_dtype, scaler=t.state.scaler, clip_grad=args.clip_grad,
        mixup_fn=t.mixup_fn, model_ema=t.state.model_ema, ema_source=t.state.model, log_writer=log_writer,
        print_freq=args.print_freq, start_step=epoch * t.steps_per_epoch + done, partial=partial, on_step=on_step,
        channels_last=args.channels_last)
    record = {'epoch': epoch, 'train_loss': stats['loss'], 'train_lr': stats['lr'],
              'images_per_sec': round(stats['images_per_sec'], 1)}
    ema = t.state.model_ema
    for module in [t.state.model] + ([ema.module] if ema is not None else []):  # one model, evaluated and saved
        utils.broadcast_buffers(module)
    if t.data.val is not None and ((epoch + 1) % args.eval_freq == 0 or epoch + 1 == args.epochs):
        # the plain model (state.model): through DDP, a model with buffers (the linear probe's BatchNorm) would
        # broadcast them at every forward, and sharded evaluation can give ranks different numbers of batches
        test = engine.evaluate(t.data.val, t.state.model, run.device, t.amp_dtype, t.data.eval_sharded,
                               args.channels_last)
        record.update(test_loss=test['loss'], test_acc1=test['acc1'], test_acc5=test['acc5'])
        if t.state.model_ema is not None and args.model_ema_eval:
            ema = engine.evaluate(t.data.val, t.state.model_ema.module, run.device, t.amp_dtype, t.data.eval_sharded,
                                  args.channels_last)
            record.update(test_acc1_ema=ema['acc1'], test_acc5_ema=ema['acc5'])
    record.update(epoch_seconds=round(time.time() - start, 2), n_parameters=t.n_parameters)
    return record


def evaluate_only(run, ckpt):
    """--eval: the test accuracy of the --resume checkpoint's weights (on the evaluation split only)."""
    args = run.args
    val, num_classes, sharded = datasets.eval_loader(args, run.device, run.dist.rank, run.dist.world_size)
    model = build.build_model(args, num_classes)
    if args.linear_probe:
        build.prepare_linear_probe(model)
    checkpoint.load_model_weights(ckpt, args.resume, model, args.model)
    build.place(model, args, run.device)
    amp_dtype, _ = recipe.build_amp(args, run.device)
    stats = engine.evaluate(val, model, run.device, amp_dtype, sharded, args.channels_last)
    utils.print_main(f"acc@1 {stats['acc1']:.2f} acc@5 {stats['acc5']:.2f} loss {stats['loss']:.4f} "
                     f"on {stats['n']} test images")  # n is summed over processes
    return stats


def knn_probe(run):
    """--knn_probe K: the k-NN accuracy of the initial model's features, printed and (with --output_dir) saved."""
    args = run.args
    train_set, test_set, classes = datasets.knn_sets(args)
    if run.dist.world_size > min(len(train_set), len(test_set)):  # a process with no image would have no features
        raise UserError(f'--knn_probe over {run.dist.world_size} processes needs at least as many images in each split '
                        f'({len(train_set)} training, {len(test_set)} test); run it in fewer processes')
    if args.knn_probe > len(train_set):
        utils.print_main(f'note: --knn_probe {args.knn_probe} is more than the {len(train_set)} training images: '
                         f'every one of them votes')
    if args.knn_features == 'pixels':
        model = build.PixelFeatures()
    else:
        model = build.place(build.initialize(build.build_model(args, classes), args), args, run.device)
        utils.broadcast_buffers(model, parameters=True)  # a random init is drawn from seed + rank: rank 0's for all
    batch_size = datasets.eval_plan(args, run.dist.world_size).batch_size
    loaders = [torch.utils.data.DataLoader(datasets.rank_share(d, run.dist.rank, run.dist.world_size),
                                           batch_size=batch_size, num_workers=args.num_workers,
                                           pin_memory=args.pin_mem and run.device.type == 'cuda')
               for d in (train_set, test_set)]
    amp_dtype, _ = recipe.build_amp(args, run.device)
    acc = engine.knn_accuracy(*loaders, model, run.device, k=args.knn_probe, amp_dtype=amp_dtype,
                              channels_last=args.channels_last)
    stats = {'knn_acc1': acc, 'k': args.knn_probe, 'n_train': len(train_set), 'n_test': len(test_set),
             'initialize': build.initialization_file(args.initialize, args.model), 'init': args.init,
             'features': args.knn_features}
    utils.print_main(f'k-NN (k={args.knn_probe}) acc@1 {acc:.2f} on {stats["n_test"]} test images, '
                     f'{stats["n_train"]} training images as neighbours')
    if args.output_dir and utils.is_main_process():
        os.makedirs(args.output_dir, exist_ok=True)
        utils.atomic_write(os.path.join(args.output_dir, 'knn_probe.json'),
                           lambda f: f.write(json.dumps(stats) + '\n'), binary=False)
    return stats


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    ckpt = config.eval_checkpoint(args, argv, get_args_parser) if args.eval and args.resume and not args.knn_probe \
        else None
    if args.check_data:
        datasets.check_images(args)
    run = setup(args)
    if args.knn_probe:
        result = knn_probe(run)
    elif args.eval:
        result = evaluate_only(run, ckpt)
    else:
        result = train(run)
    utils.close_distributed()  # after an error no: a rank may wait in a collective, and torchrun ends them all
    return result


if __name__ == '__main__':
    utils.run_cli(main)
