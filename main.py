"""Train a (small) timm model with the paper's recipe (Appendix A, ConvNeXt-style), from random init or
from a weight-selection file (--initialize). One GPU, many GPUs (torchrun), or the CPU:

    torchrun --nproc_per_node=8 main.py --config configs/vit_tiny_cifar100.yaml \
        --data_path data --initialize ws/vit_tiny_cifar100.pth --output_dir runs/vit_tiny_ws
    python main.py --config configs/vit_tiny_cifar100.yaml --data_path data --output_dir runs/x   # 1 GPU
"""
import json
import os
import sys
import time

import torch

import engine
import losses
import utils
from utils import UserError, str2bool

# Names of the official release that are not timm names (it registered them over timm's).
MODEL_ALIASES = {'vit_tiny': 'vit_tiny_patch16_224', 'vit_small': 'vit_small_patch16_224'}


def get_args_parser():
    p = utils.ArgumentParser('main.py', description=__doc__.split('\n\n')[0], add_help=True)
    a = p.add_argument
    a('--config', default=None, help='YAML file of flag values (flag names as keys); command-line flags override it')
    # run length and batch
    a('--batch_size', default=64, type=int, help='per-GPU (per-process) batch size')
    a('--global_batch_size', default=None, type=int,
      help='world_size x batch_size x update_freq; derives update_freq from the number of processes')
    a('--epochs', default=300, type=int)
    a('--update_freq', default=1, type=int, help='gradient accumulation steps')
    # model
    a('--model', default='convnext_tiny', type=str, help='timm model name or one registered in models/')
    a('--model_kwargs', default='', help='JSON keyword arguments for timm.create_model')
    a('--input_size', default=224, type=int, help='image size (passed as img_size to models that take it)')
    a('--drop_path', type=float, default=0.0, help='stochastic depth rate')
    a('--layer_scale_init_value', default=1e-6, type=float, help='ConvNeXt layer scale init')
    a('--head_init_scale', default=1.0, type=float, help='ConvNeXt classifier init scale')
    a('--model_ema', type=str2bool, default=False)
    a('--model_ema_decay', type=float, default=0.9999)
    a('--model_ema_force_cpu', type=str2bool, default=False)
    a('--model_ema_eval', type=str2bool, default=False, help='also evaluate the EMA model each epoch')
    # optimizer and schedule
    a('--opt', default='adamw', type=str)
    a('--opt_eps', default=1e-8, type=float)
    a('--opt_betas', default=None, type=float, nargs='+')
    a('--clip_grad', type=float, default=None, help='gradient norm clip (None: off)')
    a('--momentum', type=float, default=0.9, help='SGD momentum')
    a('--weight_decay', type=float, default=0.05)
    a('--weight_decay_end', type=float, default=None, help='cosine schedule of weight decay to this value')
    a('--lr', type=float, default=4e-3)
    a('--layer_decay', type=float, default=1.0, help='layer-wise lr decay (1.0: off)')
    a('--min_lr', type=float, default=1e-6)
    a('--warmup_epochs', type=int, default=20)
    a('--warmup_steps', type=int, default=-1, help='overrides warmup_epochs when > 0')
    # augmentation
    a('--color_jitter', type=float, default=0.4)
    a('--aa', type=str, default='rand-m9-mstd0.5-inc1', help='RandAugment policy (timm syntax); none to disable')
    a('--smoothing', type=float, default=0.1)
    a('--train_interpolation', type=str, default='bicubic')
    a('--crop_pct', type=float, default=None)
    a('--reprob', type=float, default=0.25)
    a('--remode', type=str, default='pixel')
    a('--recount', type=int, default=1)
    a('--resplit', type=str2bool, default=False)
    a('--mixup', type=float, default=0.8)
    a('--cutmix', type=float, default=1.0)
    a('--cutmix_minmax', type=float, nargs='+', default=None)
    a('--mixup_prob', type=float, default=1.0)
    a('--mixup_switch_prob', type=float, default=0.5)
    a('--mixup_mode', type=str, default='batch')
    # initialization
    a('--initialize', default=None, help='weight selection output (weight_selection.py), a state dict, or the '
                                         'folder of the official release holding vit.pth / convnext.pth')
    a('--init', default='timm', choices=('timm', 'xavier', 'kaiming', 'mimetic'),
      help='initialization of a model trained without --initialize (Tables 3, 12)')
    a('--linear_probe', type=str2bool, default=False,
      help='freeze the backbone, train BatchNorm (no affine) + a new linear classifier (MAE recipe, Table 9)')
    # knowledge distillation (Table 4)
    a('--distill', default='none', choices=('none', 'logit', 'feature'))
    a('--distill_teacher', default=None, help='timm name of the distillation teacher')
    a('--distill_teacher_checkpoint', default=None, help='its weights (default: timm pretrained from the hub)')
    a('--distill_teacher_kwargs', default='', help='JSON keyword arguments, e.g. {"dynamic_img_size": true}')
    a('--distill_alpha', type=float, default=1.0)
    a('--distill_tau', type=float, default=1.0, help='temperature of logit distillation')
    a('--model_key', default='model|module', type=str, help='keys under which --initialize may wrap the weights')
    a('--model_prefix', default='', type=str, help='prefix to strip from --initialize keys')
    # data
    a('--data_path', default=None, type=str)
    a('--nb_classes', default=1000, type=int, help='set from the dataset')
    a('--imagenet_default_mean_and_std', type=str2bool, default=True)
    a('--data_set', default='IMNET', type=str)
    a('--download', type=str2bool, default=False, help='let torchvision download the dataset into --data_path')
    a('--num_workers', default=10, type=int)
    a('--gpu_data', default='auto', choices=('auto', 'true', 'false'),
      help='hold the dataset on the device as uint8 and augment there (gpu_transforms.py); auto: on CUDA when '
           'both splits take at most half of the free GPU memory')
    a('--gpu_data_size', default=None, type=int,
      help='GPU data path: short side to which datasets of varied image sizes are resized once '
           '(default input_size / crop_pct, e.g. 256 for 224)')
    a('--pin_mem', type=str2bool, default=True)
    # output and run control
    a('--output_dir', default='', help='checkpoints, log.txt, config.yaml')
    a('--log_dir', default=None, help='TensorBoard folder')
    a('--device', default='cuda')
    a('--seed', default=0, type=int)
    a('--resume', default='')
    a('--auto_resume', type=str2bool, default=True)
    a('--save_ckpt', type=str2bool, default=True)
    a('--save_ckpt_freq', default=1, type=int)
    a('--save_ckpt_num', default=3, type=int, help='keep the last N epoch checkpoints (plus the best)')
    a('--save_every_steps', default=0, type=int,
      help='also checkpoint every N optimizer steps inside an epoch (mid-epoch resume; 0: off)')
    a('--deterministic', type=str2bool, default=False,
      help='deterministic kernels (torch.use_deterministic_algorithms); bit-exact resume on the CPU holds without it')
    a('--start_epoch', default=0, type=int)
    a('--eval', type=str2bool, default=False, help='only evaluate (with --resume CKPT)')
    a('--knn_probe', type=int, default=0, metavar='K',
      help='only measure the initial model (--initialize, --init) by a K-nearest-neighbour vote of its features: '
           'training images (eval transform) as neighbours, accuracy on the test split; no training')
    a('--dist_eval', type=str2bool, default=True, help='shard evaluation over processes')
    a('--disable_eval', type=str2bool, default=False)
    a('--print_freq', default=50, type=int)
    a('--use_amp', type=str2bool, default=False, help='mixed precision: bf16 where supported, else fp16 + GradScaler')
    a('--compile', type=str2bool, default=False, help='torch.compile the model')
    a('--channels_last', type=str2bool, default=False)
    # distributed
    a('--world_size', default=1, type=int)
    a('--local_rank', '--local-rank', default=-1, type=int, help='set by torch.distributed.launch')
    a('--dist_url', default='env://')
    return p


