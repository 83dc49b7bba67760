"""The plan: every student tensor, its teacher tensor and the indices it keeps, decided before anything is read;
then each tensor made from it (read and selected, or freshly initialized), one ahead of the writer."""
import math
import re
from dataclasses import dataclass, field

import torch

from safetensors_io import ST_DTYPES
from utils import UserError
from weight_selection import _generator

from .axes import INTERLEAVED, axis_sizes, units
from .families import DROPPED, EMBED_KEYS, kind_of, student_keys


@dataclass
class Planned:
    key: str                 # student key
    source: str              # teacher key; None when excluded (initialized instead)
    shape: tuple
    dtype: str               # safetensors dtype, the teacher's
    teacher_shape: tuple = ()
    indices: list = field(default_factory=list)  # per dimension: teacher indices kept, or None for all
    names: tuple = ()        # per dimension: its axis ('hidden', 'inter', 'q', ..., or 'same')
    tensorwise: bool = False  # indices chosen inside the tensor when it is made (TensorwiseSelector)
    reordered: bool = False  # an interleaved axis whose unit differs (a head's dims): rows move though all stay

    @property
    def nbytes(self):
        return math.prod(self.shape) * ST_DTYPES[self.dtype].itemsize


def component_of(key):
    if key.endswith(EMBED_KEYS):
        return 'embed'
    if 'norm' in key.lower() or re.search(r'(^|\.)ln_', key):
        return 'norm'
    if re.search(r'(^|\.)embeddings\.', key):  # a ViT's class token, positions and patch embedding
        return 'embed'
    if 'attn' in key or 'attention.' in key:
        return 'attn'
    return 'mlp' if re.search(r'(mlp|intermediate|output|block_sparse_moe)\.', key) else None


def plan_one(s_key, t_key, kind, teacher, family, t, s, axes, excluded, experts=None):
    """A student tensor's plan. `axes`: the teacher indices kept along each axis, the same in every tensor; None
    under a tensorwise selection, where the whole teacher tensor is read and TensorwiseSelector chooses, but for
    a stack's experts: `experts`, the kept ones, which alone it reads (and the readahead asks for)."""
    dtype, t_shape, _ = teacher.header[t_key]
    names = family.tensors[kind]
    t_sizes, s_sizes = axis_sizes(t), axis_sizes(s)
    expected = tuple(n if a == 'same' else t_sizes[a] for a, n in zip(names, t_shape))
    if t_shape != expected or len(t_shape) != len(names):
        raise UserError(f"teacher tensor '{t_key}' has shape {t_shape}, its config.json implies {expected}; "
                        f'the checkpoint does not match its config')
    shape = tuple(n if a == 'same' else s_sizes[a] for a, n in zip(names, t_shape))
    if excluded:
        return Planned(s_key, None, shape, dtype, t_shape, names=names)
    if axes is None:
        reordered = any(a in INTERLEAVED and units(a, t) != units(a, s) for a in names)
        indices = [torch.tensor(experts) if a == 'each_expert' and experts is not None and len(experts) < n else None
                   for a, n in zip(names, t_shape)]
        return Planned(s_key, t_key, shape, dtype, t_shape, indices, names, tensorwise=True, reordered=reordered)
    # an axis keeping all its indices in order is read whole; all of them in another order (GPT-NeoX's q, k and v
    # rows regrouped into fewer, wider heads) is not
    indices = [None if a == 'same' or torch.equal(axes[a], torch.arange(n)) else axes[a]
               for a, n in zip(names, t_shape)]
    return Planned(s_key, t_key, shape, dtype, t_shape, indices, names)


def has_output_layer(architecture):
    """Whether a model class ends in the vocabulary projection (family.head): a language-model head, not a base
    model or a classifier. Without an architecture, as before: yes."""
    return not architecture or bool(re.search(r'CausalLM|LMHead|MaskedLM|PreTraining|ConditionalGeneration',
                                              architecture))


def plan_tensors(teacher, family, t, s, axes, layer_map, expert_map, tied, exclude, teacher_tied, architecture):
    """(planned student tensors in the teacher's file order (reads go forward through each shard), teacher
    tensors left out because the student ties what the teacher does not). `tied`, and `teacher_tied`: whether the
    student's, and the teacher's, output layer is the input embedding; `architecture`: the teacher's model class."""
    planned, unused, embed_key, embed_kind = [], [], None, None
    for t_key in teacher.in_file_order():
        if DROPPED.search(t_key):
            continue
        s_keys, kind = student_keys(t_key, family, layer_map, expert_map)
        if kind in family.embed:
            embed_key, embed_kind = t_key, kind
        if kind == family.head and tied:
            if not teacher_tied:
                unused.append(t_key)
            continue  # a tied student shares the embedding
        for s_key in s_keys:
            planned.append(plan_one(s_key, t_key, kind, teacher, family, t, s, axes,
                                    component_of(s_key) in exclude, expert_map))
    if family.head_bias:
        planned = plan_head_bias(planned, teacher, family, t, s, axes, tied)
    base_model = family.base_prefix and embed_key is not None and not embed_key.startswith(family.base_prefix)
    if family.head and not tied and not any(p.key == family.head for p in planned) and embed_key is not None \
            and has_output_layer(architecture) and not base_model:
        if not teacher_tied:
            raise UserError(f"the teacher has no '{family.head}', its output layer, though its config.json unties it "
                            f'from the input embedding ({architecture or "no architectures"}); the checkpoint is '
                            f'incomplete')
        # an untied student of a tied teacher: its output layer starts as the shared embedding
        planned.append(plan_one(family.head, embed_key, embed_kind, teacher, family, t, s, axes,
                                'embed' in exclude))
    return planned, unused


