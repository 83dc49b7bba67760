"""Element selection: the teacher indices each axis keeps (one set per width, Algorithm 1's consistency), fused and
interleaved axes, and the selections that choose inside each tensor (the paper's ablations)."""
import itertools
import math
import re

import torch

from utils import UserError
from weight_selection import (BLOCK_ELEMENTS, INT_OF_SIZE, ElementSelector, _generator, l1_norms, largest,
                              magnitude_keys, magnitude_squeeze, random_indices, top_l1)

from .families import DROPPED, kind_of
from .teacher import take


# Element selection: one index set per axis.

class IndexChooser:
    """Indices of t kept for s under a consistent element selection (uniform, consecutive, random): weight_selection's
    ElementSelector, whose index set depends on (t, s) only, so a width keeps the same indices in every tensor."""

    def __init__(self, mode, seed):
        self.selector = ElementSelector(mode, seed)

    def pick(self, t, s):
        return self.selector.indices(t, s, tensor=None, dim=None, key=None)


def expand_heads(heads, head_dim):
    """Rows of whole heads: head h covers rows h*head_dim .. (h+1)*head_dim - 1."""
    return torch.tensor([h * head_dim + d for h in heads for d in range(head_dim)], dtype=torch.long)


def head_selection(t, s, chooser, head_dim_settable=True):
    """(query heads, key/value heads) the student keeps, whole. Under GQA the key/value heads are chosen
    first and each keeps query heads of its own group, so every query head keeps its own KV head."""
    if s.head_dim != t.head_dim:
        or_head_dim = ' (or set head_dim)' if head_dim_settable else ''
        raise UserError(f'--head_selection heads keeps whole heads of {t.head_dim} dims, but the student\'s heads '
                        f'have {s.head_dim}; choose num_attention_heads so that hidden/heads = {t.head_dim}'
                        f'{or_head_dim}, or pass --head_selection dims')
    g_t, g_s = t.heads // t.kv_heads, s.heads // s.kv_heads
    if g_s > g_t:
        raise UserError(f'--head_selection heads: the student has {g_s} query heads per key/value head, the teacher '
                        f'{g_t}; a query head cannot keep its own key/value head; use fewer query heads per '
                        f'key/value head or --head_selection dims')
    kv = chooser.pick(t.kv_heads, s.kv_heads).tolist()
    within = chooser.pick(g_t, g_s).tolist()
    return [k * g_t + j for k in kv for j in within], kv


def token_axes(s):
    """Axes whose indices are tokens or positions: a student keeps the first ones, whatever the selection."""
    return {'vocab': torch.arange(s.vocab), 'pos': torch.arange(s.positions)}


# Fused axes: the axes of the tensors side by side in one (GPT-2's c_attn and Phi-3's qkv_proj hold q, k and v;
# Phi-3's gate_up_proj and DINOv2's SwiGLU weights_in the gate and up projections; Dinov2ForImageClassification's
# classifier reads two hidden vectors side by side).
FUSED = {'qkv': ('q', 'kv', 'kv'), 'gate_up': ('inter', 'inter'), 'hidden_pair': ('hidden', 'hidden')}
# Interleaved axes: parts alternating in units (gpt-oss's gate_up_proj: gate and up in turn, a column each;
# GPT-NeoX's query_key_value: q, k and v in turn, a head's dims each). Axis: (part axis, parts, Widths field of a
# unit's size, or None for 1).
INTERLEAVED = {'gate_up_pairs': ('expert_inter', 2, None), 'qkv_per_head': ('q', 3, 'head_dim')}


def units(name, w):
    """An interleaved axis's (parts, unit size) for a model's Widths."""
    _, n, field = INTERLEAVED[name]
    return n, getattr(w, field) if field else 1