def parse_args(argv=None):
    """Flags < YAML config < command line; unknown YAML keys are an error naming the closest flags."""
    parser = get_args_parser()
    config_path = _find_config(argv if argv is not None else sys.argv[1:])
    if config_path:
        parser.set_defaults(**load_config(config_path, parser))
    return parser.parse_args(argv)


def _find_config(argv):
    for i, arg in enumerate(argv):
        if arg == '--config' and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith('--config='):
            return arg.split('=', 1)[1]
    return None


def load_config(path, parser):
    import difflib
    import yaml
    if not os.path.isfile(path):
        raise UserError(f'--config {path}: file not found')
    with open(path) as f:
        try:
            values = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise UserError(f'--config {path} is not valid YAML: {str(e).splitlines()[0]}') from None
    if not isinstance(values, dict):
        raise UserError(f'--config {path} must map flag names to values')
    valid = {action.dest for action in parser._actions}
    for key in values:
        if key not in valid:
            close = difflib.get_close_matches(key, sorted(valid), n=3)
            raise UserError(f"--config {path}: unknown key '{key}'" + (f"; did you mean {', '.join(close)}?" if close else ''))
    return values


def resolve_batch(args):
    """The effective (global) batch: world_size x batch_size x update_freq."""
    if args.global_batch_size:
        per_step = args.world_size * args.batch_size
        if args.global_batch_size % per_step:
            raise UserError(f'--global_batch_size {args.global_batch_size} is not a multiple of world_size x '
                            f'batch_size = {args.world_size} x {args.batch_size}; change --batch_size')
        args.update_freq = args.global_batch_size // per_step
    return args.world_size * args.batch_size * args.update_freq


