"""The paper's training recipe (Appendix A) in one place, and the builders that turn it into objects.

RECIPE is Table 13 (ConvNeXt's recipe); Tables 14 and 15 give, per dataset, the global batch, warmup and
epochs (and ConvNeXt-F's drop path); VARIANTS are the recipes of Table 9 (linear probe) and Table 11
(longer training). configs/*.yaml are generated from these tables:

    python recipe.py --write_configs       # tests/test_recipe.py checks that the files match
"""
import math
import os
import sys

# Table 13, as main.py flags.
RECIPE = {
    'opt': 'adamw',                       # betas (0.9, 0.999): timm's default
    'weight_decay': 0.05,
    'min_lr': 1.0e-6,                     # cosine decay to this lr, per optimizer step
    'layer_scale_init_value': 1.0e-6,     # ConvNeXt; ViT-T has no layer scale
    'aa': 'rand-m9-mstd0.5-inc1',         # RandAugment (9, 0.5)
    'mixup': 0.8,
    'cutmix': 1.0,
    'reprob': 0.25,                       # random erasing
    'smoothing': 0.1,                     # label smoothing
    'input_size': 224,
    'use_amp': True,
}
# "Base learning rates for ConvNeXt-F and ViT-T are 4e-3 and 2e-3" (Appendix A); on ImageNet-1K the
# official commands use 4e-3 for ViT-T too.
BASE_LR = {'vit_tiny': 2e-3, 'convnext_femto': 4e-3}
IMAGENET_LR = 4e-3

# The paper's students and their default teachers: the one place that names them.
STUDENTS = {'vit_tiny': 'vit_tiny_patch16_224', 'convnext_femto': 'convnext_femto_linear'}
TEACHERS = {'vit_tiny': 'vit_small_patch16_224.augreg_in21k', 'convnext_femto': 'convnext_tiny.fb_in22k'}

# Dataset folder names of the scripts -> --data_set.
DATA_SETS = {'cifar10': 'CIFAR10', 'cifar100': 'CIFAR100', 'pets': 'pets', 'flowers': 'flowers',
             'stl10': 'stl10', 'food101': 'food101', 'dtd': 'dtd', 'svhn': 'svhn', 'eurosat': 'eurosat',
             'imagenet': 'IMNET'}
# Tables 14 (ConvNeXt-F) and 15 (ViT-T): (global batch, warmup epochs, epochs, drop path).
# Table 15 gives ViT-T no drop path; the official ViT-T command uses none.
TABLE_14 = {'cifar10': (1024, 50, 300, 0.1), 'cifar100': (1024, 50, 300, 0.1), 'pets': (128, 100, 600, 0.1),
            'flowers': (128, 100, 600, 0.1), 'stl10': (128, 50, 300, 0.0), 'food101': (1024, 50, 300, 0.1),
            'dtd': (128, 100, 600, 0.2), 'svhn': (1024, 10, 50, 0.1), 'eurosat': (512, 50, 300, 0.1),
            'imagenet': (4096, 50, 300, 0.0)}
TABLE_15 = {d: (4096 if d == 'imagenet' else 512, warmup, epochs, 0.0)
            for d, (_, warmup, epochs, _) in TABLE_14.items()}
PER_DATASET = {'convnext_femto': TABLE_14, 'vit_tiny': TABLE_15}

# Table 11's longer ImageNet training, and Table 9's linear probe (MAE's recipe: frozen backbone, BatchNorm
# without affine + linear classifier, LARS, lr 0.1 x batch / 256, no weight decay, 90 epochs of which 10 of
# warmup, random resized crop and flip only).
LONGER = {'epochs': 600, 'mixup': 0.3, 'cutmix': 0.3}
LINEAR_PROBE = {'linear_probe': True, 'global_batch_size': 4096, 'batch_size': 512, 'opt': 'lars', 'lr': 1.6,
                'min_lr': 0.0, 'weight_decay': 0.0, 'epochs': 90, 'warmup_epochs': 10, 'drop_path': 0.0,
                'aa': 'none', 'color_jitter': 0.0, 'reprob': 0.0, 'mixup': 0.0, 'cutmix': 0.0, 'smoothing': 0.0,
                'use_amp': True}


