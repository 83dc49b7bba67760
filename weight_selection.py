"""Weight selection (Xu et al., "Initializing Models with Larger Ones", ICLR 2024, Section 3).

A smaller student is initialized from a larger pretrained teacher of the same family in three steps:
  1. layer selection   - each student block takes the weights of one teacher block
                         (first-N by default; per stage for hierarchical models such as ConvNeXt);
  2. component mapping - student and teacher tensors correspond by name inside a block;
  3. element selection - along every dimension, a subset of the teacher's slices is kept
                         (evenly spaced by default, Algorithm 1).

Use it from Python:
    sd, report = select_weights(teacher_model, student_model)
    student_model.load_state_dict(sd)
or from the command line (see README.md):
    python weight_selection.py --teacher vit_small_patch16_224.augreg_in21k \
        --student vit_tiny_patch16_224 --num_classes 100 --output ws_vit_tiny.pth
"""
import math
import os
import re
import sys
import time
import warnings
import zlib
from dataclasses import dataclass

import torch
import torch.nn as nn

import utils
from utils import UserError

ELEMENT_SELECTIONS = ('uniform', 'consecutive', 'random', 'random_inconsistent', 'l1', 'magnitude')
LAYER_SELECTIONS = ('first', 'uniform', 'mid', 'last')

# --exclude names -> which student keys they leave at the student's own initialization (Table 10).
COMPONENTS = {
    'patch_embed': lambda k: k.startswith(('patch_embed.', 'stem.')),
    'pos_embed': lambda k: k == 'pos_embed',
    'cls_token': lambda k: k in ('cls_token', 'reg_token', 'dist_token'),
    'attn': lambda k: '.attn.' in k,
    'norm': lambda k: any('norm' in part for part in k.split('.')[:-1]),
    'mlp': lambda k: '.mlp.' in k,
    'layer_scale': lambda k: k.endswith(('.gamma', 'ls1.gamma', 'ls2.gamma')),
    'downsample': lambda k: '.downsample.' in k,
}

# Block containers: ViT `blocks.N.`, ConvNeXt/Swin `stages.S.blocks.N.` (greedy: the innermost
# `blocks` wins), ResNet `layerK.N.`.
BLOCK_KEY = re.compile(r'^(?P<group>.*\b(?:blocks|layer\d+))\.(?P<index>\d+)\.(?P<rest>.+)$')


# ----------------------------------------------------------------------------------------------
# Element selection: which indices of a teacher dimension of size t a student dimension of size s keeps.

