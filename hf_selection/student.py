"""The student's config.json: the teacher's with the user's overrides, checked field by field; per-layer fields
follow layer selection."""
import json
import os

import utils
from utils import UserError
from weight_selection import explicit_layers, group_layers

from .families import check_whole_numbers, field_names


def read_overrides(spec):
    """--student_config: a JSON object, the path of a config.json, or a folder holding one (as from_pretrained)."""
    text = spec.strip()
    if not text.startswith('{'):
        if os.path.isdir(spec) and os.path.isfile(os.path.join(spec, 'config.json')):
            spec = os.path.join(spec, 'config.json')
        if not os.path.isfile(spec):
            raise UserError(f'--student_config {spec}: neither a JSON object, nor an existing config.json file, '
                            f'nor a folder holding one')
        with open(spec) as f:
            text = f.read()
    return utils.parse_json_dict(text, '--student_config', example='{"num_hidden_layers": 4}')


def student_config(t_cfg, t, overrides, family, layer_map_fn):
    """The teacher's config (checked into its widths `t` by widths_of) with the overrides; per-layer lists
    (layer_types) follow layer selection, and head_dim is written out when the teacher's was explicit, so
    both sides agree on it."""
    if overrides.get('model_type', t_cfg.get('model_type')) != t_cfg.get('model_type'):
        raise UserError(f"--student_config: model_type '{overrides['model_type']}' differs from the teacher's "
                        f"'{t_cfg.get('model_type')}'; teacher and student must be of the same family")
    overrides = check_switches(t_cfg, drop_written_defaults(t_cfg, overrides))
    # LLaMA-style models honour an explicit head_dim; any model can untie its output layer from its embedding
    extra = ('head_dim', 'tie_word_embeddings') if family.rotary else ('tie_word_embeddings',)
    known = {name for width in family.fields for name in field_names(family, width)}
    unknown = [k for k in overrides if k not in t_cfg and k not in known and k not in extra]
    if unknown:
        raise UserError(f"--student_config: '{unknown[0]}' is not a field of the teacher's config.json "
                        f'({t_cfg.get("model_type")}); check its spelling (options of a forward pass, such as '
                        f'output_hidden_states, are given when loading the student)')
    overrides = check_sizes(t_cfg, overrides, family)
    for width in family.fields:  # a width with two names (num_local_experts, num_experts): under the teacher's
        names = field_names(family, width)
        given = [k for k in overrides if k in names]
        if len(given) > 1:
            raise UserError(f'--student_config gives {given[0]} and {given[1]}, two names of one field; give one')
        if given and len(names) > 1:
            value = overrides[given[0]]
            overrides = {k: v for k, v in overrides.items() if k != given[0]}
            overrides.update({n: value for n in names if n in t_cfg} or {given[0]: value})
    changed = [k for k in family.fixed_fields if k in overrides and overrides[k] != t_cfg.get(k)]
    if changed:
        raise UserError(f'--student_config: {changed[0]} stays the teacher\'s in {family.name} models '
                        f'({FIXED_WHY[changed[0]]}); leave it out')
    if 'tie_word_embeddings' in overrides and not isinstance(overrides['tie_word_embeddings'], bool):
        raise UserError(f"--student_config: tie_word_embeddings must be true or false, got "
                        f"{overrides['tie_word_embeddings']!r}")
    s_cfg = {k: v for k, v in {**t_cfg, **overrides}.items() if k != 'quantization_config'}  # written unquantized
    check_whole_numbers(s_cfg, family, 'student')
    if 'pooler' in family.fields and t_cfg.get('pooler_output_size') == t.hidden \
            and 'pooler_output_size' not in overrides:  # it restated the hidden size: it follows the student's
        s_cfg['pooler_output_size'] = s_cfg[family.fields['hidden']]
    t_hd = t_cfg.get('head_dim')
    if 'head_dim' not in overrides and t_hd is not None and t_hd == t.hidden // t.heads:
        # the teacher's head_dim only restated hidden/heads: the student's follows its own hidden/heads
        hidden, heads = s_cfg[family.fields['hidden']], s_cfg[family.fields['heads']]
        if heads <= 0 or hidden % heads:
            raise UserError(f'student: hidden size {hidden} does not divide into {heads} attention heads')
        s_cfg['head_dim'] = hidden // heads
    n_t, n_s = t.layers, s_cfg[family.fields['layers']]
    layer_map = layer_map_fn(n_t, n_s)
    if isinstance(t_cfg.get('layer_types'), list) and 'layer_types' not in overrides \
            and len(t_cfg['layer_types']) == n_t:
        s_cfg['layer_types'] = [t_cfg['layer_types'][i] for i in layer_map]
    if isinstance(t_cfg.get('stage_names'), list) and len(t_cfg['stage_names']) == n_t + 1 \
            and not {'stage_names', 'out_indices', 'out_features'} & set(overrides):
        s_cfg.update(backbone_stages(t_cfg, layer_map))
    if family.sparse_layers:
        given = [k for k in ('mlp_only_layers', 'decoder_sparse_step') if k in overrides]
        if given:
            raise UserError(f'--student_config: {given[0]} follows layer selection (a student layer has a dense MLP '
                            f'where its teacher layer has one); leave it out')
        dense = dense_layers(t_cfg, n_t)
        if dense:  # the student names its dense layers one by one
            s_cfg['mlp_only_layers'] = [j for j, i in enumerate(layer_map) if i in dense]
            s_cfg['decoder_sparse_step'] = 1
    return s_cfg, layer_map