def build_model(args):
    import timm
    import weight_selection  # noqa: F401 - registers models/ as a side effect of its import of models
    import models  # noqa: F401
    name = MODEL_ALIASES.get(args.model, args.model)
    if name != args.model:
        utils.print_main(f'model {args.model} is the official release name of timm {name}')
    weight_selection.check_model_name(name, '--model')
    kwargs = {'num_classes': args.nb_classes, 'drop_path_rate': args.drop_path,
              **utils.parse_json_dict(args.model_kwargs, '--model_kwargs')}
    if 'convnext' in name:
        kwargs.setdefault('ls_init_value', args.layer_scale_init_value)
        kwargs.setdefault('head_init_scale', args.head_init_scale)
    try:
        return timm.create_model(name, pretrained=False, **{'img_size': args.input_size, **kwargs})
    except TypeError as e:
        if 'img_size' not in str(e):
            raise UserError(f'--model {name}: {e}; check --model_kwargs') from None
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        raise UserError(f'--model {name}: {e}; check --model_kwargs') from None


def load_initialization(model, path, args):
    """Load a weight-selection file (or any state dict) into the model. Classifier tensors of another
    shape are left at their init; any other missing, unexpected or mismatched key is an error."""
    import weight_selection
    if os.path.isdir(path):  # the official README passes the folder weight_selection.py wrote into
        family = 'vit' if 'vit' in args.model else 'convnext'
        path = os.path.join(path, f'{family}.pth')
    obj = utils.torch_load(path)
    if isinstance(obj, dict):
        for key in args.model_key.split('|'):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    state = utils.unwrap_state_dict(obj, path)
    if args.model_prefix:
        state = {k[len(args.model_prefix):] if k.startswith(args.model_prefix) else k: v for k, v in state.items()}
    own = model.state_dict()
    layout = weight_selection.layout_of(model)
    dropped, fitted = [], {}
    for k, v in state.items():
        if k in own and v.shape != own[k].shape:
            if weight_selection.is_classifier(k, layout):
                dropped.append(k)
                continue
            v = weight_selection.linear_as_conv(v, own[k].shape)  # Linear <-> 1x1 conv MLP
        fitted[k] = v
    missing = [k for k in own if k not in fitted and k not in dropped]
    unexpected = [k for k in fitted if k not in own]
    wrong = [f'{k} {tuple(v.shape)} vs {tuple(own[k].shape)}' for k, v in fitted.items()
             if k in own and v.shape != own[k].shape]
    if missing or unexpected or wrong:
        raise UserError(f'--initialize {path} does not fit --model {args.model}: '
                        f'{utils.describe_mismatch(missing, unexpected, wrong)}')
    model.load_state_dict(fitted, strict=False)
    utils.print_main(f'initialized {len(fitted)} tensors from {path}'
                     + (f'; kept the model\'s own {", ".join(dropped)} (other number of classes)' if dropped else ''))
    return path