def per_gpu_batch(global_batch):
    """The configs' per-process batch: 8 processes (one node of 8 GPUs), at most 128 images each."""
    return min(global_batch // 8, 128)


def config(model, dataset, variant=None):
    """The main.py flags of one run of the paper: Table 13 with Table 14/15's row, then a variant's changes."""
    batch, warmup, epochs, drop_path = PER_DATASET[model][dataset]
    values = {'model': STUDENTS[model], 'data_set': DATA_SETS[dataset], 'global_batch_size': batch,
              'batch_size': per_gpu_batch(batch), 'epochs': epochs, 'warmup_epochs': warmup,
              'drop_path': drop_path, 'lr': IMAGENET_LR if dataset == 'imagenet' else BASE_LR[model], **RECIPE}
    if variant == '600ep':
        values.update(LONGER)
    elif variant == 'linear_probe':
        values = {'model': values['model'], 'data_set': values['data_set'], 'input_size': 224, **LINEAR_PROBE}
    elif variant is not None:
        raise ValueError(variant)
    return values


def config_files():
    """{file name: (flags, first comment line)} of every config in configs/."""
    files = {}
    for model in STUDENTS:
        table = 'Table 14' if model == 'convnext_femto' else 'Table 15'
        for dataset in DATA_SETS:
            files[f'{model}_{dataset}.yaml'] = (config(model, dataset), f"{model} on {dataset}: the paper's "
                                                f"recipe (Table 13) with {table}'s batch, warmup and epochs.")
        files[f'{model}_imagenet_600ep.yaml'] = (config(model, 'imagenet', '600ep'), f'{model} on imagenet, '
                                                 'the longer recipe of Table 11 (600 epochs, mixup and cutmix 0.3).')
        files[f'linear_probe_{model}_cifar100.yaml'] = (config(model, 'cifar100', 'linear_probe'),
                                                        f'{model}: linear probing of a raw initialization '
                                                        "on cifar100 (Table 9), MAE's linear-probe recipe.")
    return files


def render_config(name, values, about):
    import yaml
    header = (f'# {about}\n# Generated by `python recipe.py --write_configs` from recipe.py; edit that, not this.\n'
              f'# Launch: torchrun --nproc_per_node=N main.py --config configs/{name} --data_path DATA --output_dir OUT\n'
              '# global_batch_size is kept for any number of GPUs: update_freq = global / (GPUs x batch_size).\n')
    return header + yaml.safe_dump(values, sort_keys=False)


def write_configs(folder):
    for name, (values, about) in config_files().items():
        with open(os.path.join(folder, name), 'w') as f:
            f.write(render_config(name, values, about))


# ----------------------------------------------------------------------------------------------
# Builders: loss, optimizer, mixed precision, per-step schedules. (torch is imported inside them, so that
# the scripts can read the tables above without it.)

def learning_rate(args, global_batch):
    """--lr, or with --blr DeiT's linear scaling rule: blr per 512 images of global batch (MAE's is per 256)."""
    return args.blr * global_batch / 512 if args.blr is not None else args.lr


def mixes_batches(args):
    """Mixup or cutmix is on (timm's Mixup then mixes each batch with itself reversed)."""
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def build_criterion(args, num_classes, teacher=None):
    """(timm Mixup or None, the training loss): mixup/cutmix with label smoothing in soft targets, else
    label-smoothing cross-entropy; distillation terms on top (losses.TrainingLoss), the teacher seeing the
    batch in its own normalization."""
    import torch
    from timm.data import Mixup
    import losses
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    mixup_fn = None
    if mixes_batches(args):
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=num_classes)
        criterion = SoftTargetCrossEntropy()
    elif args.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()
    teacher_input = None
    if teacher is not None:
        import datasets
        cfg, (mean, std) = teacher.pretrained_cfg or {}, datasets.mean_std(args)
        teacher_input = losses.Renormalize((mean, std), (cfg.get('mean', mean), cfg.get('std', std)))
        teacher_input.to(next(teacher.parameters()).device)
    return mixup_fn, losses.TrainingLoss(criterion, args.distill, teacher, args.distill_alpha, args.distill_tau,
                                         teacher_input)


