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
import argparse
import functools
import json
import math
import os
import re
import time
import zlib

import torch
import torch.nn as nn

import utils
from models.io import create_model, is_classifier, layout_of, linear_as_conv, load_pretrained
from utils import UserError

ELEMENT_SELECTIONS = ('uniform', 'consecutive', 'random', 'random_inconsistent', 'l1', 'l1_consistent',
                      'magnitude')
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


def _timm_layers(*names):
    import timm.layers
    found = (getattr(timm.layers, n, None) for n in names)
    return tuple(t for t in found if isinstance(t, type))  # SwiGLUPacked is a partial, not a class


@functools.lru_cache(maxsize=None)
def component_types():
    """Components told by the type of a module that owns the tensor, when the student is an nn.Module: a
    name rule misses norms without 'norm' in their path (ConvNeXt's stem.1, stages.N.downsample.0)."""
    norms = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*
             *([nn.RMSNorm] if hasattr(nn, 'RMSNorm') else []),
             *_timm_layers('RmsNorm', 'RmsNorm2d', 'SimpleNorm', 'SimpleNorm2d', 'FrozenBatchNormAct2d',
                           'FilterResponseNormAct2d', 'FilterResponseNormTlu2d', 'EvoNorm2dB0', 'EvoNorm2dB1',
                           'EvoNorm2dB2', 'EvoNorm2dS0', 'EvoNorm2dS0a', 'EvoNorm2dS1', 'EvoNorm2dS1a',
                           'EvoNorm2dS2', 'EvoNorm2dS2a'))
    attns = (nn.MultiheadAttention, *_timm_layers('Attention', 'AttentionRope', 'DiffAttention', 'Attention2d',
                                                  'MultiQueryAttention2d', 'MultiQueryAttentionV2'))
    mlps = _timm_layers('Mlp', 'GluMlp', 'SwiGLU', 'SwiGLUPacked', 'GatedMlp', 'ConvMlp', 'GlobalResponseNormMlp')
    return {'norm': norms, 'attn': attns, 'mlp': mlps}


def owners(student, key):
    """The student's modules on the path to `key` (innermost last), or None for a bare state dict."""
    if not isinstance(student, nn.Module):
        return None
    parts = key.split('.')[:-1]
    try:
        return [student.get_submodule('.'.join(parts[:i])) for i in range(1, len(parts) + 1)]
    except AttributeError:
        return None