def prepare_linear_probe(model):
    """MAE's linear probe: a frozen backbone, then BatchNorm without affine parameters and a new linear
    classifier (trunc-normal std 0.01), the only trained parameters."""
    import weight_selection
    from timm.layers import trunc_normal_
    path = weight_selection.layout_of(model).classifier[0]
    head = model.get_submodule(path)
    probe = torch.nn.Sequential(torch.nn.BatchNorm1d(head.in_features, affine=False, eps=1e-6),
                                torch.nn.Linear(head.in_features, head.out_features))
    trunc_normal_(probe[1].weight, std=0.01)
    torch.nn.init.zeros_(probe[1].bias)
    for p in model.parameters():
        p.requires_grad = False
    parent, _, name = path.rpartition('.')
    setattr(model.get_submodule(parent) if parent else model, name, probe)
    return model


def build_distill_teacher(args, device):
    """The frozen teacher of --distill (any timm name; hub weights or --distill_teacher_checkpoint)."""
    if args.distill == 'none':
        return None
    import weight_selection
    if not args.distill_teacher:
        raise UserError(f'--distill {args.distill} needs --distill_teacher NAME')
    kwargs = utils.parse_json_dict(args.distill_teacher_kwargs, '--distill_teacher_kwargs')
    state, layout = weight_selection.load_teacher(args.distill_teacher, args.distill_teacher_checkpoint, kwargs)
    head = [v for k, v in state.items() if weight_selection.is_classifier(k, layout) and k.endswith('weight')]
    kwargs.setdefault('num_classes', head[0].shape[0] if head else 0)  # the checkpoint's classes, or none
    teacher = weight_selection.create_model(args.distill_teacher, '--distill_teacher', **kwargs)
    teacher.load_state_dict(state)
    if args.distill == 'logit' and teacher.num_classes != args.nb_classes:
        raise UserError(f'--distill logit needs a teacher with the dataset\'s {args.nb_classes} classes; '
                        f'{args.distill_teacher} has {teacher.num_classes} (use --distill feature)')
    for p in teacher.parameters():
        p.requires_grad = False
    utils.print_main(f'distillation ({args.distill}, alpha {args.distill_alpha}) from {args.distill_teacher}')
    return teacher.eval().to(device)


def build_loaders(args, device):
    import datasets
    use_gpu = args.gpu_data == 'true'
    if use_gpu and device.type == 'cuda' and not datasets.gpu_data_fits(args, device):
        raise UserError(f'--gpu_data true: {args.data_set} does not fit in half of the free GPU memory; pass '
                        f'--gpu_data false (or a smaller --gpu_data_size)')
    if args.gpu_data == 'auto' and datasets.gpu_data_fits(args, device):
        try:
            datasets.gpu_train_transform(args)
            use_gpu = True
        except ValueError as e:
            utils.print_main(f'--gpu_data auto: using the CPU loader ({e})')
    if use_gpu:
        train_loader, val_loader, how = datasets.build_gpu_loaders(args, device)
        if len(train_loader) == 0:
            raise UserError(f'{len(train_loader.dataset)} training images are fewer than one global step of '
                            f'{args.batch_size * args.world_size}; lower --batch_size')
        utils.print_main(how)
        return train_loader, val_loader
    train_set, args.nb_classes = datasets.build_dataset(True, args)
    val_set = None if args.disable_eval and not args.eval else datasets.build_dataset(False, args)[0]
    if len(train_set) < args.batch_size * args.world_size:
        raise UserError(f'{len(train_set)} training images are fewer than one global step of '
                        f'{args.batch_size * args.world_size}; lower --batch_size')
    # One code path for 1 and N processes: a seeded shuffle per epoch, each sample's augmentation
    # seeded by (seed, epoch, index), so that a resumed run sees exactly the same batches.
    train_set = datasets.PerSampleSeed(train_set, args.seed)
    sampler = datasets.EpochSampler(train_set, num_replicas=args.world_size, rank=args.rank, seed=args.seed)
    common = dict(num_workers=args.num_workers, pin_memory=args.pin_mem and args.device.startswith('cuda'),
                  persistent_workers=args.num_workers > 0)
    train_loader = torch.utils.data.DataLoader(train_set, sampler=sampler, batch_size=args.batch_size,
                                               drop_last=True, generator=torch.Generator().manual_seed(args.seed),
                                               **common)
    val_loader = None
    if val_set is not None:
        sharded = args.dist_eval and args.world_size > 1
        if sharded:  # an exact shard per process (no padding duplicates)
            val_set = torch.utils.data.Subset(val_set, range(args.rank, len(val_set), args.world_size))
        val_loader = torch.utils.data.DataLoader(val_set, batch_size=max(args.batch_size, 64), shuffle=False, **common)
        val_loader.sharded = sharded
    return train_loader, val_loader