# Fields that describe the checkpoint, not the model: the student's weights are the teacher's class and dtype.
CHECKPOINT_FIELDS = ('architectures', 'dtype', 'torch_dtype')


def drop_written_defaults(t_cfg, overrides):
    """The overrides without what a config.json written in full (transformers' to_json_file(use_diff=False), or
    a config.json of another run) carries besides the model's fields: metadata (_name_or_path,
    transformers_version), the checkpoint's class and dtype when null or the teacher's, and the fields every
    transformers config has (return_dict, output_attentions...) at the defaults save_pretrained leaves out."""
    kept = {}
    for key, value in overrides.items():
        if key.startswith('_') or key == 'transformers_version':
            continue
        if key in CHECKPOINT_FIELDS:
            names = (key,) if key == 'architectures' else ('dtype', 'torch_dtype')  # transformers 5's, 4.x's name
            teacher = next((t_cfg[n] for n in names if n in t_cfg), value)
            if value is not None and value != teacher:
                raise UserError(f"--student_config: {key} stays the teacher's ({teacher!r}): the selected "
                                f"weights keep the teacher's checkpoint class and dtype; leave it out")
            continue
        kept[key] = value
    if all(k in t_cfg for k in kept):
        return kept
    # fields a model class defaults otherwise than the base config (tie_word_embeddings: LLaMA's false, 4.x's base
    # true) and the switches are checked on their own, never dropped
    generic = {k: v for k, v in common_config_defaults().items()
               if k not in t_cfg and k not in SWITCHES and k != 'tie_word_embeddings'}
    return {k: v for k, v in kept.items() if not (k in generic and v == generic[k])}


def common_config_defaults():
    """The fields every transformers config has, at their defaults as config.json writes them ({} when
    transformers is not installed: a config.json written in full came from it, and the selector needs only JSON)."""
    try:
        from transformers import PretrainedConfig
    except ImportError:
        return {}
    return json.loads(PretrainedConfig().to_json_string(use_diff=False))


# Fields that add or remove tensors (biases, cross-attention, token types, a classifier's rows): the student
# keeps the teacher's, since the teacher has no weights for what another value would add, and transformers would
# fill those at random, or drop selected ones, when it loads the student.
SWITCHES = ('attention_bias', 'mlp_bias', 'qkv_bias', 'use_bias', 'bias', 'add_cross_attention', 'type_vocab_size',
            'use_swiglu_ffn', 'use_mask_token', 'use_qk_norm', 'qk_layernorm', 'id2label', 'label2id', 'num_labels')


def check_switches(t_cfg, overrides):
    """The overrides, checked to leave every SWITCHES field as the teacher has it. A field the teacher's
    config.json leaves out has transformers' default: 2 labels, or (the others) off, as false or null. Labels
    that restate the default the teacher left out are then dropped (num_labels, which config.json never stores)."""
    labels = {'0': 'LABEL_0', '1': 'LABEL_1'}  # transformers' default, which it does not write out
    defaults = {'id2label': labels, 'label2id': {v: int(k) for k, v in labels.items()},
                'num_labels': len(t_cfg.get('id2label') or labels)}
    for key in SWITCHES:
        if key not in overrides:
            continue
        if key in t_cfg or key in defaults:
            teacher = t_cfg.get(key, defaults.get(key))
            same = overrides[key] == teacher
        else:
            teacher, same = 'unset', overrides[key] in (False, None)
        if not same:
            why = ("the student keeps the teacher's classifier; change the labels when you fine-tune "
                   '(from_pretrained(..., num_labels=N, ignore_mismatched_sizes=True))' if key in defaults else
                   'another value adds or removes tensors the teacher has no weights for')
            raise UserError(f"--student_config: {key} stays the teacher's ({teacher!r}): {why}; leave it out")
    return {k: v for k, v in overrides.items() if k in t_cfg or k not in defaults}  # restated defaults: as the teacher