def check_optimizer_name(name):
    """--opt: lars, or a name timm's create_optimizer_v2 knows (it reads the part after the last '_': lookahead_adamw
    is AdamW with lookahead)."""
    from timm.optim import list_optimizers
    from utils import UserError
    if name != 'lars' and name.lower().split('_')[-1] not in list_optimizers():
        raise UserError(f"--opt {name}: not an optimizer timm knows (e.g. adamw, sgd, lamb; lars for the linear "
                        f"probe); timm.optim.list_optimizers() lists them")


def build_optimizer(trainable, args, device, lr):
    """AdamW (fused on CUDA) without weight decay on norms, biases, layer scales (1-D) and the model's
    no_weight_decay() set (pos_embed, cls_token); layer-wise lr decay through timm's group matchers.
    --opt lars is MAE's LARS (lars.py): the linear probe's optimizer, trust ratio also at weight decay 0."""
    from timm.optim import create_optimizer_v2
    if args.opt == 'lars':
        from lars import create_lars
        return create_lars(trainable, lr, args.weight_decay, args.momentum)
    opt_kwargs = {'eps': args.opt_eps} if args.opt_eps is not None else {}
    if args.opt_betas:
        opt_kwargs['betas'] = tuple(args.opt_betas)
    if args.opt in ('sgd', 'momentum'):
        opt_kwargs['momentum'] = args.momentum
    if args.opt == 'adamw' and device.type == 'cuda':
        opt_kwargs['fused'] = True
    return create_optimizer_v2(trainable, opt=args.opt, lr=lr, weight_decay=args.weight_decay,
                               layer_decay=args.layer_decay if args.layer_decay < 1.0 else None, **opt_kwargs)


def build_amp(args, device):
    """(autocast dtype or None, GradScaler or None): bf16 where supported, else fp16 with a scaler."""
    import torch
    if not (args.use_amp and device.type == 'cuda'):
        return None, None
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, None
    return torch.float16, torch.amp.GradScaler('cuda')


def cosine_schedule(step, base, final, total, warmup=0):
    """The value at optimizer step `step`: linear warmup from 0 to `base` over `warmup` steps, then a half
    cosine from `base` to `final` over the remaining steps, `final` after them (timm's CosineLRScheduler
    with warmup_prefix, stepped per update, to the last bit)."""
    if step < warmup:
        return 0.0 + step * (base / warmup)
    t, n = step - warmup, max(total - warmup, 1)
    if t >= n:
        return final
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * t / n))


class StepSchedule:
    """Sets each parameter group's lr (times its layer-decay `lr_scale`) and, with --weight_decay_end, the
    weight decay of decayed groups, for an optimizer step: one mechanism for both."""

    def __init__(self, args, lr, total_steps, warmup_steps):
        self.lr, self.min_lr, self.total, self.warmup = lr, args.min_lr, total_steps, warmup_steps
        self.wd, self.wd_end = args.weight_decay, args.weight_decay_end

    def settings(self):
        """What the schedule is made of, as plain values (a checkpoint keeps them: a resumed run compares)."""
        return {'lr': self.lr, 'min_lr': self.min_lr, 'total_steps': self.total, 'warmup_steps': self.warmup,
                'weight_decay': self.wd, 'weight_decay_end': self.wd_end}

    def __call__(self, optimizer, step):
        lr = cosine_schedule(step, self.lr, self.min_lr, self.total, self.warmup)
        wd = None if self.wd_end is None else cosine_schedule(step, self.wd, self.wd_end, self.total)
        for group in optimizer.param_groups:
            group['lr'] = lr * group['lr_scale'] if 'lr_scale' in group else lr
            if wd is not None and group['weight_decay'] > 0:
                group['weight_decay'] = wd
        return lr


def build_schedule(args, lr, steps_per_epoch, epochs):
    """Warmup (--warmup_steps, else --warmup_epochs) then cosine to --min_lr, over `epochs` epochs."""
    total = epochs * steps_per_epoch
    warmup = args.warmup_steps if args.warmup_steps > 0 else args.warmup_epochs * steps_per_epoch
    return StepSchedule(args, lr, total, min(warmup, total))


if __name__ == '__main__':
    if sys.argv[1:] != ['--write_configs']:
        raise SystemExit('usage: python recipe.py --write_configs')
    write_configs(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs'))