def main(argv=None):
    args = parse_args(argv)
    utils.init_distributed(args)
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        utils.print_main('no CUDA device: running on the CPU (pass --device cpu to silence this)')
        args.device = 'cpu'
    device = torch.device(args.device, args.gpu) if args.device == 'cuda' else torch.device(args.device)
    if args.eval and not args.resume:
        raise UserError('--eval true needs --resume CHECKPOINT')
    if args.knn_probe < 0:
        raise UserError(f'--knn_probe {args.knn_probe}: pass the number of neighbours, e.g. --knn_probe 20')
    global_batch = resolve_batch(args)
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        utils.remove_stale_temporaries(args.output_dir)
    utils.seed_everything(args.seed + args.rank)  # torch, numpy (timm's Mixup) and random
    if args.deterministic:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True

    if args.knn_probe:
        knn_sets = build_knn_sets(args)  # sets args.nb_classes
    else:
        train_loader, val_loader = build_loaders(args, device)
    model = build_model(args)
    if args.init != 'timm':
        if args.initialize:
            raise UserError(f'--init {args.init} and --initialize both set the initial weights; choose one')
        from models.initializers import apply_init
        apply_init(model, args.init)
    if args.initialize:
        args.initialize = load_initialization(model, args.initialize, args)
    if args.linear_probe:
        prepare_linear_probe(model)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.knn_probe:
        return knn_probe(args, model, device, knn_sets)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    teacher = build_distill_teacher(args, device)
    trainable = model  # what the optimizer updates: the model, with feature distillation also its projector
    if args.distill == 'feature':
        trainable = losses.FeatureDistillStudent(model, teacher.num_features).to(device)

    steps_per_epoch = len(train_loader) // args.update_freq
    utils.print_main(f'model {args.model}: {n_parameters / 1e6:.2f}M parameters; {len(train_loader.dataset)} '
                     f'training images, {args.nb_classes} classes')
    utils.print_main(f'global batch = world_size {args.world_size} x batch_size {args.batch_size} x update_freq '
                     f'{args.update_freq} = {global_batch}; {steps_per_epoch} optimizer steps per epoch')

    mixup_fn, criterion = build_criterion(args, teacher)
    model_ema = None
    if args.model_ema:
        from timm.utils import ModelEmaV3
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay, device='cpu' if args.model_ema_force_cpu else None)
    optimizer = build_optimizer(trainable, args, device)
    lr_scheduler, wd_schedule = build_schedules(optimizer, args, steps_per_epoch)

    amp_dtype, scaler = build_amp(args, device)

    model_without_ddp = model
    if args.distributed:
        trainable = torch.nn.parallel.DistributedDataParallel(
            trainable, device_ids=[args.gpu] if device.type == 'cuda' else None)
        if args.distill != 'feature':
            model = trainable
    train_model = torch.compile(trainable) if args.compile else trainable
    projector = utils.unwrap_model(trainable).projector if args.distill == 'feature' else None

    best, partial = resume(args, model_without_ddp, optimizer, scaler, model_ema, projector)
    if args.eval:
        stats = engine.evaluate(val_loader, model, device, amp_dtype)
        utils.print_main(f"acc@1 {stats['acc1']:.2f} acc@5 {stats['acc5']:.2f} loss {stats['loss']:.4f} "
                         f"on {stats['n']} test images")  # n is summed over processes
        return stats

    log_writer = None
    if args.log_dir and utils.is_main_process():
        from torch.utils.tensorboard import SummaryWriter
        os.makedirs(args.log_dir, exist_ok=True)
        log_writer = SummaryWriter(log_dir=args.log_dir)
    if args.output_dir and utils.is_main_process():
        save_config(args)

    utils.print_main(f'training epochs {args.start_epoch}..{args.epochs - 1}')
    stats = {}
    for epoch in range(args.start_epoch, args.epochs):
        epoch_start = time.time()
        done = partial['step_in_epoch'] if partial and epoch == args.start_epoch else 0
        train_loader.sampler.set_epoch(epoch, skip=done * args.update_freq * args.batch_size)

        def on_step(step, get_partial, epoch=epoch):
            k = step - epoch * steps_per_epoch  # optimizer steps of this epoch done
            if args.output_dir and args.save_ckpt and args.save_every_steps and k % args.save_every_steps == 0 \
                    and k < steps_per_epoch:
                state = get_partial()
                if not torch.isfinite(state['loss_sum']):
                    raise engine.NonFiniteLoss(f'non-finite loss before optimizer step {step} of epoch {epoch}; '
                                               f'stopped, the last good checkpoint is kept')
                ckpt = checkpoint_state(args, epoch, model_without_ddp, optimizer, scaler, model_ema, best,
                                        projector)
                ckpt.update(step_in_epoch=k, partial=state)
                utils.save_checkpoint(args.output_dir, f'checkpoint-{epoch}-step{k}.pth', ckpt,
                                      keep_last=args.save_ckpt_num)

        train_stats = engine.train_one_epoch(
            train_model, criterion, train_loader, optimizer, device, epoch, lr_scheduler,
            update_freq=args.update_freq, amp_dtype=amp_dtype, scaler=scaler, clip_grad=args.clip_grad,
            mixup_fn=mixup_fn, model_ema=model_ema, wd_schedule=wd_schedule, log_writer=log_writer,
            print_freq=args.print_freq, start_step=epoch * steps_per_epoch + done,
            partial=partial['partial'] if done else None, on_step=on_step)
        record = {'epoch': epoch, 'train_loss': train_stats['loss'], 'train_lr': train_stats['lr'],
                  'images_per_sec': round(train_stats['images_per_sec'], 1)}
        if val_loader is not None:
            test = engine.evaluate(val_loader, model, device, amp_dtype)
            record.update(test_loss=test['loss'], test_acc1=test['acc1'], test_acc5=test['acc5'])
            if model_ema is not None and args.model_ema_eval:
                test_ema = engine.evaluate(val_loader, model_ema.module, device, amp_dtype)
                record.update(test_acc1_ema=test_ema['acc1'], test_acc5_ema=test_ema['acc5'])
        record.update(epoch_seconds=round(time.time() - epoch_start, 2), n_parameters=n_parameters)
        # The log line goes first: a kill before the checkpoint redoes the epoch, and resume drops the line.
        utils.append_log(args.output_dir, record)
        best = save_epoch(args, epoch, record, best, model_without_ddp, optimizer, scaler, model_ema, projector)
        if log_writer is not None:
            for k in ('test_acc1', 'test_acc5', 'test_loss', 'train_loss'):
                if k in record:
                    log_writer.add_scalar(f'epoch/{k}', record[k], epoch)
            log_writer.flush()
        utils.print_main(json.dumps(record))
        stats = record
    return stats


