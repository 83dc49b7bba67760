"""The models of a training run, from its flags: the student (--model, with the recipe's drop path and
layer scale), its initial weights (--init, --initialize), the linear probe's head (--linear_probe), and
the frozen teacher of --distill."""
import json
import os

import torch

import utils
from models import io
from utils import UserError


def build_model(args, num_classes):
    """The model of --model with the recipe's drop path (and ConvNeXt's layer scale and head init scale)."""
    name = io.MODEL_ALIASES.get(args.model, args.model)
    if name != args.model:
        utils.print_main(f'model {args.model} is the official release name of timm {name}')
    kwargs = {'num_classes': num_classes, 'drop_path_rate': args.drop_path,
              **utils.parse_json_dict(args.model_kwargs, '--model_kwargs')}
    if 'convnext' in name:
        kwargs.setdefault('ls_init_value', args.layer_scale_init_value)
        kwargs.setdefault('head_init_scale', args.head_init_scale)
    # --input_size reaches the models that take an image size (ViTs); an explicit img_size must fit the model
    default_img_size = None if 'img_size' in kwargs else args.input_size
    model = io.create_model(name, '--model', default_img_size=default_img_size, **kwargs)
    check_input_size(model, args.input_size, f'--model {args.model}',
                     lambda fixed: f'pass --input_size {fixed}, or leave img_size out of --model_kwargs')
    return model