def plan_head_bias(planned, teacher, family, t, s, axes, tied):
    """BERT's output bias, cls.predictions.decoder.bias, is cls.predictions.bias in a tied model, and a tied file
    stores it as the latter, an untied one as both. The student's output bias is the teacher's: decoder.bias where
    the file has it (an untied teacher uses that one alone), else cls.predictions.bias; a tied student stores it as
    cls.predictions.bias, an untied one as decoder.bias, beside the teacher's cls.predictions.bias (or the same)."""
    own, shared = family.head_bias
    have = [k for k in (own, shared) if k in teacher.header]
    if not have:  # a base model or a classifier: no output layer
        return planned
    sources = {shared: have[0]} if tied else {own: have[0], shared: have[-1]}
    biases = sorted((plan_one(key, source, source, teacher, family, t, s, axes, False)
                     for key, source in sources.items()),
                    key=lambda p: (teacher.where[p.source], teacher.header[p.source][2][0]))  # in file order
    at = next((i for i, p in enumerate(planned) if p.key in (own, shared)), len(planned))  # where the file has them
    rest = [p for p in planned if p.key not in (own, shared)]
    return rest[:at] + biases + rest[at:]


def check_layers_whole(teacher, family, t, dense):
    """Every teacher layer holds the tensors its like layers hold (those with experts; those in `dense`, without),
    and a layer with experts holds every tensor of each of its t.experts experts. A checkpoint that lacks one stops
    here, rather than leaving a student tensor to a random init when the student loads."""
    kinds, experts, prefix = {}, {}, 'layers'
    for key in teacher.header:
        m = family.block.match(key)
        if m is None or DROPPED.search(key):
            continue
        prefix, layer, kind = m[1], int(m[2]), kind_of(key, family)
        kinds.setdefault(layer, set()).add(kind)
        e = family.expert_key.match(m[3]) if family.expert_key else None
        if e:
            experts.setdefault((layer, kind), set()).add(int(e[2]))
    mismatch = 'the checkpoint does not match its config'
    for group in ([i for i in range(t.layers) if i in dense], [i for i in range(t.layers) if i not in dense]):
        alike = set().union(*(kinds.get(i, set()) for i in group))
        for i in group:
            lost = sorted(alike - kinds.get(i, set()))
            if lost:
                raise UserError(f"the teacher has no '{prefix}.{i}.{lost[0]}' though its other layers have it; "
                                f'{mismatch}')
    for (layer, kind), have in sorted(experts.items()):
        lost = [e for e in range(t.experts) if e not in have]
        if lost:
            raise UserError(f"the teacher has no '{prefix}.{layer}.{kind.replace('*', str(lost[0]))}' though its "
                            f'config.json gives each layer {t.experts} experts; {mismatch}')


def produce(p, teacher, std, seed, selector, norm_init=1.0):
    """The student tensor of a plan: the teacher's kept elements (chosen inside the tensor by the
    TensorwiseSelector `selector` when the plan is tensorwise), or a fresh init when excluded (as
    transformers initializes these models: norms `norm_init`, biases 0, weights N(0, initializer_range))."""
    if p.source is not None and p.tensorwise:
        return selector(p, teacher).contiguous()
    if p.source is not None:
        return teacher.read(p.source, p.indices).contiguous()
    if p.key.endswith(('.bias', '_bias')):
        value = torch.zeros(p.shape)
    elif component_of(p.key) == 'norm':
        value = torch.full(p.shape, norm_init)
    else:
        value = torch.empty(p.shape).normal_(0, std, generator=_generator(seed, p.key))
    return value.to(ST_DTYPES[p.dtype])


class ReadAhead:
    """make(p) for the plans in their order, one ahead in a worker thread: while the caller writes tensor i,
    the worker reads and selects tensor i+1 (file reads and torch copies release the GIL) and the kernel is
    asked to fetch tensor i+2. Besides the tensor being written, only the one being made is held."""

    def __init__(self, planned, make, hint):
        from concurrent.futures import ThreadPoolExecutor
        self.make, self.hint = make, hint
        self.following = {p.key: q for p, q in zip(planned, planned[1:])}
        self.pool, self.pending = ThreadPoolExecutor(max_workers=1), {}

    def __call__(self, p):
        future = self.pending.pop(p.key, None) or self.pool.submit(self.make, p)
        q = self.following.get(p.key)
        if q is not None:
            self.pending[q.key] = self.pool.submit(self.make, q)
            if q.key in self.following:
                self.hint(self.following[q.key])
        return future.result()

    def close(self):
        self.pool.shutdown(wait=True, cancel_futures=True)