def build_knn_sets(args):
    """(training split, test split) for --knn_probe, both with the evaluation transform."""
    import datasets
    train_set, args.nb_classes = datasets.build_dataset(True, args)
    datasets.set_transform(train_set, datasets.build_transform(False, args))
    return train_set, datasets.build_dataset(False, args)[0]


def knn_probe(args, model, device, knn_sets):
    """--knn_probe K: the k-NN accuracy of the model's features, printed and (with --output_dir) saved."""
    loaders = [torch.utils.data.DataLoader(d, batch_size=max(args.batch_size, 64), num_workers=args.num_workers)
               for d in knn_sets]
    amp_dtype, _ = build_amp(args, device)
    acc = engine.knn_accuracy(*loaders, model, device, k=args.knn_probe, amp_dtype=amp_dtype)
    stats = {'knn_acc1': acc, 'k': args.knn_probe, 'n_train': len(knn_sets[0]), 'n_test': len(knn_sets[1]),
             'initialize': args.initialize, 'init': args.init}
    utils.print_main(f'k-NN (k={args.knn_probe}) acc@1 {acc:.2f} on {stats["n_test"]} test images, '
                     f'{stats["n_train"]} training images as neighbours')
    if args.output_dir and utils.is_main_process():
        utils.atomic_write(os.path.join(args.output_dir, 'knn_probe.json'),
                           lambda f: f.write(json.dumps(stats) + '\n'), binary=False)
    return stats