def check_input_size(model, size, what, fix):
    """A ViT of fixed image size (timm's default) stops at its first batch of another size: say so before the
    run starts (`fix(its size)`: what to do). And it cuts the image into patches: unless it pads the image
    (dynamic_img_pad), a size that is not a multiple of the patch size silently drops the border pixels (or
    yields no patch at all)."""
    embed = getattr(model, 'patch_embed', None)
    fixed = getattr(embed, 'img_size', None)
    if fixed is not None and getattr(embed, 'strict_img_size', False) and tuple(fixed) != (size, size):
        raise UserError(f'{what} takes {fixed[0]} px images only, and --input_size is {size}; '
                        + fix(fixed[0]))
    patch = getattr(embed, 'patch_size', None)
    if patch is None or getattr(embed, 'dynamic_img_pad', False):
        return
    patch = tuple(patch) if isinstance(patch, (tuple, list)) else (patch, patch)
    if any(size < p or size % p for p in patch):
        fits = [max(p, size // p * p) for p in patch[:1]] + [(size // patch[0] + 1) * patch[0]]
        raise UserError(f'--input_size {size} is not a multiple of the patch size {patch[0]} of {what}; use e.g. '
                        f'{" or ".join(str(f) for f in sorted(set(fits)))}')


def initialization_file(path, model_name):
    """--initialize as a file: the official README passes the folder weight_selection.py wrote into, which holds
    vit.pth or convnext.pth (--output_dir); a folder without that file is one line saying so."""
    if path and os.path.isdir(path):
        name = f"{'vit' if 'vit' in model_name else 'convnext'}.pth"
        if not os.path.isfile(os.path.join(path, name)):
            from utils import UserError
            raise UserError(f'--initialize {path} is a folder without {name}: a folder is read as the official '
                            f"release's --output_dir (vit.pth, convnext.pth); pass the selection file itself")
        return os.path.join(path, name)
    return path


def resized(given, wanted, key, dims):
    """Whether both state dicts hold `key` with shapes that differ along `dims` only."""
    a, b = given.get(key), wanted.get(key)
    return a is not None and b is not None and a.shape != b.shape and a.dim() == b.dim() and all(
        x == y for i, (x, y) in enumerate(zip(a.shape, b.shape)) if i not in dims)


def load_initialization(model, path, args):
    """Load a weight-selection file (or any state dict) into the model. Classifier tensors of another
    shape are left at their init; any other missing, unexpected or mismatched key is an error."""
    path = initialization_file(path, args.model)
    keys = tuple(dict.fromkeys([*args.model_key.split('|'), *io.WRAPPER_KEYS]))  # --model_key first, then the usual ones
    state = io.read_state_dict(path, keys=keys, prefix=args.model_prefix, trust=args.trust_checkpoint)
    own, layout = model.state_dict(), io.layout_of(model)
    dropped, fitted = [], {}
    for k, v in state.items():
        if k in own and v.shape != own[k].shape:
            if io.is_classifier(k, layout):
                dropped.append(k)
                continue
            v = io.linear_as_conv(v, own[k].shape)  # Linear <-> 1x1 conv MLP
        fitted[k] = v
    hint = ''
    # another number of positions (1, N, D) or another patch size (D, 3, p, p): selected for another input
    if resized(fitted, own, 'pos_embed', (1,)) or resized(fitted, own, 'patch_embed.proj.weight', (2, 3)):
        # the student as --model builds it (its patch size too, where --model_kwargs sets one)
        student = json.dumps({**utils.parse_json_dict(args.model_kwargs, '--model_kwargs'),
                              'img_size': args.input_size})
        hint = (f'; the selection was made for another input size or patch size: select again for this model with '
                f"weight_selection.py --student_kwargs '{student}' (it resamples the teacher's position grid and "
                f'patch embedding)')
    io.check_fits(fitted, own, f'--initialize {path} does not fit --model {args.model}', hint,
                  ignore=dropped.__contains__)
    model.load_state_dict(fitted, strict=False)
    utils.print_main(f'initialized {len(fitted)} tensors from {path}'
                     + (f'; kept the model\'s own {", ".join(dropped)} (other number of classes)' if dropped else ''))


def initialize(model, args):
    """--init (a classic scheme) or --initialize (a selection); then --linear_probe's frozen backbone."""
    if args.init != 'timm':
        if args.initialize:
            raise UserError(f'--init {args.init} and --initialize both set the initial weights; choose one')
        from models.initializers import apply_init
        apply_init(model, args.init)
    if args.initialize:
        load_initialization(model, args.initialize, args)
    if args.linear_probe:
        prepare_linear_probe(model)
    return model


def place(model, args, device):
    """The model on its device, channels-last with --channels_last."""
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def prepare_linear_probe(model):
    """MAE's linear probe: a frozen backbone, then BatchNorm without affine parameters and a new linear
    classifier (trunc-normal std 0.01), the only trained parameters."""
    from timm.layers import trunc_normal_
    path = io.layout_of(model).classifier[0]
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


def build_distill_teacher(args, num_classes, device):
    """The frozen teacher of --distill (any timm name; hub weights or --distill_teacher_checkpoint)."""
    if args.distill == 'none':
        return None
    if not args.distill_teacher:
        raise UserError(f'--distill {args.distill} needs --distill_teacher NAME')
    kwargs = utils.parse_json_dict(args.distill_teacher_kwargs, '--distill_teacher_kwargs')
    state, layout = io.load_pretrained(args.distill_teacher, args.distill_teacher_checkpoint, kwargs,
                                       flag='--distill_teacher', trust=args.trust_checkpoint)
    head = [v for k, v in state.items() if io.is_classifier(k, layout) and k.endswith('weight')]
    kwargs.setdefault('num_classes', head[0].shape[0] if head else 0)  # the checkpoint's classes, or none
    teacher = io.create_model(args.distill_teacher, '--distill_teacher', **kwargs)
    check_input_size(teacher, args.input_size, f'--distill_teacher {args.distill_teacher}',
                     lambda fixed: 'pass --distill_teacher_kwargs \'{"dynamic_img_size": true}\' (its position '
                                   'grid is then resampled to each batch\'s size)')
    teacher.load_state_dict(state)
    if args.distill == 'logit' and teacher.num_classes != num_classes:
        raise UserError(f'--distill logit needs a teacher with the dataset\'s {num_classes} classes; '
                        f'{args.distill_teacher} has {teacher.num_classes} (use --distill feature)')
    for p in teacher.parameters():
        p.requires_grad = False
    utils.print_main(f'distillation ({args.distill}, alpha {args.distill_alpha}) from {args.distill_teacher}')
    return teacher.eval().to(device)


class PixelFeatures(torch.nn.Module):
    """timm's feature API over the raw (normalized) pixels: the baseline of a k-NN probe (--knn_features pixels),
    what a model's features must beat to count as features at all."""

    def forward_features(self, x):
        return x.flatten(1)

    def forward_head(self, x, pre_logits=False):
        return x
