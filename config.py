"""Flag values from outside the command line: YAML configs (a later file overrides an earlier one, the
command line overrides every file; each value checked against its flag's type), for --eval the model
flags that a checkpoint was trained with; and the checks of a run's settings before any work."""
import argparse
import os

import checkpoint
import datasets
import recipe
import utils
from models import io
from utils import UserError, str2bool


def parse_with_configs(make_parser, argv):
    """Flags < YAML configs (in order) < command line; unknown YAML keys are an error naming the closest flags."""
    parser = make_parser()
    values = {}
    for path in find_configs(argv):
        values.update(load_config(path, parser))
    parser.set_defaults(**values)
    return parser.parse_args(argv)


def find_configs(argv):
    found = []
    for i, arg in enumerate(argv):
        if arg == '--config' and i + 1 < len(argv):
            found.append(argv[i + 1])
        elif arg.startswith('--config='):
            found.append(arg.split('=', 1)[1])
    return found


def load_config(path, parser):
    import difflib
    import yaml
    if not os.path.isfile(path):
        raise UserError(f'--config {path}: ' + ('a folder; give a YAML file in it, e.g. configs/vit_tiny_cifar100.yaml'
                                                if os.path.isdir(path) else 'file not found'))
    with open(path) as f:
        try:
            values = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise UserError(f'--config {path} is not valid YAML: {utils.first_line(e)}') from None
    if not isinstance(values, dict):
        raise UserError(f'--config {path} must map flag names to values')
    actions = {action.dest: action for action in parser._actions if action.dest not in ('help', 'config')}
    for key, value in values.items():
        if key not in actions:
            close = difflib.get_close_matches(key, sorted(actions), n=3)
            raise UserError(f"--config {path}: unknown key '{key}'" + (f"; did you mean {', '.join(close)}?" if close else ''))
        values[key] = config_value(actions[key], value, f"--config {path}: key '{key}'")
    return values


# What a YAML scalar must be for a flag's type; argparse converts string defaults but no others, so a
# YAML `epochs: 1.5` would otherwise reach the run as a float.
YAML_TYPES = {int: ((int,), 'an integer'), float: ((int, float), 'a number'), str2bool: ((bool,), 'true or false')}


def config_value(action, value, where):
    """A YAML value checked against its flag's type and choices (each element for list flags); argparse
    checks neither for defaults (it only parses a lone string default), so `epochs: 1.5` would pass."""
    if value is None:  # `key: null` (or `key:`) only where the flag itself defaults to none
        if action.default is not None:
            raise UserError(f'{where} is empty (null); give a value, or leave the key out for the default '
                            f'{action.default!r}')
        return None
    if action.nargs in ('+', '*'):
        if not isinstance(value, list):
            raise UserError(f'{where} takes a list, e.g. [{value!r}]; got {value!r}')
        return [single_value(action, v, where) for v in value]
    return single_value(action, value, where)