def build_criterion(args, teacher=None):
    """(timm Mixup or None, the training loss): mixup/cutmix with label smoothing in soft targets, else
    label-smoothing cross-entropy; distillation terms on top (losses.TrainingLoss)."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=args.nb_classes)
        criterion = SoftTargetCrossEntropy()
    elif args.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()
    return mixup_fn, losses.TrainingLoss(criterion, args.distill, teacher, args.distill_alpha, args.distill_tau)


def build_optimizer(trainable, args, device):
    """AdamW (fused on CUDA) without weight decay on norms, biases, layer scales (1-D) and the model's
    no_weight_decay() set (pos_embed, cls_token); layer-wise lr decay through timm's group matchers."""
    from timm.optim import create_optimizer_v2
    opt_kwargs = {'eps': args.opt_eps} if args.opt_eps is not None else {}
    if args.opt_betas:
        opt_kwargs['betas'] = tuple(args.opt_betas)
    if args.opt in ('sgd', 'momentum'):
        opt_kwargs['momentum'] = args.momentum
    if args.opt == 'adamw' and device.type == 'cuda':
        opt_kwargs['fused'] = True
    return create_optimizer_v2(trainable, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                               layer_decay=args.layer_decay if args.layer_decay < 1.0 else None, **opt_kwargs)


def build_amp(args, device):
    """(autocast dtype or None, GradScaler or None): bf16 where supported, else fp16 with a scaler."""
    if not (args.use_amp and device.type == 'cuda'):
        return None, None
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, None
    return torch.float16, torch.amp.GradScaler('cuda')


def build_schedules(optimizer, args, steps_per_epoch):
    """Per optimizer step: linear warmup from 0 to lr, then cosine to min_lr (timm's scheduler, stepped
    with step_update); optionally a cosine weight-decay schedule to weight_decay_end."""
    import math
    from timm.scheduler import CosineLRScheduler
    total_steps = args.epochs * steps_per_epoch
    warmup = args.warmup_steps if args.warmup_steps > 0 else args.warmup_epochs * steps_per_epoch
    warmup = min(warmup, total_steps)
    lr_scheduler = CosineLRScheduler(optimizer, t_initial=max(total_steps - warmup, 1), lr_min=args.min_lr,
                                     warmup_t=warmup, warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)
    wd_schedule = None
    if args.weight_decay_end is not None:
        wd_schedule = [args.weight_decay_end + 0.5 * (args.weight_decay - args.weight_decay_end)
                       * (1 + math.cos(math.pi * i / max(total_steps, 1))) for i in range(total_steps)]
    return lr_scheduler, wd_schedule


def checkpoint_state(args, epoch, model, optimizer, scaler, model_ema, best, projector=None):
    state = {'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'epoch': epoch,
             'args': vars(args), 'best': best, 'rng': utils.rng_state(), 'model_name': args.model}
    if scaler is not None:
        state['scaler'] = scaler.state_dict()
    if model_ema is not None:
        state['model_ema'] = model_ema.module.state_dict()
    if projector is not None:
        state['projector'] = projector.state_dict()
    return state


def save_epoch(args, epoch, record, best, model, optimizer, scaler, model_ema, projector=None):
    """Checkpoints after an epoch: the last K epochs, plus the best (and best EMA) by test acc@1."""
    if not (args.output_dir and args.save_ckpt):
        return best
    acc = record.get('test_acc1')
    improved = acc is not None and acc > best.get('acc1', -1.0)
    if improved:
        best = {'acc1': acc, 'epoch': epoch}
    last = epoch + 1 == args.epochs
    if (epoch + 1) % args.save_ckpt_freq == 0 or last:
        state = checkpoint_state(args, epoch, model, optimizer, scaler, model_ema, best, projector)
        utils.save_checkpoint(args.output_dir, f'checkpoint-{epoch}.pth', state, keep_last=args.save_ckpt_num)
    if improved:
        utils.save_checkpoint(args.output_dir, 'checkpoint-best.pth',
                              {'model': model.state_dict(), 'epoch': epoch, 'acc1': acc, 'model_name': args.model})
    ema_acc = record.get('test_acc1_ema')
    if ema_acc is not None and ema_acc > best.get('ema_acc1', -1.0):
        best['ema_acc1'] = ema_acc
        utils.save_checkpoint(args.output_dir, 'checkpoint-best-ema.pth',
                              {'model': model_ema.module.state_dict(), 'epoch': epoch, 'acc1': ema_acc,
                               'model_name': args.model})
    return best