def check_sizes(t_cfg, overrides, family):
    """The overrides, checked: a size the user gives is a positive whole number (0 would otherwise read as unset),
    or null where the teacher's config.json has it null too (GPT-2's n_inner); a null size the teacher leaves out
    is dropped, so that the student has the teacher's default. Which sizes transformers lets be null differs by
    family (LLaMA's head_dim may be, Gemma's may not): a null the teacher does not have could write a student
    that transformers refuses to load."""
    names = [field_names(family, w) for w in family.fields] + [('head_dim',)]
    # each size name -> the teacher's config.json key for that size (under either name of a width), if any
    teacher_key = {n: next((m for m in group if m in t_cfg), None) for group in names for n in group}
    dropped = set()
    for key, value in overrides.items():
        if key not in teacher_key:
            continue
        t_key = teacher_key[key]
        if value is None and t_key is None:
            dropped.add(key)
        elif value is None and t_cfg[t_key] is None:
            continue  # restates the teacher's null
        elif isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            why = '' if value is not None else \
                f" (null only where the teacher's config.json has it null; the teacher has {t_cfg[t_key]!r})"
            raise UserError(f'--student_config: {key} must be a positive whole number, got {value!r}{why}')
    return {k: v for k, v in overrides.items() if k not in dropped}


def backbone_stages(t_cfg, layer_map):
    """A backbone config's stages (DINOv2's: the stem, then one per layer) for the student: the stages it outputs
    are those of the teacher's output layers that the student keeps (the last layer's when none is kept)."""
    n_t, n_s = len(t_cfg['stage_names']) - 1, len(layer_map)
    names = t_cfg['stage_names'][:1] + [f'stage{j + 1}' for j in range(n_s)]
    stage_of = {0: 0, **{i + 1: j + 1 for j, i in enumerate(layer_map)}}  # teacher stage -> student stage
    wanted = t_cfg.get('out_indices') or []
    kept = sorted({stage_of[i % (n_t + 1)] for i in wanted if isinstance(i, int) and i % (n_t + 1) in stage_of})
    kept = kept or [n_s]
    return {'stage_names': names, 'out_indices': kept, 'out_features': [names[i] for i in kept]}


FIXED_WHY = {'image_size': "the student keeps the teacher's learned positions",
             'patch_size': "the student keeps the teacher's patch embedding and positions",
             'num_channels': "the student keeps the teacher's patch embedding",
             'intermediate_size': 'DINOv2 does not read it: its MLP width is hidden_size x mlp_ratio; change mlp_ratio',
             'head_dim': "GPT-NeoX's attention splits hidden_size into num_attention_heads heads whatever head_dim "
                         'says, and its rotary embedding reads head_dim, so another value breaks the model'}


def dense_layers(config, n_layers):
    """Qwen-MoE's layers with a dense MLP instead of experts, as transformers decides: those mlp_only_layers
    lists and those decoder_sparse_step steps over (a layer i has experts when (i + 1) % step == 0)."""
    only, step = config.get('mlp_only_layers') or [], config.get('decoder_sparse_step', 1)
    if not isinstance(only, list) or not all(isinstance(i, int) for i in only) \
            or not isinstance(step, int) or isinstance(step, bool) or step <= 0:
        raise UserError(f'teacher config: mlp_only_layers must be a list of layers and decoder_sparse_step a '
                        f'positive whole number, got {only!r} and {step!r}')
    return {i for i in range(n_layers) if i in only or (i + 1) % step}


def layer_map_for(selection):
    """n_t, n_s -> the teacher layer for each student layer; the selection is checked here, before any
    teacher tensor is read. A Hugging Face decoder has one stack of layers, so one list at most."""
    explicit = explicit_layers(selection)
    if explicit is not None and len(explicit) != 1:
        raise UserError(f'--layer_selection {selection}: a Hugging Face model has one stack of layers; give one '
                        f'comma-separated list of teacher layers such as 0,2,4')
    chosen = None if explicit is None else explicit[0]
    return lambda n_t, n_s: group_layers(selection, chosen, n_t, n_s, 'layers')


def check_not_wider(t, s):
    sizes = [('hidden', 'hidden size'), ('inter', 'intermediate size'), ('heads', 'attention heads'),
             ('kv_heads', 'key/value heads'), ('positions', 'positions'), ('experts', 'experts'),
             ('expert_inter', "experts' intermediate size"), ('shared_inter', "shared expert's intermediate size"),
             ('pooler', 'pooler output size')]
    for name, words in sizes:
        if getattr(s, name) > getattr(t, name):
            raise UserError(f'the student has {words} {getattr(s, name)} where the teacher has {getattr(t, name)}; '
                            f'weight selection needs a student no wider than its teacher')
    if s.heads * s.head_dim > t.heads * t.head_dim:
        raise UserError(f'the student\'s attention width {s.heads}x{s.head_dim} exceeds the teacher\'s '
                        f'{t.heads}x{t.head_dim}; weight selection needs a student no wider than its teacher')
    if s.vocab != t.vocab:
        raise UserError(f'the student has vocab_size {s.vocab}, the teacher {t.vocab}; the student keeps the '
                        f"teacher's tokenizer, so leave vocab_size as it is")