def interleave(name, indices, t, s):
    """An interleaved axis's kept indices from its part axis's (the same set in every part): the teacher unit and
    offset of each kept part index, in the student's order (unit, part, offset)."""
    (n, unit_t), (_, unit_s) = units(name, t), units(name, s)
    base = (indices // unit_t * n * unit_t + indices % unit_t).view(-1, unit_s)
    return torch.stack([base + p * unit_t for p in range(n)], 1).flatten()


def has_parts(name):
    """Whether an axis holds several tensors' axes (fused side by side, or interleaved)."""
    return name in FUSED or name in INTERLEAVED


def parts_of(name):
    """The axes of a fused or interleaved axis's parts, in order."""
    return FUSED[name] if name in FUSED else (INTERLEAVED[name][0],) * INTERLEAVED[name][1]


def split_parts(tensor, dim, name, w):
    """A fused or interleaved axis's parts, for a model's Widths."""
    if name in INTERLEAVED:
        (n, unit), shape = units(name, w), tensor.shape
        grouped = tensor.reshape(*shape[:dim], -1, n, unit, *shape[dim + 1:])
        return [grouped.select(dim + 1, p).flatten(dim, dim + 1) for p in range(n)]
    return list(tensor.split(part_sizes(name, w), dim))


def join_parts(parts, dim, name, w):
    """split_parts undone, for a model's Widths."""
    if name not in INTERLEAVED:
        return torch.cat(parts, dim)
    _, unit = units(name, w)
    grouped = [part.reshape(*part.shape[:dim], -1, unit, *part.shape[dim + 1:]) for part in parts]
    return torch.stack(grouped, dim + 1).flatten(dim, dim + 2)


def part_sizes(fused, w):
    """The widths of a fused axis's parts, in order, for a model's Widths."""
    sizes = axis_sizes(w)
    return [sizes[a] for a in FUSED[fused]]


def fuse(fused, axes, t):
    """A fused axis's kept indices: each part's, offset to where the part starts."""
    offsets = [0, *itertools.accumulate(part_sizes(fused, t))]
    return torch.cat([start + axes[a] for start, a in zip(offsets, FUSED[fused])])


def axis_indices(t, s, family, head_mode, chooser):
    """{axis name: teacher indices kept} for every axis of the family (a consistent element selection)."""
    hidden = chooser.pick(t.hidden, s.hidden)
    axes = {'hidden': hidden, 'inter': chooser.pick(t.inter, s.inter), **token_axes(s),
            'expert_inter': chooser.pick(t.expert_inter, s.expert_inter),
            'shared_inter': chooser.pick(t.shared_inter, s.shared_inter), 'pooler': chooser.pick(t.pooler, s.pooler)}
    if head_mode == 'heads':
        q_heads, kv_heads = head_selection(t, s, chooser, 'head_dim' not in family.fixed_fields)
        axes['q'], axes['kv'] = expand_heads(q_heads, t.head_dim), expand_heads(kv_heads, t.head_dim)
    elif family.attn_is_hidden:  # GPT-2, BERT: attention width = model width, so q, k, v each take its set
        axes['q'] = axes['kv'] = hidden
    else:
        axes['q'] = chooser.pick(t.heads * t.head_dim, s.heads * s.head_dim)
        axes['kv'] = chooser.pick(t.kv_heads * t.head_dim, s.kv_heads * s.head_dim)
    for fused in FUSED:
        axes[fused] = fuse(fused, axes, t)
    for name, (part, _, _) in INTERLEAVED.items():
        axes[name] = interleave(name, axes[part], t, s)
    # one value per query head (gpt-oss's sinks): those of the heads kept, or per dimension chosen as any width
    axes['heads'] = torch.tensor(q_heads) if head_mode == 'heads' else chooser.pick(t.heads, s.heads)
    # a per-head norm (Qwen3's q_norm, k_norm): whole when heads are kept whole, else the within-head dims
    # chosen as for any width (per dimension, a student head mixes teacher heads, so no choice is exact)
    axes['head_dim'] = chooser.pick(t.head_dim, s.head_dim)
    return axes


def axis_sizes(w):
    """{axis name: size} of a model's Widths."""
    q, kv = w.heads * w.head_dim, w.kv_heads * w.head_dim
    return {'hidden': w.hidden, 'inter': w.inter, 'vocab': w.vocab, 'pos': w.positions, 'q': q, 'kv': kv,
            'qkv': q + 2 * kv, 'gate_up': 2 * w.inter, 'head_dim': w.head_dim, 'experts': w.experts,
            'expert_inter': w.expert_inter, 'shared_inter': w.shared_inter, 'hidden_pair': 2 * w.hidden,
            'pooler': w.pooler, 'heads': w.heads, 'gate_up_pairs': 2 * w.expert_inter, 'each_expert': w.experts,
            'qkv_per_head': 3 * q}


# ----------------------------------------------------------------------------------------------
# Element selections that look at one tensor at a time (the paper's ablations): every axis not fixed for all
# tensors is chosen inside each tensor, from its values (l1, magnitude) or its key (random_inconsistent),
# as weight_selection's ElementSelector does for timm models.

def ranked_widths(t):
    """The axes l1_consistent ranks together: the hidden width and, as the timm path ranks by size, an attention
    width of the same size (always in GPT-2 and BERT; in LLaMA-style models when heads x head_dim = hidden)."""
    sizes = axis_sizes(t)
    return {'hidden'} | {a for a in ('q', 'kv') if sizes[a] == t.hidden}


def hidden_l1_scores(teacher, family, t):
    """l1_consistent: each hidden index's summed L1 norm over every teacher tensor's slices along the ranked widths
    (q, k and v of a fused qkv each counted as one). One pass over the whole teacher, a tensor at a time."""
    ranked = ranked_widths(t)
    scores = torch.zeros(t.hidden, dtype=torch.float64)
    for key in teacher.in_file_order():
        if DROPPED.search(key):
            continue
        names = family.tensors[kind_of(key, family)]
        tensor = teacher.read(key)
        for dim, name in enumerate(names):
            parts = zip(split_parts(tensor, dim, name, t), parts_of(name)) if has_parts(name) else [(tensor, name)]
            for part, part_name in parts:
                if part_name in ranked:
                    scores += l1_norms(part, dim)
    return scores


def tensorwise_axes(t, s, family, mode, teacher, experts):
    """The axes fixed for every tensor under a tensorwise selection: tokens and positions (the first ones), the
    experts kept, and, for l1_consistent, the ranked widths (their top indices by the whole teacher's L1 sums,
    Section 3.2's consistency)."""
    axes = {**token_axes(s), 'experts': experts, 'each_expert': experts}
    if mode == 'l1_consistent':
        scores, s_sizes = hidden_l1_scores(teacher, family, t), axis_sizes(s)
        for name in ranked_widths(t):
            axes[name] = largest(scores, s_sizes[name])
    return axes


ROW_AXES = ('vocab', 'pos', 'same', 'experts', 'each_expert')  # a row is one token, position, output or expert


class TensorwiseSelector:
    """Makes a student tensor from its whole teacher tensor under random_inconsistent, l1, l1_consistent or
    magnitude, as weight_selection's ElementSelector does for timm models:
      - random_inconsistent: a fresh random index set per student tensor and dimension;
      - l1: every dimension ranked by the tensor's own slice L1 norms, except that a bias keeps the output
        neurons its weight keeps (Table 7's L1 pruning);
      - l1_consistent: the hidden width (and attention widths of its size) ranked over the whole teacher,
        other widths per tensor, a bias with its weight's neurons as under l1;
      - magnitude: the tensor's largest-magnitude weights in their order, squeezed into the student's shape.
    A fused tensor is its parts (q, k, v; gate, up) but under magnitude, which squeezes it whole as timm's qkv. Token and
    position rows stay themselves: the first ones are kept, and magnitude squeezes each row on its own (a
    token's row holds only its values). A bias follows its weight along the axis they share, the weight's output
    axis (a row of a Linear, a column of GPT-2's [in, out] Conv1D and of gpt-oss's experts). A stack of experts
    (gpt-oss) is one tensor per expert, as in checkpoints that store experts one by one."""

    def __init__(self, mode, seed, family, t, s, fixed):
        self.mode, self.seed, self.family, self.fixed, self.t, self.s = mode, seed, family, fixed, t, s
        self.held, self.last = None, None  # the previous plan's last read, offered to this one (see read)

    def read(self, teacher, key, indices=()):
        """teacher.read, except that the previous plan's last read is reused when it is the one asked for: a
        bias's weight, read to rank its neurons, is the next plan's tensor (x.bias sorts before x.weight), and a
        weight is the anchor of the bias after it (gpt-oss's x before x_bias). __call__ keeps it only for a plan
        that reads it, so no other plan's reads happen beside it and the peak memory stays as it was."""
        held, self.held = self.held, None
        if held is not None and held[0] == key and len(held[1]) == len(indices) \
                and all(torch.equal(a, b) for a, b in zip(held[1], indices)):
            tensor = held[2]
        else:
            self.held, held = held, None  # not this read: kept for the plan's other one
            tensor = teacher.read(key, indices)
        self.last = (key, indices, tensor)
        return tensor

    def __call__(self, p, teacher):
        wanted = (p.source, self.anchor_key(p, teacher))
        self.held = self.last if self.last is not None and self.last[0] in wanted else None
        self.last = None
        try:
            return self.make(p, teacher)
        finally:
            self.held = None

    def make(self, p, teacher):
        if p.names[:1] != ('each_expert',):
            return self.one(self.read(teacher, p.source), p.names, p.shape, p.key, self.anchor(p, teacher))
        # a stack of experts: only the kept ones are read, and each is a tensor of its own, as in checkpoints that
        # store experts one by one (magnitude squeezes each expert's row on its own)
        experts = self.fixed['each_expert']
        tensor, anchor = self.read(teacher, p.source, [experts]), self.anchor(p, teacher, [experts])
        if self.mode == 'magnitude':
            return self.magnitude(tensor, ('same', *p.names[1:]), p.shape)
        return torch.stack([self.one(tensor[k], p.names[1:], p.shape[1:], f'{p.key}[{e}]',
                                     None if anchor is None else (anchor[0][k], anchor[1][1:]))
                            for k, e in enumerate(experts.tolist())])

    def one(self, tensor, names, shape, key, anchor):
        fused = [a for a in names if has_parts(a)]
        if not fused or self.mode == 'magnitude':  # magnitude squeezes a fused tensor whole, as timm's qkv
            return self.select(tensor, names, shape, key, anchor)
        name, parts = fused[0], []
        dim, part_names = names.index(name), parts_of(name)
        t_parts = split_parts(tensor, dim, name, self.t)
        anchors = [None] * len(t_parts)
        if anchor is not None:  # the weight's parts, along its own axis of that name
            a_dim = anchor[1].index(name)
            anchors = [(a, anchor[1][:a_dim] + (n,) + anchor[1][a_dim + 1:])
                       for a, n in zip(split_parts(anchor[0], a_dim, name, self.t), part_names)]
        s_sizes = axis_sizes(self.s)
        for i, (part, part_name) in enumerate(zip(t_parts, part_names)):
            p_names, p_shape = list(names), list(shape)
            p_names[dim], p_shape[dim] = part_name, s_sizes[part_name]
            parts.append(self.select(part, p_names, p_shape, f'{key}[{i}]', anchors[i]))
        return join_parts(parts, dim, name, self.s)

    def anchor_key(self, p, teacher):
        """Under l1 and l1_consistent, the teacher weight whose neurons the bias p belongs to (x.bias: x.weight;
        gpt-oss's x_bias: x); else None."""
        m = re.search(r'(\.|_)bias$', p.source)
        if self.mode not in ('l1', 'l1_consistent') or m is None:
            return None
        weight = p.source[:m.start()] + ('.weight' if m[1] == '.' else '')
        return weight if weight in teacher.header else None

    def anchor(self, p, teacher, indices=()):
        """anchor_key's weight, read (with `indices` as for teacher.read), and its axis names; or None."""
        weight = self.anchor_key(p, teacher)
        if weight is None:
            return None
        return self.read(teacher, weight, indices), self.family.tensors[kind_of(weight, self.family)]

    def select(self, tensor, names, shape, key, anchor):
        if self.mode == 'magnitude':
            return self.magnitude(tensor, names, shape)
        out = tensor
        for dim, (name, s) in enumerate(zip(names, shape)):
            idx = self.indices(tensor, dim, name, s, key, anchor)
            if idx is not None:
                out = take(out, dim, idx)
        return out

    def indices(self, tensor, dim, name, s, key, anchor):
        t = tensor.shape[dim]
        if name in self.fixed:
            return self.fixed[name]
        if name == 'same' or t == s:
            return None
        if self.mode == 'random_inconsistent':
            return random_indices(t, s, _generator(self.seed, key, dim))
        if anchor is not None and name in anchor[1]:  # a bias follows its weight's neurons: its output axis, the
            # first of that name ([out, in] BERT pooler; no [in, out] weight repeats an axis)
            return top_l1(anchor[0], anchor[1].index(name), s)
        return top_l1(tensor, dim, s)

    def magnitude(self, tensor, names, shape):
        lead = next((d for d, name in enumerate(names) if name not in ROW_AXES), len(names))  # the row dimensions
        if lead == 0:
            return magnitude_squeeze(tensor, shape)
        for dim in range(lead):
            if names[dim] in self.fixed:
                tensor = take(tensor, dim, self.fixed[names[dim]])
        if tuple(tensor.shape) == tuple(shape):
            return tensor
        flat = tensor.reshape(math.prod(shape[:lead]), -1)  # a ViT's (1, positions, hidden): rows of positions
        width = math.prod(shape[lead:])
        bits = flat.view(INT_OF_SIZE[flat.element_size()])  # gather has no float8 kernel: move the bits
        rows, step = [], max(1, BLOCK_ELEMENTS // flat.shape[1])  # each row on its own, a block of rows at a time
        for i in range(0, flat.shape[0], step):
            keep = largest(magnitude_keys(flat[i:i + step]), width)  # as magnitude_squeeze: the first of ties
            rows.append(bits[i:i + step].gather(1, keep))
        return torch.cat(rows).view(tensor.dtype).reshape(shape)