def resume(args, model, optimizer, scaler, model_ema, projector=None):
    """Load --resume, or with --auto_resume the newest readable checkpoint in output_dir (it takes
    precedence over --initialize; an unreadable newest one is skipped with a warning). Returns the
    best-so-far record and, for a checkpoint taken inside an epoch, its partial state."""
    ckpt, path = None, args.resume
    if args.auto_resume and not args.eval and args.output_dir:
        for candidate in reversed(utils.list_checkpoints(args.output_dir)):
            try:
                ckpt, path = utils.torch_load(candidate), candidate
                break
            except UserError as e:
                utils.print_main(f'warning: skipping unreadable checkpoint ({e}); trying the previous one')
        if ckpt is not None:
            utils.print_main(f'auto-resume from {path}' + (' (it takes precedence over --initialize)'
                                                            if args.initialize else ''))
        elif args.resume:
            ckpt = utils.torch_load(args.resume)
    elif path:
        ckpt = utils.torch_load(path)
    if ckpt is None:
        return {}, None
    if not isinstance(ckpt, dict) or 'model' not in ckpt:
        raise UserError(f'--resume {path} is not a checkpoint of main.py (no "model" entry)')
    own, theirs = model.state_dict(), ckpt['model']
    mismatch = [k for k in own if k not in theirs or theirs[k].shape != own[k].shape]
    if mismatch or len(theirs) != len(own):
        raise UserError(f"--resume {path} holds a checkpoint of {ckpt.get('model_name', 'another model')}, "
                        f'not of --model {args.model} (first differing key: {(mismatch or list(theirs))[0]})')
    model.load_state_dict(theirs)
    if args.eval or 'optimizer' not in ckpt:
        return {}, None
    optimizer.load_state_dict(ckpt['optimizer'])
    if scaler is not None and 'scaler' in ckpt:
        scaler.load_state_dict(ckpt['scaler'])
    if model_ema is not None and 'model_ema' in ckpt:
        model_ema.module.load_state_dict(ckpt['model_ema'])
    if projector is not None and 'projector' in ckpt:
        projector.load_state_dict(ckpt['projector'])
    if 'rng' in ckpt:
        utils.set_rng_state(ckpt['rng'])
    partial = None
    if 'step_in_epoch' in ckpt:  # taken inside an epoch: finish that epoch
        args.start_epoch = ckpt['epoch']
        partial = {'step_in_epoch': ckpt['step_in_epoch'], 'partial': ckpt['partial']}
    else:
        args.start_epoch = ckpt['epoch'] + 1
    utils.truncate_log(args.output_dir, args.start_epoch)
    where = f", step {partial['step_in_epoch']} of the epoch" if partial else ''
    utils.print_main(f'resumed from {path}: continuing at epoch {args.start_epoch}{where}')
    return ckpt.get('best', {}), partial


def save_config(args):
    import yaml
    import timm
    skip = {'rank', 'gpu', 'distributed', 'config'}
    values = {k: v for k, v in vars(args).items() if k not in skip}
    with open(os.path.join(args.output_dir, 'config.yaml'), 'w') as f:  # reusable as --config
        yaml.safe_dump(values, f, sort_keys=True)
    info = {'code_version': utils.code_version(), 'torch': torch.__version__, 'timm': timm.__version__,
            'command': sys.argv, 'device': torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}
    with open(os.path.join(args.output_dir, 'run_info.json'), 'w') as f:
        json.dump(info, f, indent=1)

if __name__ == '__main__':
    utils.run_cli(main)