def uniform_indices(t, s):
    """Algorithm 1: s evenly spaced indices out of t: 0, k, 2k, ... with k = t // s when s divides t,
    else round(linspace(0, t - 1, s)). The paper's 4x6 -> 2x3 example keeps rows 0, 2 and columns 0, 2, 4."""
    if t % s == 0:
        return torch.arange(0, t, t // s)
    return torch.linspace(0, t - 1, s).round().long()


def consecutive_indices(t, s):
    return torch.arange(s)


def _generator(*parts):
    g = torch.Generator()
    g.manual_seed(zlib.crc32(repr(parts).encode()))
    return g


def random_indices(t, s, generator):
    """s of t indices chosen at random, kept in increasing order so that slices keep their order."""
    return torch.randperm(t, generator=generator)[:s].sort().values


class ElementSelector:
    """Chooses the kept indices of every dimension, as the chosen element selection prescribes.

    Consistent modes (uniform, consecutive, random, l1) give one index set per pair of sizes
    (teacher t, student s), so a width keeps the same channels in every tensor: the residual stream,
    q/k/v and proj, fc1 rows and fc2 columns stay aligned (Section 3.2, "random selection with
    consistency"). random_inconsistent draws a fresh set for every tensor and dimension. l1 ranks
    each embedding width (a size of a normalization weight) by the summed L1 norm of the teacher's
    slices of that width, one set for all tensors; other sizes (MLP hidden, ...) are ranked per tensor.
    """

    def __init__(self, mode, seed, teacher_state=None):
        if mode not in ELEMENT_SELECTIONS:
            raise UserError(f"unknown element selection '{mode}'; choose one of {', '.join(ELEMENT_SELECTIONS)}")
        self.mode, self.seed = mode, seed
        self.cache = {}
        self.embed_widths = set()
        self.l1_scores = {}
        if mode == 'l1':
            self._score_embed_widths(teacher_state)

    def _score_embed_widths(self, teacher_state):
        self.embed_widths = {v.shape[0] for k, v in teacher_state.items()
                             if v.ndim == 1 and 'norm' in k and v.is_floating_point()}
        scores = {w: torch.zeros(w, dtype=torch.float64) for w in self.embed_widths}
        for key, v in teacher_state.items():
            if not v.is_floating_point() or v.ndim == 0:
                continue
            v = split_qkv(key, v)
            for dim, size in enumerate(v.shape):
                if size in scores and not (is_qkv(key) and dim == 0):
                    other = [d for d in range(v.ndim) if d != dim]
                    scores[size] += v.detach().abs().double().sum(dim=other) if other else v.abs().double()
        self.l1_scores = scores

    def indices(self, t, s, tensor, dim, key):
        if t == s:
            return torch.arange(t)
        if self.mode == 'uniform':
            return uniform_indices(t, s)
        if self.mode == 'consecutive':
            return consecutive_indices(t, s)
        if self.mode == 'random':
            if (t, s) not in self.cache:
                self.cache[t, s] = random_indices(t, s, _generator(self.seed, t, s))
            return self.cache[t, s]
        if self.mode == 'random_inconsistent':
            return random_indices(t, s, _generator(self.seed, key, dim))
        if self.mode == 'l1':
            if t in self.l1_scores:
                if (t, s) not in self.cache:
                    self.cache[t, s] = self.l1_scores[t].topk(s).indices.sort().values
                return self.cache[t, s]
            other = [d for d in range(tensor.ndim) if d != dim]
            score = tensor.abs().double().sum(dim=other) if other else tensor.abs().double()
            return score.topk(s).indices.sort().values
        raise AssertionError(self.mode)

    def select(self, tensor, shape, key):
        """Select `tensor` down to `shape`, one dimension after the other (Algorithm 1)."""
        if self.mode == 'magnitude':
            return magnitude_squeeze(tensor, shape)
        out = tensor
        for dim, (t, s) in enumerate(zip(tensor.shape, shape)):
            if t != s:
                out = out.index_select(dim, self.indices(t, s, tensor, dim, key))
        return out


def magnitude_squeeze(tensor, shape):
    """Table 7's magnitude pruning: keep the tensor's largest-magnitude weights, in their original
    order, squeezed into the student's shape."""
    n = math.prod(shape)
    flat = tensor.reshape(-1)
    if flat.numel() == n:
        return tensor.reshape(shape)
    keep = flat.abs().topk(n).indices.sort().values
    return flat[keep].reshape(shape)


def is_qkv(key):
    return key.endswith(('attn.qkv.weight', 'attn.qkv.bias'))


def split_qkv(key, tensor):
    """A fused qkv tensor [3D, ...] as [3, D, ...], so that q, k and v are each selected with the
    model width's index set and stay paired with each other and with proj."""
    if is_qkv(key) and tensor.shape[0] % 3 == 0:
        return tensor.reshape(3, tensor.shape[0] // 3, *tensor.shape[1:])
    return tensor


# ----------------------------------------------------------------------------------------------
# Layer selection.

def layer_indices(mode, n_teacher, n_student):
    """Which teacher blocks the student's n_student blocks take (Tables 6, 16, 17)."""
    if n_student > n_teacher:
        raise UserError(f'the student has {n_student} blocks where the teacher has {n_teacher}; '
                        f'weight selection needs a student no deeper than its teacher')
    if mode == 'first':
        return list(range(n_student))
    if mode == 'last':
        return list(range(n_teacher - n_student, n_teacher))
    if mode == 'mid':
        start = (n_teacher - n_student) // 2
        return list(range(start, start + n_student))
    if mode == 'uniform':
        return uniform_indices(n_teacher, n_student).tolist()
    raise UserError(f"unknown layer selection '{mode}'; choose one of {', '.join(LAYER_SELECTIONS)} "
                    f"or a list of teacher blocks such as 0,2,4 (per stage: 0,1;0,1;0,2,4,6,8,10;0,1)")


def block_depths(keys):
    """{block group: number of blocks}, in order of appearance, e.g. {'blocks': 12} or
    {'stages.0.blocks': 3, 'stages.1.blocks': 3, ...}."""
    depths = {}
    for k in keys:
        m = BLOCK_KEY.match(k)
        if m:
            depths[m['group']] = max(depths.get(m['group'], 0), int(m['index']) + 1)
    return depths


def parse_explicit_layers(spec):
    try:
        return [[int(i) for i in stage.split(',') if i.strip()] for stage in spec.split(';')]
    except ValueError:
        return None


def layer_maps(teacher_keys, student_keys, selection='first'):
    """{block group: [teacher block for each student block]} for every group of the student."""
    t_depths, s_depths = block_depths(teacher_keys), block_depths(student_keys)
    explicit = parse_explicit_layers(selection) if selection not in LAYER_SELECTIONS else None
    if selection not in LAYER_SELECTIONS and explicit is None:
        layer_indices(selection, 1, 1)  # raises the unknown-mode error
    if explicit is not None and len(explicit) != len(s_depths):
        raise UserError(f'--layer_selection {selection} gives {len(explicit)} list(s) of blocks but the student '
                        f'has {len(s_depths)} block group(s) ({", ".join(s_depths)}); give one comma-separated '
                        f"list per group, separated by ';'")
    maps = {}
    for i, (group, n_student) in enumerate(s_depths.items()):
        if group not in t_depths:
            key = next(k for k in student_keys if k.startswith(group + '.'))
            raise UserError(f"student key '{key}' has no counterpart in the teacher (it has no blocks "
                            f"'{group}'); teacher and student must be of the same model family")
        n_teacher = t_depths[group]
        if explicit is None:
            maps[group] = layer_indices(selection, n_teacher, n_student)
            continue
        chosen = explicit[i]
        if len(chosen) != n_student or not all(0 <= j < n_teacher for j in chosen):
            raise UserError(f"--layer_selection for '{group}' must list {n_student} teacher blocks in "
                            f'0..{n_teacher - 1}, got {",".join(map(str, chosen))}')
        maps[group] = chosen
    return maps


def teacher_key(student_key, maps):
    m = BLOCK_KEY.match(student_key)
    if m and m['group'] in maps:
        return f"{m['group']}.{maps[m['group']][int(m['index'])]}.{m['rest']}"
    return student_key


# ----------------------------------------------------------------------------------------------
# What a model's state dict alone does not say.

@dataclass
class Layout:
    pos_prefix_tokens: int = 0   # tokens (cls, registers) that carry their own pos_embed entries
    grid: tuple = None           # patch grid of pos_embed
    classifier: tuple = ()       # names of classifier modules (not selected unless keep_head)


def layout_of(model_or_state):
    """Layout of a timm model; for a bare state dict, a square grid and a classifier named head/head.fc/fc."""
    if isinstance(model_or_state, nn.Module):
        m = model_or_state
        prefix = 0 if getattr(m, 'no_embed_class', False) else getattr(m, 'num_prefix_tokens', 0)
        grid = getattr(getattr(m, 'patch_embed', None), 'grid_size', None)
        classifier = (getattr(m, 'pretrained_cfg', None) or {}).get('classifier', 'head')
        classifier = tuple(classifier) if isinstance(classifier, (list, tuple)) else (classifier,)
        return Layout(prefix, tuple(grid) if grid is not None else None, classifier)
    pos = model_or_state.get('pos_embed')
    layout = Layout(classifier=('head', 'head.fc', 'fc'))
    if pos is not None:
        n = pos.shape[1]
        for prefix in range(0, 9):  # the fewest prefix tokens that leave a square grid
            side = math.isqrt(n - prefix)
            if side * side == n - prefix:
                layout.pos_prefix_tokens, layout.grid = prefix, (side, side)
                break
    return layout


def is_classifier(key, layout):
    return any(key.startswith(c + '.') for c in layout.classifier)


def state_of(model_or_state):
    if isinstance(model_or_state, nn.Module):
        return model_or_state.state_dict()
    return model_or_state


# ----------------------------------------------------------------------------------------------
# The selection.

def select_weights(teacher, student, layer_selection='first', element_selection='uniform', seed=0,
                   exclude=(), keep_head=False, teacher_layout=None, student_layout=None):
    """Initialize `student` from `teacher` by weight selection.

    teacher, student: timm models or state dicts (a model also tells the position grid and classifier
    name; for state dicts pass Layouts or let them be inferred). Returns (state_dict, report): a full
    student state dict, and per student key {'action': selected|copied|resampled|excluded|skipped,
    'source': teacher key, 'teacher_shape', 'shape'}. Raises UserError when the models do not fit.
    """
    unknown = [c for c in exclude if c not in COMPONENTS]
    if unknown:
        raise UserError(f"unknown component to exclude '{unknown[0]}'; choose from {', '.join(COMPONENTS)}")
    t_layout = teacher_layout or layout_of(teacher)
    s_layout = student_layout or layout_of(student)
    t_state, s_state = state_of(teacher), state_of(student)
    check_same_family(t_state, s_state, s_layout, keep_head)
    maps = layer_maps(t_state.keys(), s_state.keys(), layer_selection)
    selector = ElementSelector(element_selection, seed, t_state)

    out, report = {}, {}
    for key, s_val in s_state.items():
        entry = {'shape': list(s_val.shape)}
        report[key] = entry
        if any(COMPONENTS[c](key) for c in exclude):
            out[key], entry['action'] = s_val.clone(), 'excluded'
            continue
        if is_classifier(key, s_layout) and not keep_head:
            out[key], entry['action'] = s_val.clone(), 'skipped'
            continue
        src = teacher_key(key, maps)
        if src not in t_state:
            raise UserError(f"student key '{key}' has no counterpart '{src}' in the teacher; "
                            f'teacher and student must be of the same model family')
        t_val = t_state[src]
        entry.update(source=src, teacher_shape=list(t_val.shape))
        if is_classifier(key, s_layout) and t_val.shape[0] != s_val.shape[0]:
            raise UserError(f"--keep_head: the teacher's classifier '{src}' has {t_val.shape[0]} classes, "
                            f'the student {s_val.shape[0]}; pass --num_classes {t_val.shape[0]} or drop --keep_head')
        value, action = map_component(key, t_val, s_val, t_layout, s_layout, selector)
        if value.shape != s_val.shape:
            raise AssertionError(f'{key}: selected {tuple(value.shape)}, student {tuple(s_val.shape)}')
        out[key] = value.to(dtype=s_val.dtype).contiguous()
        entry['action'] = action
    return out, report


def check_same_family(t_state, s_state, s_layout, keep_head):
    """Name the first student key that has no counterpart in the teacher."""
    t_groups = block_depths(t_state.keys())
    for key in s_state:
        m = BLOCK_KEY.match(key)
        known = m['group'] in t_groups if m else key in t_state
        if not known and (keep_head or not is_classifier(key, s_layout)):
            raise UserError(f"student key '{key}' has no counterpart in the teacher; teacher and student "
                            f'must be of the same model family')


def map_component(key, t_val, s_val, t_layout, s_layout, selector):
    """One student tensor from its teacher counterpart: adapt the layout, then select elements."""
    action = None
    t_val = t_val.detach()
    if not t_val.is_floating_point() or t_val.ndim == 0:
        if t_val.shape != s_val.shape:
            raise UserError(f"'{key}': teacher {tuple(t_val.shape)} and student {tuple(s_val.shape)} differ")
        return t_val.clone(), 'copied'
    t_val = t_val.float()
    if key == 'pos_embed':
        t_val, action = adapt_pos_embed(t_val, s_val, t_layout, s_layout)
    elif key == 'reg_token' and t_val.shape[1] > s_val.shape[1]:
        t_val = t_val[:, :s_val.shape[1]]  # fewer registers: keep the first ones
    elif key.endswith(('patch_embed.proj.weight', 'stem.0.weight')) and t_val.shape[2:] != s_val.shape[2:]:
        from timm.layers import resample_patch_embed
        t_val = resample_patch_embed(t_val, list(s_val.shape[2:]))  # another patch size (FlexiViT)
        action = 'resampled'
    if t_val.ndim != s_val.ndim:
        t_val = linear_as_conv(t_val, s_val.shape)
        if t_val.ndim != s_val.ndim:
            raise UserError(f"'{key}': the teacher's tensor has shape {tuple(t_val.shape)} and the student's "
                            f'{tuple(s_val.shape)}; they are not the same component')
    if is_qkv(key):
        t_split, s_shape = split_qkv(key, t_val), split_qkv(key, s_val).shape
        check_not_wider(key, t_split.shape, s_shape)
        value = selector.select(t_split, s_shape, key).reshape(s_val.shape)
    else:
        check_not_wider(key, t_val.shape, s_val.shape)
        value = selector.select(t_val, s_val.shape, key)
    if action is None:
        action = 'copied' if tuple(t_val.shape) == tuple(s_val.shape) else 'selected'
    return value, action


def linear_as_conv(tensor, shape):
    """A Linear weight [out, in] as a 1x1 conv [out, in, 1, 1] or the reverse, to match `shape` (ConvNeXt's
    MLP with conv_mlp False/True); any other tensor unchanged."""
    if tensor.ndim == 2 and len(shape) == 4 and tuple(shape[2:]) == (1, 1):
        return tensor[:, :, None, None]
    if tensor.ndim == 4 and tuple(tensor.shape[2:]) == (1, 1) and len(shape) == 2:
        return tensor[:, :, 0, 0]
    return tensor


def check_not_wider(key, t_shape, s_shape):
    for dim, (t, s) in enumerate(zip(t_shape, s_shape)):
        if s > t:
            raise UserError(f"'{key}': the student is larger than the teacher along dimension {dim} "
                            f'({s} > {t}; teacher {tuple(t_shape)}, student {tuple(s_shape)}); '
                            f'weight selection needs a student no wider than its teacher')


def adapt_pos_embed(t_val, s_val, t_layout, s_layout):
    """Resample the teacher's position grid to the student's (bicubic, as timm does when changing
    input size), then let element selection pick channels. Tokens are never picked out of the
    flattened grid: that would scramble the spatial layout."""
    from timm.layers import resample_abs_pos_embed
    tp, sp = t_layout.pos_prefix_tokens, s_layout.pos_prefix_tokens
    if sp > tp:
        raise UserError(f"pos_embed: the student has {sp} prefix tokens with position embeddings, "
                        f'the teacher only {tp}')
    t_grid, s_grid = t_layout.grid, s_layout.grid
    if t_grid is None or s_grid is None or math.prod(t_grid) + tp != t_val.shape[1] \
            or math.prod(s_grid) + sp != s_val.shape[1]:
        raise UserError(f'pos_embed: cannot tell the position grid (teacher {tuple(t_val.shape)}, '
                        f'student {tuple(s_val.shape)}); pass the models rather than state dicts')
    action = None
    if tuple(t_grid) != tuple(s_grid):
        t_val = resample_abs_pos_embed(t_val, list(s_grid), list(t_grid), num_prefix_tokens=tp)
        action = 'resampled'
    if tp != sp:
        t_val = torch.cat([t_val[:, :sp], t_val[:, tp:]], dim=1)
    return t_val, action


def summarize(report, teacher_state):
    counts = {}
    for entry in report.values():
        counts[entry['action']] = counts.get(entry['action'], 0) + 1
    inherited = sum(math.prod(e['shape']) for e in report.values()
                    if e['action'] in ('selected', 'copied', 'resampled'))
    student_total = sum(math.prod(e['shape']) for e in report.values())
    teacher_total = sum(v.numel() for v in teacher_state.values())
    return {'actions': counts, 'student_params': student_total, 'inherited_params': inherited,
            'teacher_params': teacher_total}


# ----------------------------------------------------------------------------------------------
# Building teacher and student.

def check_model_name(name, flag):
    import timm
    import models  # noqa: F401 - registers the project's students with timm
    if not timm.is_model(name):
        import difflib
        close = difflib.get_close_matches(name.split('.')[0], timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ''
        raise UserError(f"{flag}: unknown model '{name}' (neither a timm model nor one registered in models/){hint}")


def create_model(name, flag, **kwargs):
    import timm
    check_model_name(name, flag)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', message='Mapping deprecated model name')
            return timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        raise UserError(f'{flag} {name}: {e}; check the keyword arguments {kwargs}') from None


def load_teacher(name, checkpoint=None, kwargs=None):
    """(state_dict, Layout) of the teacher: from `checkpoint` if given, else timm's pretrained weights
    from the hub. A checkpoint is checked key by key and shape by shape against the model."""
    import timm
    kwargs = dict(kwargs or {})
    check_model_name(name, '--teacher')
    if checkpoint is None:
        check_hub_reachable(name)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings('ignore', message='Mapping deprecated model name')
                model = timm.create_model(name, pretrained=True, **kwargs)
        except TypeError as e:
            raise UserError(f'--teacher {name}: {e}; check --teacher_kwargs') from None
        except Exception as e:  # noqa: BLE001 - any download failure
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise UserError(f"cannot fetch pretrained weights for '{name}' ({type(e).__name__}: {first}); "
                            f'offline, pass --teacher_checkpoint FILE') from None
        return model.state_dict(), layout_of(model)
    if checkpoint.endswith('.npz'):  # the augreg ViTs' original JAX checkpoints
        model = create_model(name, '--teacher', **kwargs)
        if not hasattr(model, 'load_pretrained'):
            raise UserError(f'{checkpoint}: .npz checkpoints are supported for timm ViTs only')
        if not os.path.isfile(checkpoint):
            raise UserError(f'checkpoint not found: {checkpoint}')
        try:
            model.load_pretrained(checkpoint)
        except Exception as e:  # noqa: BLE001
            raise UserError(f'cannot load {checkpoint} into {name}: {str(e).splitlines()[0][:200]}') from None
        return model.state_dict(), layout_of(model)
    state = utils.read_state_dict(checkpoint)
    with torch.device('meta'):  # structure only: no memory, no random init
        model = create_model(name, '--teacher', **kwargs)
    state = fit_checkpoint(state, model, name, checkpoint)
    return state, layout_of(model)


def check_hub_reachable(name):
    """Fail at once when offline, instead of the hub client's minute of retries."""
    import socket
    from urllib.parse import urlparse
    host = urlparse(os.environ.get('HF_ENDPOINT', 'https://huggingface.co')).hostname
    if os.environ.get('HF_HUB_OFFLINE') == '1':
        raise UserError(f"offline (HF_HUB_OFFLINE=1): pass --teacher_checkpoint FILE for '{name}'")
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        raise UserError(f"cannot reach {host} to download '{name}' (offline?); "
                        f'pass --teacher_checkpoint FILE') from None


def fit_checkpoint(state, model, name, path):
    """The checkpoint as the model's own state dict, converting foreign layouts with timm's
    checkpoint_filter_fn; a different classifier size is accepted (it is not selected by default)."""
    expected = model.state_dict()
    if set(state) != set(expected):
        filter_fn = getattr(sys.modules.get(type(model).__module__), 'checkpoint_filter_fn', None)
        if filter_fn is not None:
            try:
                converted = filter_fn(dict(state), model)
                if set(converted) == set(expected):
                    state = converted
            except Exception:  # noqa: BLE001 - not convertible: report the raw mismatch below
                pass
    layout = layout_of(model)
    # a checkpoint without classifier (a backbone) is fine: the classifier is not selected by default
    missing = [k for k in expected if k not in state and not is_classifier(k, layout)]
    unexpected = [k for k in state if k not in expected]
    wrong = [f'{k} {tuple(state[k].shape)} vs {tuple(v.shape)}' for k, v in expected.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape) and not is_classifier(k, layout)]
    if missing or unexpected or wrong:
        raise UserError(f'checkpoint {path} does not fit --teacher {name}: '
                        f'{utils.describe_mismatch(missing, unexpected, wrong)}; check the teacher name or --teacher_kwargs')
    return state


# ----------------------------------------------------------------------------------------------
# Command line.

# The official release's interface: --model_type picks the paper's student and default teacher.
OFFICIAL = {
    'vit': ('vit_tiny_patch16_224', 'vit_small_patch16_224_in21k'),
    'convnext': ('convnext_femto_linear', 'convnext_tiny_in22k'),
}


def get_args_parser():
    p = utils.ArgumentParser('weight_selection.py', description=__doc__.split('\n\n')[0],
                             formatter_class=__import__('argparse').RawDescriptionHelpFormatter)
    p.add_argument('--teacher', help='timm model name, e.g. vit_small_patch16_224.augreg_in21k or convnext_tiny.fb_in22k')
    p.add_argument('--teacher_checkpoint', default=None,
                   help='local weights (.pth/.pt/.bin, .safetensors, or timm .npz); default: timm pretrained weights')
    p.add_argument('--teacher_kwargs', default='', help='JSON keyword arguments for timm.create_model of the teacher')
    p.add_argument('--student', help='timm model name or one registered in models/, e.g. vit_tiny_patch16_224')
    p.add_argument('--student_kwargs', default='', help='JSON keyword arguments for the student, e.g. {"depth": 6}')
    p.add_argument('--num_classes', type=int, default=None, help="the student's number of classes")
    p.add_argument('--layer_selection', default='first',
                   help='first | uniform | mid | last | explicit teacher blocks 0,2,4,... (per stage: a;b;c;d)')
    p.add_argument('--element_selection', default='uniform', choices=ELEMENT_SELECTIONS)
    p.add_argument('--seed', type=int, default=0, help='seed of random selections and of the student init')
    p.add_argument('--exclude', default='', help=f'components left at random init: {",".join(COMPONENTS)}')
    p.add_argument('--keep_head', action='store_true', help="also select the classifier (student keeps the teacher's classes)")
    p.add_argument('--output', default=None, help='file to write {"model": state_dict, "meta": {...}}')
    p.add_argument('--quiet', action='store_true', help='print only the summary line')
    hf = p.add_argument_group('Hugging Face teachers (--teacher a folder with config.json; see hf_selection.py)')
    hf.add_argument('--student_config', default=None,
                    help='JSON overrides of the teacher\'s config, e.g. {"hidden_size": 1024, "num_hidden_layers": 8}, '
                         'or a config.json file; --output is then a folder')
    hf.add_argument('--head_selection', default='auto', choices=('auto', 'heads', 'dims'),
                    help='attention: whole heads (GQA groups intact) or per dimension; auto: heads for rotary models')
    hf.add_argument('--max_shard_size', default='5GB', help='largest output shard, e.g. 5GB, 500MB')
    official = p.add_argument_group("the official release's interface")
    official.add_argument('--model_type', choices=sorted(OFFICIAL), default=None,
                          help='vit: ViT-T from ViT-S; convnext: ConvNeXt-F (Linear MLP) from ConvNeXt-T')
    official.add_argument('--pretrained_model', default=None, help='teacher name (with --model_type)')
    official.add_argument('--output_dir', default=None, help='writes OUTPUT_DIR/vit.pth or OUTPUT_DIR/convnext.pth')
    return p


def resolve_args(args):
    if args.model_type:
        student, teacher = OFFICIAL[args.model_type]
        args.student = args.student or student
        args.teacher = args.teacher or args.pretrained_model or teacher
        if args.output is None:
            if args.output_dir is None:
                raise UserError('--model_type needs --output_dir DIR (or --output FILE)')
            os.makedirs(args.output_dir, exist_ok=True)
            args.output = os.path.join(args.output_dir, f'{args.model_type}.pth')
    missing = [f for f in ('teacher', 'student', 'output') if not getattr(args, f)]
    if missing:
        raise UserError(f"missing --{', --'.join(missing)}; e.g. --teacher vit_small_patch16_224.augreg_in21k "
                        f'--student vit_tiny_patch16_224 --output ws.pth')
    return args


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    import hf_selection
    if args.student_config or hf_selection.is_hf_teacher(args.teacher):
        return hf_selection.run(args)
    args = resolve_args(args)
    teacher_kwargs = utils.parse_json_dict(args.teacher_kwargs, '--teacher_kwargs')
    student_kwargs = utils.parse_json_dict(args.student_kwargs, '--student_kwargs')
    exclude = [c.strip() for c in args.exclude.split(',') if c.strip()]
    utils.check_writable(args.output)
    start = time.time()
    teacher_state, teacher_layout = load_teacher(args.teacher, args.teacher_checkpoint, teacher_kwargs)
    torch.manual_seed(args.seed)
    if args.num_classes is not None:
        student_kwargs.setdefault('num_classes', args.num_classes)
    student = create_model(args.student, '--student', **student_kwargs)
    state, report = select_weights(teacher_state, student, args.layer_selection, args.element_selection,
                                   args.seed, exclude, args.keep_head, teacher_layout=teacher_layout)
    summary = summarize(report, teacher_state)
    import timm
    meta = {
        'teacher': args.teacher, 'teacher_kwargs': teacher_kwargs,
        'teacher_checkpoint': args.teacher_checkpoint,
        'teacher_checkpoint_sha256': utils.sha256_file(args.teacher_checkpoint) if args.teacher_checkpoint else None,
        'student': args.student, 'student_kwargs': student_kwargs,
        'layer_selection': args.layer_selection, 'element_selection': args.element_selection,
        'seed': args.seed, 'exclude': exclude, 'keep_head': args.keep_head,
        'layer_maps': layer_maps(teacher_state.keys(), state.keys(), args.layer_selection),
        'summary': summary, 'report': report,
        'versions': {'torch': torch.__version__, 'timm': timm.__version__, 'code': utils.code_version()},
    }
    utils.atomic_save({'model': state, 'meta': meta}, args.output)
    print_summary(args, meta, time.time() - start)


def print_summary(args, meta, seconds):
    s = meta['summary']
    if not args.quiet:
        for group, indices in meta['layer_maps'].items():
            print(f'layers  {group}: student 0..{len(indices) - 1} <- teacher {indices}')
        for key, e in meta['report'].items():
            if e['action'] in ('resampled', 'excluded') or key == 'pos_embed':
                print(f"{e['action']:9s} {key} {tuple(e.get('teacher_shape', e['shape']))} -> {tuple(e['shape'])}")
    acts = ', '.join(f'{n} {a}' for a, n in sorted(s['actions'].items()))
    print(f"{args.student} <- {args.teacher} ({args.layer_selection} layers, {args.element_selection} elements): "
          f"{acts}; inherited {s['inherited_params'] / 1e6:.2f}M of the student's {s['student_params'] / 1e6:.2f}M "
          f"parameters = {100 * s['inherited_params'] / s['teacher_params']:.1f}% of the teacher's "
          f"{s['teacher_params'] / 1e6:.2f}M; wrote {args.output} in {seconds:.1f}s")


if __name__ == '__main__':
    utils.run_cli(main)