def in_component(component, key, student):
    """Whether student `key` belongs to an --exclude component. norm: by module type when the student is a
    module, else by name; attn, mlp: by type or by name (their many classes include project-specific
    ones, and their names '.attn.' / '.mlp.' have no known miss); the rest by name."""
    types = component_types().get(component)
    modules = owners(student, key) if types else None
    if modules is None:
        return COMPONENTS[component](key)
    by_type = any(isinstance(m, types) for m in modules)
    return by_type if component == 'norm' else by_type or COMPONENTS[component](key)

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

    Consistent modes (uniform, consecutive, random, l1_consistent) give one index set per pair of sizes
    (teacher t, student s), so a width keeps the same channels in every tensor: the residual stream,
    q/k/v and proj, fc1 rows and fc2 columns stay aligned (Section 3.2, "random selection with
    consistency"). l1_consistent ranks each embedding width (a size of a normalization weight) by the
    summed L1 norm of the teacher's slices of that width, one set for all tensors; other sizes are
    ranked per tensor, but a bias keeps its weight's rows (as under l1).
    The per-tensor modes treat q, k and v of a fused qkv as three tensors: random_inconsistent draws a
    fresh set for every tensor and dimension; l1 is Table 7's L1 pruning, every dimension of a tensor
    ranked by that tensor's own slice L1 norms ("L1 norm inevitably breaks consistency"), except that a
    neuron stays whole: a bias (or BatchNorm statistic) keeps the output rows its weight keeps.
    """
    PER_TENSOR = ('random_inconsistent', 'l1')

    def __init__(self, mode, seed, teacher_state=None):
        if mode not in ELEMENT_SELECTIONS:
            raise UserError(f"unknown element selection '{mode}'; choose one of {', '.join(ELEMENT_SELECTIONS)}")
        self.mode, self.seed = mode, seed
        self.teacher = teacher_state or {}
        self.cache = {}
        self.embed_widths = set()
        self.l1_scores = {}
        if mode == 'l1_consistent':
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
                    scores[size] += l1_norms(v.detach(), dim)
        self.l1_scores = scores

    def indices(self, t, s, tensor, dim, key, anchor=None):
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
        if self.mode == 'l1_consistent' and t in self.l1_scores:
            if (t, s) not in self.cache:
                self.cache[t, s] = largest(self.l1_scores[t], s)
            return self.cache[t, s]
        if self.mode in ('l1', 'l1_consistent'):
            if dim == 0 and anchor is not None and anchor.shape[0] == t:
                return top_l1(anchor, 0, s)  # a bias follows its weight's rows: the neuron stays whole
            return top_l1(tensor, dim, s)
        raise AssertionError(self.mode)

    def select(self, tensor, shape, key, source=None):
        """Select `tensor` down to `shape`, one dimension after the other (Algorithm 1). `source`: the
        teacher key of `tensor` (default `key`), which tells l1 the weight a bias belongs to."""
        if self.mode == 'magnitude':
            return magnitude_squeeze(tensor, shape)
        return self._select(tensor, shape, key, self.anchor(source or key, tensor))

    def select_qkv(self, tensor, shape, key, source=None):
        """A fused qkv split as [3, D, ...] (split_qkv). Per-tensor modes select q, k and v each as a
        tensor of its own (they are three Linears fused); the others select the whole, which keeps q, k
        and v on the width's one index set."""
        if self.mode not in self.PER_TENSOR:
            return self.select(tensor, shape, key, source)
        anchor = self.anchor(source or key, tensor[0])
        if anchor is not None:
            anchor = split_qkv(key, anchor)
        return torch.stack([self._select(part, shape[1:], f'{key}[{i}]', None if anchor is None else anchor[i])
                            for i, part in enumerate(tensor)])

    def anchor(self, source, tensor):
        """Under l1 and l1_consistent, the teacher weight whose output rows the 1-D tensor `source` belongs to,
        else None."""
        if self.mode not in ('l1', 'l1_consistent') or tensor.ndim != 1 or not source.endswith(NEURON_PARTS):
            return None
        weight = self.teacher.get(source.rsplit('.', 1)[0] + '.weight')
        if weight is None or weight.ndim == 0 or not weight.is_floating_point():
            return None
        return weight.detach().float()

    def _select(self, tensor, shape, key, anchor):
        out = tensor
        for dim, (t, s) in enumerate(zip(tensor.shape, shape)):
            if t != s:
                out = out.index_select(dim, self.indices(t, s, tensor, dim, key, anchor))
        return out


# 1-D tensors that belong to the output neurons of their module's weight (kept with them by l1)
NEURON_PARTS = ('.bias', '.running_mean', '.running_var')


BLOCK_ELEMENTS = 2 ** 22  # elements reduced at a time: temporaries (float64 sums, topk) stay block-sized


def l1_norms(tensor, dim):
    """L1 norm of every slice of `tensor` along `dim`, summed in float64 over blocks of its first dimension."""
    other = [d for d in range(tensor.ndim) if d != dim]
    if not other:
        return tensor.abs().double()
    blocks = tensor.split(max(1, BLOCK_ELEMENTS // max(1, tensor[0].numel())))
    sums = [block.abs().sum(dim=other, dtype=torch.float64) for block in blocks]
    return torch.cat(sums) if dim == 0 else torch.stack(sums).sum(0)


def largest(scores, k):
    """Indices of the k largest scores along the last dimension, in increasing order. Of equal scores the first
    ones are kept (a stable sort; topk leaves the choice among ties to its kernel): all-zero slices, a bias
    still at its init, give the same student on every machine."""
    return scores.sort(dim=-1, descending=True, stable=True).indices[..., :k].sort(dim=-1).values


def top_l1(tensor, dim, s):
    """The s slices along `dim` with the largest L1 norms, in increasing order (the first of equal norms)."""
    return largest(l1_norms(tensor, dim), s)


def magnitude_squeeze(tensor, shape):
    """Table 7's magnitude pruning: keep the tensor's largest-magnitude weights, in their original
    order, squeezed into the student's shape. Of equal magnitudes at the cut, the first ones are kept.
    Exact and in blocks of BLOCK_ELEMENTS: the n-th largest magnitude is found digit by digit (a radix select
    on its bits), then each block keeps what is above it, so the temporaries stay block-sized."""
    n = math.prod(shape)
    flat = tensor.reshape(-1)
    if flat.numel() == n:
        return tensor.reshape(shape)
    if not 0 < n < flat.numel():
        if n == 0:
            return tensor.new_empty(shape)
        raise ValueError(f'magnitude: cannot keep {n} of {flat.numel()} elements')
    blocks = flat.split(BLOCK_ELEMENTS)
    cut, ties = nth_largest_key(blocks, n)
    bits = INT_OF_SIZE[flat.element_size()]  # masked selection moves the bits: float8 has no kernel for it
    out, filled = torch.empty(n, dtype=bits), 0
    for block in blocks:
        keys = magnitude_keys(block)
        keep = keys > cut
        if ties:
            at_cut = keys == cut
            keep |= at_cut & (at_cut.cumsum(0) <= ties)
            ties -= min(ties, int(at_cut.sum()))
        kept = block.view(bits)[keep]
        out[filled:filled + len(kept)] = kept
        filled += len(kept)
    assert filled == n, (filled, n)
    return out.view(flat.dtype).reshape(shape)


INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def magnitude_keys(block):
    """Integers ordered as |block|: the bits of a non-negative float grow with its value. The sign bit is
    cleared: a float8 tensor's abs() keeps it on -0.0 (torch 2.15)."""
    m = magnitudes(block)
    if m.dtype == torch.float64:
        return m.view(torch.int64) & 0x7FFFFFFFFFFFFFFF
    return m.view(torch.int32) & 0x7FFFFFFF


def nth_largest_key(blocks, n):
    """(key of the n-th largest magnitude, how many elements at that key are among the n largest), found a byte
    at a time from the top: per byte, a 256-bin histogram of the elements whose higher bytes match so far."""
    width = magnitude_keys(blocks[0][:1]).element_size() * 8
    prefix, need = 0, n
    for shift in range(width - 8, -1, -8):
        counts = torch.zeros(256, dtype=torch.int64)
        for block in blocks:
            keys = magnitude_keys(block)
            if shift < width - 8:
                keys = keys[(keys >> (shift + 8)) == prefix]
            counts += torch.bincount(((keys >> shift) & 255).long(), minlength=256)
        from_top = counts.flip(0).cumsum(0)  # elements whose byte is at least 255, 254, ...
        i = int((from_top >= need).nonzero()[0])
        need -= int(from_top[i - 1]) if i else 0
        prefix = (prefix << 8) | (255 - i)
    return prefix, need


def magnitudes(tensor):
    """|tensor| as float32 (float64 for float64), whose bits magnitude_keys orders: a bf16, float16 or float8
    value is exact in float32, so every dtype is ranked by its exact values with one key width."""
    return tensor.abs().to(torch.float64 if tensor.dtype == torch.float64 else torch.float32)


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
                    f'or a list of teacher blocks such as 0,2,4 (per stage, ConvNeXt-T into ConvNeXt-F: '
                    f'0,1;0,1;0,2,3,5,6,8;0,1)')


def block_depths(keys):
    """{block group: number of blocks}, in order of appearance, e.g. {'blocks': 12} or
    {'stages.0.blocks': 3, 'stages.1.blocks': 3, ...}."""
    depths = {}
    for k in keys:
        m = BLOCK_KEY.match(k)
        if m:
            depths[m['group']] = max(depths.get(m['group'], 0), int(m['index']) + 1)
    return depths


def explicit_layers(selection):
    """None for a named mode; else the teacher blocks listed for each block group, e.g. '0,2;1,3' ->
    [[0, 2], [1, 3]]. Anything else is the unknown-mode error."""
    if selection in LAYER_SELECTIONS:
        return None
    try:
        return [[int(i) for i in group.split(',') if i.strip()] for group in selection.split(';')]
    except ValueError:
        layer_indices(selection, 1, 1)  # raises the unknown-mode error


def group_layers(selection, chosen, n_teacher, n_student, group):
    """The teacher block for each of a block group's n_student blocks: by the named mode, or the listed
    blocks `chosen` (one group's list from explicit_layers) once checked."""
    if chosen is None:
        return layer_indices(selection, n_teacher, n_student)
    if len(chosen) != n_student or not all(0 <= j < n_teacher for j in chosen):
        raise UserError(f"--layer_selection for '{group}' must list {n_student} teacher blocks in "
                        f'0..{n_teacher - 1}, got {",".join(map(str, chosen))}')
    return chosen


def layer_maps(teacher_keys, student_keys, selection='first'):
    """{block group: [teacher block for each student block]} for every group of the student."""
    t_depths, s_depths = block_depths(teacher_keys), block_depths(student_keys)
    explicit = explicit_layers(selection)
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
        chosen = None if explicit is None else explicit[i]
        maps[group] = group_layers(selection, chosen, t_depths[group], n_student, group)
    return maps


def teacher_key(student_key, maps):
    m = BLOCK_KEY.match(student_key)
    if m and m['group'] in maps:
        return f"{m['group']}.{maps[m['group']][int(m['index'])]}.{m['rest']}"
    return student_key


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
        if any(in_component(c, key, student) for c in exclude):
            out[key], entry['action'] = s_val.clone(), 'excluded'
            continue
        if is_classifier(key, s_layout) and not keep_head:
            out[key], entry['action'] = s_val.clone(), 'skipped'
            continue
        src = final_norm_alias(teacher_key(key, maps), t_state)
        if src not in t_state:
            raise UserError(f"student key '{key}' has no counterpart '{src}' in the teacher; "
                            f'teacher and student must be of the same model family')
        t_val = t_state[src]
        entry.update(source=src, teacher_shape=list(t_val.shape))
        if is_classifier(key, s_layout) and t_val.shape[0] != s_val.shape[0]:
            raise UserError(f"--keep_head: the teacher's classifier '{src}' has {t_val.shape[0]} classes, "
                            f'the student {s_val.shape[0]}; pass --num_classes {t_val.shape[0]} or drop --keep_head')
        value, action = map_component(key, t_val, s_val, t_layout, s_layout, selector, src)
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
        known = m['group'] in t_groups if m else final_norm_alias(key, t_state) in t_state
        if not known and (keep_head or not is_classifier(key, s_layout)):
            raise UserError(f"student key '{key}' has no counterpart in the teacher; teacher and student "
                            f'must be of the same model family')


# A ViT with global average pooling (timm global_pool='avg') normalizes after pooling, in fc_norm, and has
# no final norm; a class-token teacher has the final norm and no fc_norm. Both are the encoder's last
# LayerNorm over the same width, so each takes the other's weights.
FINAL_NORMS = (('fc_norm.', 'norm.'), ('norm.', 'fc_norm.'))


def final_norm_alias(key, t_state):
    """`key`, or its counterpart among norm.* / fc_norm.* when only that one is in the teacher."""
    if key in t_state:
        return key
    for mine, other in FINAL_NORMS:
        if key.startswith(mine) and other + key[len(mine):] in t_state:
            return other + key[len(mine):]
    return key


def map_component(key, t_val, s_val, t_layout, s_layout, selector, source=None):
    """One student tensor from its teacher counterpart (teacher key `source`, default `key`): adapt the
    layout, then select elements."""
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
        value = selector.select_qkv(t_split, s_shape, key, source).reshape(s_val.shape)
    else:
        check_not_wider(key, t_val.shape, s_val.shape)
        value = selector.select(t_val, s_val.shape, key, source)
    if action is None:
        action = 'copied' if tuple(t_val.shape) == tuple(s_val.shape) else 'selected'
    return value, action


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
# Command line.

# The official release's interface: --model_type picks the paper's student and default teacher.
OFFICIAL = {
    'vit': ('vit_tiny_patch16_224', 'vit_small_patch16_224_in21k'),
    'convnext': ('convnext_femto_linear', 'convnext_tiny_in22k'),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the description's line breaks and shows each flag's default."""


def get_args_parser():
    p = utils.ArgumentParser('weight_selection.py', description=__doc__.split('\n\n')[0],
                             formatter_class=HelpFormatter)
    p.add_argument('--teacher', help='timm model name, e.g. vit_small_patch16_224.augreg_in21k or convnext_tiny.fb_in22k')
    p.add_argument('--teacher_checkpoint', default=None,
                   help='local weights (.pth/.pt/.bin, .safetensors, or timm .npz); default: timm pretrained weights')
    p.add_argument('--trust_checkpoint', type=utils.str2bool, default=False,
                   help='fully unpickle a --teacher_checkpoint that holds Python objects besides tensors (this can '
                        'run code: only for files you trust); default: such files are refused')
    p.add_argument('--teacher_kwargs', default='', help='JSON keyword arguments for timm.create_model of the teacher')
    p.add_argument('--student', help='timm model name or one registered in models/, e.g. vit_tiny_patch16_224')
    p.add_argument('--student_kwargs', default='', help='JSON keyword arguments for the student, e.g. {"depth": 6}')
    p.add_argument('--num_classes', type=int, default=None, help="the student's number of classes")
    p.add_argument('--layer_selection', default='first',
                   help='first | uniform | mid | last | explicit teacher blocks 0,2,4,... (per stage: a;b;c;d)')
    p.add_argument('--element_selection', default='uniform', choices=ELEMENT_SELECTIONS,
                   help='l1: per-tensor L1 pruning (Table 7); l1_consistent: one L1 ranking per embedding width')
    p.add_argument('--seed', type=int, default=0, help='seed of random selections and of the student init')
    p.add_argument('--exclude', default='', help=f'components left at random init: {",".join(COMPONENTS)}')
    p.add_argument('--keep_head', action='store_true', help="also select the classifier (student keeps the teacher's classes)")
    p.add_argument('--output', default=None,
                   help='file to write {"model": state_dict, "meta": {...}}; a .safetensors name writes safetensors '
                        '(recommended: no pickle) with the meta as JSON in its header')
    p.add_argument('--quiet', action='store_true', help='print only the summary line')
    hf = p.add_argument_group('Hugging Face teachers (--teacher a folder with config.json; see hf_selection/)')
    hf.add_argument('--student_config', default=None,
                    help='JSON overrides of the teacher\'s config, e.g. {"hidden_size": 1024, "num_hidden_layers": 8}, '
                         'or a config.json file or a folder holding one; --output is then a folder')
    hf.add_argument('--head_selection', default='auto', choices=('auto', 'heads', 'dims'),
                    help='attention: whole heads (GQA groups intact) or per dimension; auto: heads for rotary models '
                         '(dims for the per-tensor element selections)')
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
            if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
                raise UserError(f'--output_dir {args.output_dir} is a file; give a folder')
            args.output = os.path.join(args.output_dir, f'{args.model_type}.pth')
    missing = [f for f in ('teacher', 'student', 'output') if not getattr(args, f)]
    if missing:
        raise UserError(f"missing --{', --'.join(missing)}; e.g. --teacher vit_small_patch16_224.augreg_in21k "
                        f'--student vit_tiny_patch16_224 --output ws.pth')
    return args


# Flags of one path only: given to the other, they would be ignored without a word.
TIMM_ONLY = ('teacher_checkpoint', 'trust_checkpoint', 'teacher_kwargs', 'student', 'student_kwargs', 'num_classes',
             'keep_head', 'model_type', 'pretrained_model', 'output_dir')
HF_ONLY = ('head_selection', 'max_shard_size')


def refuse_flags(args, parser, flags, why):
    given = [f for f in flags if getattr(args, f) != parser.get_default(f)]
    if given:
        raise UserError(f'--{given[0]} {why}')


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    import hf_selection
    import timm
    local_hf = hf_selection.is_hf_teacher(args.teacher)
    if args.student_config and not local_hf and timm.is_model(args.teacher):  # a timm name (a tag allowed)
        raise UserError(f"--student_config is for Hugging Face teachers (a folder with config.json, or a hub id); "
                        f"--teacher {args.teacher} is a timm model: give its student with --student NAME "
                        f"[--student_kwargs '{{...}}']")
    if local_hf or args.student_config:  # a local folder, or with --student_config a hub id
        why = ("is for timm models; with a Hugging Face teacher the student is --student_config '{...}' (the "
               "teacher's config.json with overrides)") if local_hf else \
            ('is for timm teachers and --student_config for Hugging Face ones (a folder with config.json, or a hub '
             'id): for a timm teacher give --student NAME instead of --student_config, for a Hugging Face one leave '
             'this flag out')
        refuse_flags(args, parser, TIMM_ONLY, why)
        return hf_selection.run(args)
    refuse_flags(args, parser, HF_ONLY, 'is for Hugging Face teachers (a folder with config.json) and has no effect '
                                        'with a timm teacher; leave it out')
    args = resolve_args(args)
    teacher_kwargs = utils.parse_json_dict(args.teacher_kwargs, '--teacher_kwargs')
    student_kwargs = utils.parse_json_dict(args.student_kwargs, '--student_kwargs')
    exclude = [c.strip() for c in args.exclude.split(',') if c.strip()]
    if args.num_classes is not None and args.num_classes < 0:  # 0 is timm's headless model (no classifier)
        raise UserError(f'--num_classes {args.num_classes}: give the number of classes (0: no classifier)')
    # the official --output_dir is created only when the selection is written: a failure leaves no empty folder
    utils.check_writable(args.output, create_folder=bool(args.model_type and args.output_dir))
    start = time.time()
    try:
        teacher_state, teacher_layout = load_pretrained(args.teacher, args.teacher_checkpoint, teacher_kwargs,
                                                        trust=args.trust_checkpoint)
    except UserError as e:  # the user typed --model_type, not the --teacher the message names
        if args.model_type and not args.pretrained_model and args.teacher == OFFICIAL[args.model_type][1]:
            raise UserError(f'{e} (the default teacher of --model_type {args.model_type}; name another with '
                            f'--pretrained_model)') from None
        raise
    torch.manual_seed(args.seed)
    if args.num_classes is not None:
        student_kwargs.setdefault('num_classes', args.num_classes)
    student = create_model(args.student, '--student', **student_kwargs)
    state, report = select_weights(teacher_state, student, args.layer_selection, args.element_selection,
                                   args.seed, exclude, args.keep_head, teacher_layout=teacher_layout)
    summary = summarize(report, teacher_state)
    meta = {
        'teacher': args.teacher, 'teacher_kwargs': teacher_kwargs,
        'teacher_checkpoint': args.teacher_checkpoint,
        'teacher_checkpoint_sha256': utils.sha256_file(args.teacher_checkpoint) if args.teacher_checkpoint else None,
        'student': args.student, 'student_kwargs': student_kwargs,
        'layer_selection': args.layer_selection, 'element_selection': args.element_selection,
        'seed': args.seed, 'exclude': exclude, 'keep_head': args.keep_head,
        'layer_maps': layer_maps(teacher_state.keys(), state.keys(), args.layer_selection),
        'summary': summary, 'report': report,
        'versions': utils.versions(('timm',)),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    save_selection(state, meta, args.output)
    print_summary(args, meta, time.time() - start)


def save_selection(state, meta, path):
    """{'model': state, 'meta': meta} as a torch file, or for a .safetensors path the tensors with the meta as
    JSON in the header (safetensors metadata maps str to str); both are read without unpickling code."""
    if not path.endswith('.safetensors'):
        utils.atomic_save({'model': state, 'meta': meta}, path)
        return
    from safetensors.torch import save
    # own contiguous copies: selected tensors can be views sharing a teacher tensor, which safetensors refuses
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    data = save(tensors, metadata={'meta': json.dumps(meta, default=str)})
    utils.atomic_write(path, lambda f: f.write(data))


def print_summary(args, meta, seconds):
    s = meta['summary']
    if not args.quiet:
        for group, indices in meta['layer_maps'].items():
            print(f'layers  {group}: student 0..{len(indices) - 1} <- teacher {indices}')
        for key, e in meta['report'].items():
            if e['action'] == 'excluded':  # no teacher tensor: the student's own init
                print(f"excluded  {key} {tuple(e['shape'])}: the student's own initialization")
            elif e['action'] == 'resampled' or key == 'pos_embed':
                print(f"{e['action']:9s} {key} {tuple(e['teacher_shape'])} -> {tuple(e['shape'])}")
    acts = ', '.join(f'{n} {a}' for a, n in sorted(s['actions'].items()))
    print(f"{args.student} <- {args.teacher} ({args.layer_selection} layers, {args.element_selection} elements): "
          f"{acts}; inherited {s['inherited_params'] / 1e6:.2f}M of the student's {s['student_params'] / 1e6:.2f}M "
          f"parameters = {100 * s['inherited_params'] / s['teacher_params']:.1f}% of the teacher's "
          f"{s['teacher_params'] / 1e6:.2f}M; wrote {args.output} in {seconds:.1f}s")


if __name__ == '__main__':
    utils.run_cli(main, clean_on_sigterm=True)  # no half-written student is left behind