def single_value(action, value, where):
    if isinstance(value, str) and action.type is not None:
        try:
            value = action.type(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            raise UserError(f'{where}: invalid {action.type.__name__} value: {value!r}') from None
    elif action.type in YAML_TYPES:
        kinds, name = YAML_TYPES[action.type]
        if isinstance(value, bool) != (action.type is str2bool) or not isinstance(value, kinds):
            raise UserError(f'{where} must be {name}, got {value!r} ({type(value).__name__})')
        value = action.type(value) if action.type is float else value
    if action.choices is not None and value not in action.choices:
        raise UserError(f'{where} must be one of {", ".join(map(str, action.choices))}, got {value!r}')
    return value


# What --eval takes from the checkpoint's own flags unless given: what the weights were trained as.
MODEL_FLAGS = ('model', 'model_kwargs', 'input_size', 'layer_scale_init_value', 'head_init_scale', 'linear_probe',
               'imagenet_default_mean_and_std', 'crop_pct', 'data_set')


def given_flags(argv, make_parser):
    """The flags set on the command line or in a --config file (not left at their defaults)."""
    quiet, parser = make_parser(), make_parser()
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    given = set(vars(quiet.parse_args(argv)))
    for path in find_configs(argv):
        given |= set(load_config(path, parser))
    return given


def eval_checkpoint(args, argv, make_parser):
    """--eval: read the --resume checkpoint, and take the model flags it was trained with (MODEL_FLAGS) where
    not given; so `--eval true --resume CKPT --data_path D` evaluates the model the checkpoint holds."""
    ckpt = io.torch_load(args.resume, args.trust_checkpoint)
    if isinstance(ckpt, dict) and isinstance(ckpt.get('meta'), dict) and 'student' in ckpt['meta'] \
            and not ('args' in ckpt or 'model_name' in ckpt):  # weight_selection.py's output: no model flags in it
        raise UserError(f"--resume {args.resume} is a selection of weight_selection.py (--student "
                        f"{ckpt['meta']['student']}), not a checkpoint of main.py: train from it with --initialize, or "
                        f"probe its features with --knn_probe 20 --initialize {args.resume}")
    stored = checkpoint.args_of(ckpt)
    if isinstance(ckpt, dict) and ckpt.get('model_name'):
        stored['model'] = ckpt['model_name']
    given = given_flags(argv, make_parser)
    taken = {k: stored[k] for k in MODEL_FLAGS if k in stored and k not in given}
    vars(args).update(taken)
    checkpoint.note_other_data(stored, args, 'evaluating on')  # after: --data_set may come from the checkpoint
    if taken:
        utils.print_main('--eval: from the checkpoint ' + ', '.join(f'--{k} {v}' for k, v in taken.items()
                                                                    if v not in (None, '')))
    return ckpt


def device_type(name):
    """'cpu', 'cuda', ... for a device name torch parses (cuda:1, cpu:0); None for one it does not."""
    import torch
    try:
        return torch.device(name).type
    except (RuntimeError, TypeError):
        return None


# (flag, whether a value is allowed, what the message says it must be): each out of range would crash mid-run (a
# probability above 1 in torch's bernoulli) or train something else than asked (a negative drop path trains with
# none, a smoothing of 1.5 inverts the targets)
RANGES = (
    ('save_ckpt_freq', lambda v: v >= 1, '1 (every epoch) or more'),
    ('save_ckpt_num', lambda v: v >= 0, '0 (keep all) or more'),
    ('save_every_steps', lambda v: v >= 0, '0 (off) or more'),
    ('warmup_epochs', lambda v: v >= 0, '0 (no warmup) or more'),
    ('drop_path', lambda v: 0 <= v < 1, 'a rate in [0, 1)'),
    ('smoothing', lambda v: 0 <= v < 1, 'in [0, 1)'),
    ('reprob', lambda v: 0 <= v <= 1, 'a probability in [0, 1]'),
    ('mixup_prob', lambda v: 0 <= v <= 1, 'a probability in [0, 1]'),
    ('mixup_switch_prob', lambda v: 0 <= v <= 1, 'a probability in [0, 1]'),
    ('mixup', lambda v: v >= 0, '0 (off) or more'),
    ('cutmix', lambda v: v >= 0, '0 (off) or more'),
    ('recount', lambda v: v >= 1, '1 or more'),
    ('model_ema_decay', lambda v: 0 < v < 1, 'in (0, 1), e.g. 0.9999'),
    ('weight_decay', lambda v: v >= 0, '0 or more'),
    ('min_lr', lambda v: v >= 0, '0 or more'),
    ('layer_decay', lambda v: 0 < v <= 1, 'in (0, 1] (1: off)'),
    ('clip_grad', lambda v: v is None or v >= 0, '0 (off) or more'),
)


def check_training_values(args):
    """Training flags whose values timm would assert on, or take silently, checked in one line each (the RANGES
    first, in check_args)."""
    if args.opt_betas is not None and len(args.opt_betas) != 2:
        raise UserError(f'--opt_betas takes two values (beta1 beta2, e.g. 0.9 0.999), got {len(args.opt_betas)}')
    if args.cutmix_minmax is not None and not (len(args.cutmix_minmax) == 2
                                               and 0 < args.cutmix_minmax[0] < args.cutmix_minmax[1] <= 1):
        raise UserError(f'--cutmix_minmax takes two box ratios 0 < min < max <= 1 (e.g. 0.2 0.8), got '
                        f'{" ".join(map(str, args.cutmix_minmax))}')
    recipe.check_optimizer_name(args.opt)
    datasets.check_augment_policy(args)
    if args.start_epoch < 0:
        raise UserError(f'--start_epoch {args.start_epoch} must be 0 or more (epochs count from 0)')
    if args.start_epoch >= args.epochs:
        raise UserError(f'--start_epoch {args.start_epoch} leaves no epoch of --epochs {args.epochs} to train; it '
                        f'counts from 0 (and a resumed run continues from its checkpoint without it)')
    if args.resume and args.initialize:
        raise UserError('--resume continues a run with its own weights, and --initialize starts one from a selection: '
                        'give one of them')


def check_args(args):
    """Values that would crash later or silently train something else than asked: one line, before any work."""
    for flag in ('batch_size', 'global_batch_size'):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise UserError(f'--{flag} {getattr(args, flag)} must be positive (images per step)')
    if args.num_workers < 0:
        raise UserError(f'--num_workers {args.num_workers} must be 0 (load in the main process) or more')
    if device_type(args.device) not in ('cpu', 'cuda'):
        raise UserError(f'--device {args.device}: pass cuda (each process its own GPU under torchrun), cuda:N or cpu')
    datasets.check_name(args.data_set)  # before gpu_data's size tables and every other use of the name
    if not args.data_path:
        raise UserError(f'--data_path is missing: give the folder that holds {args.data_set} (or where --download '
                        f'true lets torchvision fetch it)')
    for flag in ('output_dir', 'log_dir'):
        if getattr(args, flag) and not args.eval:  # --eval writes nothing there
            utils.check_folder_writable(getattr(args, flag), f'--{flag}')
    if args.print_freq <= 0:
        raise UserError(f'--print_freq {args.print_freq} must be 1 (every batch) or more')
    if args.input_size <= 0:
        raise UserError(f'--input_size {args.input_size} must be positive (pixels per side)')
    if args.crop_pct is not None and not 0 < args.crop_pct <= 1:
        raise UserError(f'--crop_pct {args.crop_pct} must be a fraction in (0, 1], e.g. 0.875 (224 of 256)')
    if args.eval or args.knn_probe:
        return  # no training: its settings do not matter
    for flag, allowed, meaning in RANGES:
        if not allowed(getattr(args, flag)):
            raise UserError(f'--{flag} {getattr(args, flag)} must be {meaning}')
    if args.batch_size % 2 and recipe.mixes_batches(args):  # timm's Mixup pairs each image with its mirror
        raise UserError(f'--batch_size {args.batch_size} is odd, and mixup/cutmix pair the images of a batch: '
                        f'pass an even --batch_size (or turn them off: --mixup 0 --cutmix 0, no --cutmix_minmax)')
    if args.epochs <= 0:
        raise UserError(f'--epochs {args.epochs}: train at least one epoch (or evaluate with --eval true)')
    if args.eval_freq <= 0:
        raise UserError(f'--eval_freq {args.eval_freq} must be 1 (every epoch) or more')
    if args.update_freq <= 0:
        raise UserError(f'--update_freq {args.update_freq} must be 1 (no accumulation) or more')
    for flag in ('lr', 'blr'):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise UserError(f'--{flag} {getattr(args, flag)} must be positive')
    if args.warmup_steps <= 0 and args.warmup_epochs > args.epochs:
        raise UserError(f'--epochs {args.epochs} is shorter than --warmup_epochs {args.warmup_epochs}: the learning '
                        f'rate would never reach --lr and never decay; lower --warmup_epochs')
    if args.warmup_steps <= 0 and args.warmup_epochs == args.epochs > 1:
        utils.print_main(f'warning: --warmup_epochs {args.warmup_epochs} is all of --epochs {args.epochs}: the '
                         f'learning rate only rises, with no cosine decay; lower --warmup_epochs')
    check_training_values(args)
