"""Weight selection for Hugging Face transformers checkpoints, streamed from (sharded) safetensors.

A student is described by its config.json (the teacher's config with overrides such as a smaller
hidden_size or fewer layers). Every student tensor is planned before anything is read: which teacher
tensor it comes from (layer selection), and which indices it keeps along each dimension (element
selection, one consistent index set per width). The teacher's tensors are then read one at a time,
and only the ones the student needs (a layer that layer selection drops is never read); each student
tensor is written to its output shard as soon as it is produced. Memory stays near the largest teacher
tensor, whatever the size of the model or of a shard. The paper's other variants (random selection without
consistency, Section 3.2; L1 and magnitude pruning, Table 7; and l1_consistent) choose inside each tensor
instead, from the whole teacher tensor (l1_consistent first reads the whole teacher once, a tensor at a time,
to rank the hidden width).

Supported families: LLaMA-style (llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text, phi3, olmo2), mixtures
of experts (mixtral, olmoe, qwen2_moe, qwen3_moe, gpt_oss: whole experts kept, the same in every layer), GPT-NeoX
(Pythia), GPT-2, BERT, and vision transformers (vit, dinov2, dinov2_with_registers: same image and patch size, every
position kept). This module needs torch and safetensors only; transformers is not imported (configs are JSON).

    python weight_selection.py --teacher HF_FOLDER --student_config '{"hidden_size": 1024, ...}' --output OUT
"""
import itertools
import json
import math
import os
import re
import shutil
import struct
import sys
import tempfile
from dataclasses import dataclass, field, replace

import torch

import utils
from utils import UserError
from safetensors_io import ST_DTYPES, byte_span, read_header, read_rows, rows_of
from weight_selection import (BLOCK_ELEMENTS, ELEMENT_SELECTIONS, INT_OF_SIZE, ElementSelector, _generator,
                              explicit_layers, group_layers, l1_norms, largest, magnitude_keys, magnitude_squeeze,
                              random_indices, top_l1)

# Element selections that choose some axis per tensor, from its key or its values (the rest: one index set per axis)
TENSORWISE = ('random_inconsistent', 'l1', 'l1_consistent', 'magnitude')
HEAD_SELECTIONS = ('auto', 'heads', 'dims')
EXCLUDABLE = ('embed', 'attn', 'mlp', 'norm')

# ----------------------------------------------------------------------------------------------
# Families: config fields, block names, and the axes ("widths") of every tensor.

@dataclass(frozen=True)
class Family:
    name: str
    fields: dict          # width -> config.json field
    block: re.Pattern     # teacher key -> (prefix, layer, rest)
    tensors: dict         # key without block prefix (or top-level key) -> axis names, one per dimension
    rotary: bool          # rotary position embeddings: heads are kept whole by default
    embed: tuple          # kinds of the input embedding
    head: str             # the output embedding (tied to the input one unless tie_word_embeddings is false)
    attn_is_hidden: bool = False  # attention width = model width (GPT-2, BERT): per dimension, q, k, v take its set
    tied_default: bool = False  # tie_word_embeddings when config.json leaves it out (the config class default)
    norm_init: float = 1.0  # a fresh norm weight: 1, or 0 where the model scales by (1 + weight) (Gemma)
    expert_key: re.Pattern = None  # mixtures of experts: key after the layer -> (experts prefix, expert, rest)
    sparse_layers: bool = False  # Qwen-MoE: decoder_sparse_step and mlp_only_layers say which layers are dense
    inter_of: object = None  # the MLP width from the config, where no field holds it (DINOv2: hidden x mlp_ratio)
    fixed_fields: tuple = ()  # fields a student keeps (a ViT's image and patch sizes, which its positions follow)
    base_prefix: str = ''  # the prefix a base model's checkpoint lacks (LlamaModel's keys have no 'model.'): no head
    head_bias: tuple = ()  # (the output layer's bias, the key a tied model shares it with and a tied file stores)

    @property
    def has_experts(self):
        return 'experts' in self.fields


_LLAMA_LAYER = {
    'self_attn.q_proj.weight': ('q', 'hidden'), 'self_attn.q_proj.bias': ('q',),
    'self_attn.k_proj.weight': ('kv', 'hidden'), 'self_attn.k_proj.bias': ('kv',),
    'self_attn.v_proj.weight': ('kv', 'hidden'), 'self_attn.v_proj.bias': ('kv',),
    'self_attn.o_proj.weight': ('hidden', 'q'), 'self_attn.o_proj.bias': ('hidden',),
    'mlp.gate_proj.weight': ('inter', 'hidden'), 'mlp.gate_proj.bias': ('inter',),
    'mlp.up_proj.weight': ('inter', 'hidden'), 'mlp.up_proj.bias': ('inter',),
    'mlp.down_proj.weight': ('hidden', 'inter'), 'mlp.down_proj.bias': ('hidden',),
    'input_layernorm.weight': ('hidden',), 'post_attention_layernorm.weight': ('hidden',),
}


def _prefixed(prefixes, tensors):
    """Top-level tensors under their bare keys and under each prefix (a ...For* model's: 'model.', 'bert.')."""
    return {p + k: v for p in ('', *prefixes) for k, v in tensors.items()}


# Base-model checkpoints (LlamaModel, Qwen2Model, ...) name keys without the `model.` of *ForCausalLM; both work.
LLAMA = Family(
    'llama',
    fields=dict(hidden='hidden_size', inter='intermediate_size', heads='num_attention_heads',
                kv_heads='num_key_value_heads', layers='num_hidden_layers', vocab='vocab_size'),
    block=re.compile(r'^((?:model\.)?layers)\.(\d+)\.(.+)$'),
    tensors={**_prefixed(('model.',), {'embed_tokens.weight': ('vocab', 'hidden'), 'norm.weight': ('hidden',)}),
             'lm_head.weight': ('vocab', 'hidden'), **_LLAMA_LAYER},
    rotary=True, embed=('embed_tokens.weight', 'model.embed_tokens.weight'), head='lm_head.weight',
    base_prefix='model.')

_GPT2_LAYER = {
    'ln_1.weight': ('hidden',), 'ln_1.bias': ('hidden',), 'ln_2.weight': ('hidden',), 'ln_2.bias': ('hidden',),
    'attn.c_attn.weight': ('hidden', 'qkv'), 'attn.c_attn.bias': ('qkv',),
    'attn.c_proj.weight': ('q', 'hidden'), 'attn.c_proj.bias': ('hidden',),
    'mlp.c_fc.weight': ('hidden', 'inter'), 'mlp.c_fc.bias': ('inter',),
    'mlp.c_proj.weight': ('inter', 'hidden'), 'mlp.c_proj.bias': ('hidden',),
}
# The hub's original gpt2 checkpoints name keys without the `transformer.` prefix; both load.
GPT2 = Family(
    'gpt2',
    fields=dict(hidden='n_embd', inter='n_inner', heads='n_head', layers='n_layer', vocab='vocab_size',
                positions='n_positions'),
    block=re.compile(r'^((?:transformer\.)?h)\.(\d+)\.(.+)$'),
    tensors={**_prefixed(('transformer.',), {
        'wte.weight': ('vocab', 'hidden'), 'wpe.weight': ('pos', 'hidden'),
        'ln_f.weight': ('hidden',), 'ln_f.bias': ('hidden',)}),
             'lm_head.weight': ('vocab', 'hidden'), **_GPT2_LAYER},
    rotary=False, embed=('wte.weight', 'transformer.wte.weight'), head='lm_head.weight', attn_is_hidden=True,
    tied_default=True)  # Conv1D weights are stored [in, out]: the axis names say so

_BERT_LAYER = {
    'attention.self.query.weight': ('q', 'hidden'), 'attention.self.query.bias': ('q',),
    'attention.self.key.weight': ('kv', 'hidden'), 'attention.self.key.bias': ('kv',),
    'attention.self.value.weight': ('kv', 'hidden'), 'attention.self.value.bias': ('kv',),
    'attention.output.dense.weight': ('hidden', 'q'), 'attention.output.dense.bias': ('hidden',),
    'attention.output.LayerNorm.weight': ('hidden',), 'attention.output.LayerNorm.bias': ('hidden',),
    'intermediate.dense.weight': ('inter', 'hidden'), 'intermediate.dense.bias': ('inter',),
    'output.dense.weight': ('hidden', 'inter'), 'output.dense.bias': ('hidden',),
    'output.LayerNorm.weight': ('hidden',), 'output.LayerNorm.bias': ('hidden',),
}
# 'same': an axis the student keeps whole (token types, next-sentence and classifier outputs)
_BERT_TOP = {
    'embeddings.word_embeddings.weight': ('vocab', 'hidden'),
    'embeddings.position_embeddings.weight': ('pos', 'hidden'),
    'embeddings.token_type_embeddings.weight': ('same', 'hidden'),
    'embeddings.LayerNorm.weight': ('hidden',), 'embeddings.LayerNorm.bias': ('hidden',),
    'pooler.dense.weight': ('hidden', 'hidden'), 'pooler.dense.bias': ('hidden',),
}
_BERT_HEADS = {
    'cls.predictions.bias': ('vocab',), 'cls.predictions.decoder.weight': ('vocab', 'hidden'),
    'cls.predictions.decoder.bias': ('vocab',),
    'cls.predictions.transform.dense.weight': ('hidden', 'hidden'), 'cls.predictions.transform.dense.bias': ('hidden',),
    'cls.predictions.transform.LayerNorm.weight': ('hidden',), 'cls.predictions.transform.LayerNorm.bias': ('hidden',),
    'cls.seq_relationship.weight': ('same', 'hidden'), 'cls.seq_relationship.bias': ('same',),
    'classifier.weight': ('same', 'hidden'), 'classifier.bias': ('same',),
}
# BertModel checkpoints name keys without the `bert.` prefix of BertFor* models; both work.
BERT = Family(
    'bert',
    fields=dict(hidden='hidden_size', inter='intermediate_size', heads='num_attention_heads',
                layers='num_hidden_layers', vocab='vocab_size', positions='max_position_embeddings'),
    block=re.compile(r'^((?:bert\.)?encoder\.layer)\.(\d+)\.(.+)$'),
    tensors={**_prefixed(('bert.',), _BERT_TOP), **_BERT_HEADS, **_BERT_LAYER},
    rotary=False, embed=('embeddings.word_embeddings.weight', 'bert.embeddings.word_embeddings.weight'),
    head='cls.predictions.decoder.weight', attn_is_hidden=True, tied_default=True, base_prefix='bert.',
    head_bias=('cls.predictions.decoder.bias', 'cls.predictions.bias'))

# Qwen3: LLaMA with an RMSNorm over each head's dims for queries and keys (one weight of head_dim, shared by heads)
QWEN3 = replace(LLAMA, name='qwen3', tensors={**LLAMA.tensors, 'self_attn.q_norm.weight': ('head_dim',),
                                              'self_attn.k_norm.weight': ('head_dim',)})

# Gemma: LLaMA whose RMSNorms scale by (1 + weight) and whose embeddings are tied by default; Gemma 2 adds a norm
# before and after each MLP, Gemma 3 (its text model) also Qwen3's per-head q_norm/k_norm.
GEMMA = replace(LLAMA, name='gemma', tied_default=True, norm_init=0.0)
GEMMA2 = replace(GEMMA, name='gemma2', tensors={**GEMMA.tensors, 'pre_feedforward_layernorm.weight': ('hidden',),
                                                'post_feedforward_layernorm.weight': ('hidden',)})
GEMMA3 = replace(GEMMA2, name='gemma3_text', tensors={**GEMMA2.tensors, 'self_attn.q_norm.weight': ('head_dim',),
                                                      'self_attn.k_norm.weight': ('head_dim',)})

# Phi-3: LLaMA with q, k, v in one qkv_proj and gate, up in one gate_up_proj (rows side by side)
PHI3 = replace(LLAMA, name='phi3', tensors={
    **{k: v for k, v in LLAMA.tensors.items() if not k.startswith(('self_attn.', 'mlp.'))},
    'self_attn.qkv_proj.weight': ('qkv', 'hidden'), 'self_attn.o_proj.weight': ('hidden', 'q'),
    'mlp.gate_up_proj.weight': ('gate_up', 'hidden'), 'mlp.down_proj.weight': ('hidden', 'inter')})

# OLMo 2: LLaMA whose norms come after attention and after the MLP (no input norm), with an RMSNorm over all of
# the queries and all of the keys (not per head)
_QK_NORMS = {'self_attn.q_norm.weight': ('q',), 'self_attn.k_norm.weight': ('kv',)}
OLMO2 = replace(LLAMA, name='olmo2', tensors={
    **{k: v for k, v in LLAMA.tensors.items() if k != 'input_layernorm.weight'},
    'post_feedforward_layernorm.weight': ('hidden',), **_QK_NORMS})

# Mixtures of experts: a router (one row per expert) and experts that are LLaMA MLPs of width 'expert_inter'. The
# checkpoint holds one tensor per expert, its key naming the expert; a kind names them all with '*'.
_ATTENTION = {k: v for k, v in LLAMA.tensors.items() if not k.startswith('mlp.')}
_MOE_FIELDS = dict(LLAMA.fields, experts=('num_local_experts', 'num_experts'), top_k='num_experts_per_tok',
                   expert_inter='intermediate_size')


def _experts(prefix, gate, up, down):
    return {f'{prefix}.*.{gate}.weight': ('expert_inter', 'hidden'),
            f'{prefix}.*.{up}.weight': ('expert_inter', 'hidden'),
            f'{prefix}.*.{down}.weight': ('hidden', 'expert_inter')}


MIXTRAL = replace(LLAMA, name='mixtral', fields=_MOE_FIELDS,
                  expert_key=re.compile(r'^(block_sparse_moe\.experts)\.(\d+)\.(.+)$'), tensors={
                      **_ATTENTION, 'block_sparse_moe.gate.weight': ('experts', 'hidden'),
                      **_experts('block_sparse_moe.experts', 'w1', 'w3', 'w2')})
_MLP_EXPERTS = re.compile(r'^(mlp\.experts)\.(\d+)\.(.+)$')
_MLP_EXPERT_TENSORS = {'mlp.gate.weight': ('experts', 'hidden'),
                       **_experts('mlp.experts', 'gate_proj', 'up_proj', 'down_proj')}
OLMOE = replace(LLAMA, name='olmoe', fields=_MOE_FIELDS, expert_key=_MLP_EXPERTS,
                tensors={**_ATTENTION, **_QK_NORMS, **_MLP_EXPERT_TENSORS})
# Qwen-MoE: experts of moe_intermediate_size; the layers that mlp_only_layers or decoder_sparse_step name keep a
# dense MLP of intermediate_size. Qwen2-MoE adds a shared expert, always used, weighted by its own 1-row gate.
# transformers takes the expert count under either name (and writes Qwen3-MoE's num_experts as num_local_experts).
_QWEN_MOE_FIELDS = dict(_MOE_FIELDS, expert_inter='moe_intermediate_size')
_SHARED_EXPERT = {'mlp.shared_expert.gate_proj.weight': ('shared_inter', 'hidden'),
                  'mlp.shared_expert.up_proj.weight': ('shared_inter', 'hidden'),
                  'mlp.shared_expert.down_proj.weight': ('hidden', 'shared_inter'),
                  'mlp.shared_expert_gate.weight': ('same', 'hidden')}
QWEN2_MOE = replace(LLAMA, name='qwen2_moe', expert_key=_MLP_EXPERTS, sparse_layers=True,
                    fields=dict(_QWEN_MOE_FIELDS, shared_inter='shared_expert_intermediate_size'),
                    tensors={**LLAMA.tensors, **_MLP_EXPERT_TENSORS, **_SHARED_EXPERT})
QWEN3_MOE = replace(QWEN3, name='qwen3_moe', fields=_QWEN_MOE_FIELDS, expert_key=_MLP_EXPERTS, sparse_layers=True,
                    tensors={**QWEN3.tensors, **_MLP_EXPERT_TENSORS})
# gpt-oss: attention with biases and a learned sink logit per query head; a layer's experts stacked in one tensor
# per projection ([experts, in, out]: x @ W; axis 'each_expert', the experts kept as in the router's 'experts'),
# gate and up interleaved in gate_up_proj's columns (gate 0::2, up 1::2); the router has a bias.
GPT_OSS = replace(LLAMA, name='gpt_oss', fields=_MOE_FIELDS, tensors={
    **_ATTENTION, 'self_attn.sinks': ('heads',),
    'mlp.router.weight': ('experts', 'hidden'), 'mlp.router.bias': ('experts',),
    'mlp.experts.gate_up_proj': ('each_expert', 'hidden', 'gate_up_pairs'),
    'mlp.experts.gate_up_proj_bias': ('each_expert', 'gate_up_pairs'),
    'mlp.experts.down_proj': ('each_expert', 'expert_inter', 'hidden'),
    'mlp.experts.down_proj_bias': ('each_expert', 'hidden')})

# GPT-NeoX (Pythia): LayerNorms with biases, q, k and v of each head side by side in query_key_value's rows (a head's
# q dims, then its k dims, then its v dims), partial rotary embeddings; GPTNeoXModel checkpoints drop `gpt_neox.`
_NEOX_LAYER = {
    'input_layernorm.weight': ('hidden',), 'input_layernorm.bias': ('hidden',),
    'post_attention_layernorm.weight': ('hidden',), 'post_attention_layernorm.bias': ('hidden',),
    'attention.query_key_value.weight': ('qkv_per_head', 'hidden'),
    'attention.query_key_value.bias': ('qkv_per_head',),
    'attention.dense.weight': ('hidden', 'q'), 'attention.dense.bias': ('hidden',),
    'mlp.dense_h_to_4h.weight': ('inter', 'hidden'), 'mlp.dense_h_to_4h.bias': ('inter',),
    'mlp.dense_4h_to_h.weight': ('hidden', 'inter'), 'mlp.dense_4h_to_h.bias': ('hidden',)}
GPT_NEOX = Family(
    'gpt_neox', fields=dict(hidden='hidden_size', inter='intermediate_size', heads='num_attention_heads',
                            layers='num_hidden_layers', vocab='vocab_size'),
    block=re.compile(r'^((?:gpt_neox\.)?layers)\.(\d+)\.(.+)$'),
    tensors={**_prefixed(('gpt_neox.',), {'embed_in.weight': ('vocab', 'hidden'),
                                          **{f'final_layer_norm.{p}': ('hidden',) for p in ('weight', 'bias')}}),
             'embed_out.weight': ('vocab', 'hidden'), **_NEOX_LAYER},
    rotary=True, embed=('embed_in.weight', 'gpt_neox.embed_in.weight'), head='embed_out.weight',
    fixed_fields=('head_dim',), base_prefix='gpt_neox.')

# Vision transformers (ViTModel, ViTFor*; Dinov2Model, Dinov2For*, with registers): BERT-like layers after a
# patch embedding, a class token and learned positions, which the student keeps (same image and patch size)
_VIT_TOP = {'embeddings.cls_token': ('same', 'same', 'hidden'),
            'embeddings.position_embeddings': ('same', 'same', 'hidden'),
            'embeddings.patch_embeddings.projection.weight': ('hidden', 'same', 'same', 'same'),
            'embeddings.patch_embeddings.projection.bias': ('hidden',),
            'layernorm.weight': ('hidden',), 'layernorm.bias': ('hidden',)}
_VIT_ATTENTION = {'attention.attention.query.weight': ('q', 'hidden'), 'attention.attention.query.bias': ('q',),
                  'attention.attention.key.weight': ('kv', 'hidden'), 'attention.attention.key.bias': ('kv',),
                  'attention.attention.value.weight': ('kv', 'hidden'), 'attention.attention.value.bias': ('kv',),
                  'attention.output.dense.weight': ('hidden', 'q'), 'attention.output.dense.bias': ('hidden',)}
_VIT_FIELDS = dict(hidden='hidden_size', inter='intermediate_size', heads='num_attention_heads',
                   layers='num_hidden_layers')
_VIT_FIXED = ('image_size', 'patch_size', 'num_channels')


VIT = Family(
    'vit', fields=dict(_VIT_FIELDS, pooler='pooler_output_size'),
    block=re.compile(r'^((?:vit\.)?encoder\.layer)\.(\d+)\.(.+)$'),
    tensors={**_prefixed(('vit.',), {**_VIT_TOP, 'embeddings.mask_token': ('same', 'same', 'hidden'),
                                     'pooler.dense.weight': ('pooler', 'hidden'), 'pooler.dense.bias': ('pooler',)}),
             'classifier.weight': ('same', 'hidden'), 'classifier.bias': ('same',), **_VIT_ATTENTION,
             'intermediate.dense.weight': ('inter', 'hidden'), 'intermediate.dense.bias': ('inter',),
             'output.dense.weight': ('hidden', 'inter'), 'output.dense.bias': ('hidden',),
             **{f'layernorm_{w}.{p}': ('hidden',) for w in ('before', 'after') for p in ('weight', 'bias')}},
    rotary=False, embed=(), head='', attn_is_hidden=True, fixed_fields=_VIT_FIXED)


def dinov2_mlp_width(config):
    """DINOv2's MLP width (its config's intermediate_size is unused): hidden x mlp_ratio, or for SwiGLU two thirds of
    it rounded up to a multiple of 8, as transformers' Dinov2SwiGLUFFN."""
    ratio = config.get('mlp_ratio', 4)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio <= 0:
        raise UserError(f'mlp_ratio must be a positive number, got {ratio!r}')
    width = int(config['hidden_size'] * ratio)
    return (int(width * 2 / 3) + 7) // 8 * 8 if config.get('use_swiglu_ffn') else width


# The classifier of Dinov2ForImageClassification reads the class token and the mean patch token side by side.
DINOV2 = Family(
    'dinov2', fields=_VIT_FIELDS, block=re.compile(r'^((?:dinov2(?:_with_registers)?\.)?encoder\.layer)\.(\d+)\.(.+)$'),
    tensors={**_prefixed(('dinov2.', 'dinov2_with_registers.'), {
                 **_VIT_TOP, 'embeddings.mask_token': ('same', 'hidden'),
                 'embeddings.register_tokens': ('same', 'same', 'hidden')}),
             'classifier.weight': ('same', 'hidden_pair'), 'classifier.bias': ('same',), **_VIT_ATTENTION,
             **{f'norm{i}.{p}': ('hidden',) for i in (1, 2) for p in ('weight', 'bias')},
             'layer_scale1.lambda1': ('hidden',), 'layer_scale2.lambda1': ('hidden',),
             'mlp.fc1.weight': ('inter', 'hidden'), 'mlp.fc1.bias': ('inter',),
             'mlp.fc2.weight': ('hidden', 'inter'), 'mlp.fc2.bias': ('hidden',),
             'mlp.weights_in.weight': ('gate_up', 'hidden'), 'mlp.weights_in.bias': ('gate_up',),
             'mlp.weights_out.weight': ('hidden', 'inter'), 'mlp.weights_out.bias': ('hidden',)},
    rotary=False, embed=(), head='', attn_is_hidden=True, inter_of=dinov2_mlp_width,
    fixed_fields=(*_VIT_FIXED, 'intermediate_size'))

FAMILIES = {'llama': LLAMA, 'mistral': LLAMA, 'qwen2': LLAMA, 'qwen3': QWEN3, 'gemma': GEMMA, 'gemma2': GEMMA2,
            'gemma3_text': GEMMA3, 'phi3': PHI3, 'olmo2': OLMO2, 'mixtral': MIXTRAL, 'olmoe': OLMOE,
            'qwen2_moe': QWEN2_MOE, 'qwen3_moe': QWEN3_MOE, 'gpt_oss': GPT_OSS, 'gpt_neox': GPT_NEOX, 'gpt2': GPT2,
            'bert': BERT, 'vit': VIT, 'dinov2': DINOV2, 'dinov2_with_registers': DINOV2}

# Buffers some older checkpoints still hold; today's models rebuild them, so the student drops them.
DROPPED = re.compile(r'(^|\.)(rotary_emb\.inv_freq|(attn|attention)\.(masked_)?bias|position_ids)$')  # not c_attn.bias

EMBED_KEYS = ('embed_tokens.weight', 'lm_head.weight', 'embed_in.weight', 'embed_out.weight', 'wte.weight',
              'wpe.weight', 'word_embeddings.weight', 'position_embeddings.weight', 'token_type_embeddings.weight',
              'decoder.weight')


def family_of(config, where):
    model_type = config.get('model_type')
    if model_type not in FAMILIES:
        raise UserError(f"{where}: unknown architecture model_type '{model_type}'; weight selection for Hugging Face "
                        f"checkpoints supports {', '.join(FAMILIES)}")
    quantized = config.get('quantization_config')
    method = quantized.get('quant_method', '?') if isinstance(quantized, dict) else '?'
    if quantized and (model_type, method) not in DEQUANTIZED:  # selecting packed integers would not select weights
        raise UserError(f'{where}: the teacher is quantized ({method}); weight selection reads unquantized weights: '
                        f'give a dequantized copy (transformers: from_pretrained with the quantization config\'s '
                        f'dequantize=True, then save_pretrained)')
    return FAMILIES[model_type]


# Quantized checkpoints read here as their dequantized weights (the student is written unquantized): gpt-oss's MXFP4
DEQUANTIZED = {('gpt_oss', 'mxfp4')}


@dataclass(frozen=True)
class Widths:
    hidden: int
    inter: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int = 0
    positions: int = 0
    experts: int = 0       # mixtures of experts: experts per layer,
    top_k: int = 0         # experts used per token,
    expert_inter: int = 0  # an expert's MLP width,
    shared_inter: int = 0  # and the shared expert's (Qwen2-MoE)
    pooler: int = 0        # ViT's pooler output


def field_names(family, width):
    """The config.json names of a width (the expert count has two, num_local_experts and num_experts)."""
    names = family.fields[width]
    return (names,) if isinstance(names, str) else names


def field_name(config, family, width):
    """The name config.json uses for a width: the first of its names that the config holds."""
    names = field_names(family, width)
    return next((n for n in names if n in config), names[0])


def check_whole_numbers(config, family, where):
    bad = [name for name in [field_name(config, family, w) for w in family.fields] + ['head_dim']
           if config.get(name) is not None
           and (isinstance(config[name], bool) or not isinstance(config[name], int) or config[name] < 0)]
    if bad:
        raise UserError(f"{where}: {bad[0]} must be a whole number, got {config[bad[0]]!r}")


def widths_of(config, family, where):
    """The sizes that name every tensor's axes, read from a config.json dict."""
    f = {width: field_name(config, family, width) for width in family.fields}
    missing = [name for key, name in f.items() if key not in ('inter', 'kv_heads', 'pooler') and name not in config]
    if missing:
        raise UserError(f"{where}: config has no {', '.join(missing)}")
    check_whole_numbers(config, family, where)
    hidden, heads = config[f['hidden']], config[f['heads']]
    kv_heads = config.get(f.get('kv_heads', ''), None) or heads
    inter = family.inter_of(config) if family.inter_of else \
        config.get(f['inter']) or 4 * hidden  # GPT-2's n_inner null means 4 * n_embd
    head_dim = config.get('head_dim') or hidden // max(heads, 1)
    if heads <= 0 or kv_heads <= 0 or heads % kv_heads:
        raise UserError(f'{where}: {heads} attention heads do not divide into {kv_heads} key/value heads')
    if 'head_dim' not in config and hidden % heads:
        raise UserError(f'{where}: hidden size {hidden} does not divide into {heads} attention heads')
    optional = {w: config.get(f[w], 0) or 0 for w in ('vocab', 'positions', 'experts', 'top_k', 'expert_inter',
                                                      'shared_inter') if w in f}
    pooler = config.get(f['pooler']) or hidden if 'pooler' in f else 0  # ViT's pooler_output_size: hidden if unset
    w = Widths(hidden, inter, heads, kv_heads, head_dim, config[f['layers']], **optional, pooler=pooler)
    values = {n: config[n] for n in field_names(family, 'experts') if n in config} if family.has_experts else {}
    if len(set(values.values())) > 1:
        raise UserError(f'{where}: config gives the expert count twice, differently: '
                        + ', '.join(f'{n} {v}' for n, v in values.items()))
    if family.has_experts and not 0 < w.top_k <= w.experts:
        raise UserError(f"{where}: {f['top_k']} is {w.top_k}; it must be between 1 and {f['experts']} ({w.experts}), "
                        f'the experts a token can use')
    return w


# ----------------------------------------------------------------------------------------------
# The student's config.

def read_overrides(spec):
    """--student_config: a JSON object, or the path of a config.json."""
    text = spec.strip()
    if not text.startswith('{'):
        if not os.path.isfile(spec):
            raise UserError(f'--student_config {spec}: neither a JSON object nor an existing config.json file')
        with open(spec) as f:
            text = f.read()
    return utils.parse_json_dict(text, '--student_config')


def student_config(t_cfg, t, overrides, family, layer_map_fn):
    """The teacher's config (checked into its widths `t` by widths_of) with the overrides; per-layer lists
    (layer_types) follow layer selection, and head_dim is written out when the teacher's was explicit, so
    both sides agree on it."""
    # LLaMA-style models honour an explicit head_dim; any model can untie its output layer from its embedding
    extra = ('head_dim', 'tie_word_embeddings') if family.rotary else ('tie_word_embeddings',)
    known = {name for width in family.fields for name in field_names(family, width)}
    unknown = [k for k in overrides if k not in t_cfg and k not in known and k not in extra]
    if unknown:
        raise UserError(f"--student_config: '{unknown[0]}' is not a field of the teacher's config.json "
                        f'({t_cfg.get("model_type")}); check its spelling')
    if overrides.get('model_type', t_cfg.get('model_type')) != t_cfg.get('model_type'):
        raise UserError(f"--student_config: model_type '{overrides['model_type']}' differs from the teacher's "
                        f"'{t_cfg.get('model_type')}'; teacher and student must be of the same family")
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


# ----------------------------------------------------------------------------------------------
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
            parts = zip(split_parts(tensor, dim, name, t), parts_of(name)) if name in FUSED or name in INTERLEAVED \
                else [(tensor, name)]
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

    def __call__(self, p, teacher):
        if p.names[:1] != ('each_expert',):
            return self.one(teacher.read(p.source), p.names, p.shape, p.key, self.anchor(p, teacher))
        # a stack of experts: only the kept ones are read, and each is a tensor of its own, as in checkpoints that
        # store experts one by one (magnitude squeezes each expert's row on its own)
        experts = self.fixed['each_expert']
        tensor, anchor = teacher.read(p.source, [experts]), self.anchor(p, teacher, [experts])
        if self.mode == 'magnitude':
            return self.magnitude(tensor, ('same', *p.names[1:]), p.shape)
        return torch.stack([self.one(tensor[k], p.names[1:], p.shape[1:], f'{p.key}[{e}]',
                                     None if anchor is None else (anchor[0][k], anchor[1][1:]))
                            for k, e in enumerate(experts.tolist())])

    def one(self, tensor, names, shape, key, anchor):
        fused = [a for a in names if a in FUSED or a in INTERLEAVED]
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

    def anchor(self, p, teacher, indices=()):
        """Under l1 and l1_consistent, the teacher weight whose neurons the bias p belongs to (x.bias: x.weight;
        gpt-oss's x_bias: x), with its axis names; else None. `indices`: as for teacher.read."""
        m = re.search(r'(\.|_)bias$', p.source)
        if self.mode not in ('l1', 'l1_consistent') or m is None:
            return None
        weight = p.source[:m.start()] + ('.weight' if m[1] == '.' else '')
        if weight not in teacher.header:
            return None
        return teacher.read(weight, indices), self.family.tensors[kind_of(weight, self.family)]

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


# ----------------------------------------------------------------------------------------------
# Reading the teacher: shard headers parsed up front (shapes, dtypes, completeness), tensors on demand.

class TeacherShards:
    """The teacher's tensors across its shards; reads a tensor (or a range of its rows) only when asked."""

    def __init__(self, folder):
        self.folder = folder
        self.files = shard_files(folder)
        self.where, self.header = {}, {}
        for name in self.files:
            for key, info in read_header(os.path.join(folder, name)).items():
                self.where[key], self.header[key] = name, info
        self.packed = self.find_mxfp4()
        self.fds, self.bytes_read, self.keys_read = {}, 0, []

    def find_mxfp4(self):
        """MXFP4 pairs W_blocks, W_scales: each listed as the weight W, [experts, in, out] in bfloat16, which read()
        dequantizes; returns {W: ((blocks key, header entry, shard), (scales key, header entry, shard))}."""
        packed = {}
        for key in sorted({k[:-7] for k in self.header if k.endswith(('_blocks', '_scales'))}):
            blocks, scales = key + '_blocks', key + '_scales'
            if blocks not in self.header or scales not in self.header:
                have, lack = (blocks, scales) if blocks in self.header else (scales, blocks)
                raise UserError(f"teacher tensor '{have}' has no '{lack}': an MXFP4 weight is stored as both; the "
                                f'checkpoint is incomplete')
            (b_dtype, b_shape, offsets), (s_dtype, s_shape, _) = self.header[blocks], self.header[scales]
            if (b_dtype, s_dtype) != ('U8', 'U8') or len(b_shape) != 4 or b_shape[3] != 16 or s_shape != b_shape[:3]:
                raise UserError(f"teacher tensors '{blocks}' {b_dtype} {list(b_shape)} and '{scales}' {s_dtype} "
                                f'{list(s_shape)} are not MXFP4 experts ([experts, out, in/32, 16] and [experts, out, '
                                f'in/32], uint8)')
            packed[key] = tuple((k, self.header.pop(k), self.where.pop(k)) for k in (blocks, scales))
            self.header[key], self.where[key] = ('BF16', (b_shape[0], b_shape[2] * 32, b_shape[1]), offsets), \
                packed[key][0][2]
        return packed

    def in_file_order(self):
        """Every key, shard by shard and by offset inside each: reads then go forward through the files."""
        return sorted(self.header, key=lambda k: (self.where[k], self.header[k][2][0]))

    def file(self, name):
        if name not in self.fds:
            self.fds[name] = open(os.path.join(self.folder, name), 'rb', buffering=0)
        return self.fds[name]

    def row_span(self, key, indices):
        """(lo, hi): the rows from the first to the last one kept (all rows when indices[0] is None)."""
        rows = indices[0] if indices else None
        if rows is not None and len(rows):
            return int(rows.min()), int(rows.max()) + 1
        return 0, rows_of(self.header[key])

    def will_need(self, p):
        """Ask the kernel to start reading the rows plan p will want (its readahead, in the background).
        Its own descriptor: the reading thread owns the open files."""
        if p.source is None:
            return
        if p.source in self.packed:  # each kept expert's blocks and scales
            spans = [(name, info, e, e + 1) for _, info, name in self.packed[p.source]
                     for e in self.kept_experts(p.source, p.indices)]
        else:
            spans = [(self.where[p.source], self.header[p.source], *self.row_span(p.source, p.indices))]
        for name, info, lo, hi in spans:
            fd = os.open(os.path.join(self.folder, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, *byte_span(info, lo, hi), os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)

    def read(self, key, indices=()):
        """The tensor `key` with only `indices[d]` kept along dimension d (None, or no `indices`: all). Only the
        rows from the first to the last kept one are read from the file; the kept elements are then taken, by a
        strided slice where they are evenly spaced (Algorithm 1 when the sizes divide), else by index."""
        if key in self.packed:
            return self.read_mxfp4(key, indices)
        lo, hi = self.row_span(key, indices)
        name = self.where[key]
        tensor = read_rows(self.file(name), os.path.join(self.folder, name), key, self.header[key], lo, hi)
        self.bytes_read += byte_span(self.header[key], lo, hi)[1]
        self.keys_read.append(key)
        for dim, idx in enumerate(indices):
            if idx is not None:
                tensor = take(tensor, dim, idx - lo if dim == 0 else idx)
        return tensor

    def read_mxfp4(self, key, indices):
        """An MXFP4 weight, dequantized one kept expert at a time, each cut to its kept elements at once."""
        (blocks, b_info, b_file), (scales, s_info, s_file) = self.packed[key]
        out, experts = None, self.kept_experts(key, indices)
        for k, e in enumerate(experts):
            weight = dequantize_mxfp4(
                read_rows(self.file(b_file), os.path.join(self.folder, b_file), blocks, b_info, e, e + 1)[0],
                read_rows(self.file(s_file), os.path.join(self.folder, s_file), scales, s_info, e, e + 1)[0])
            self.bytes_read += byte_span(b_info, e, e + 1)[1] + byte_span(s_info, e, e + 1)[1]
            for dim, idx in enumerate(indices[1:]):
                if idx is not None:
                    weight = take(weight, dim, idx)
            if out is None:
                out = torch.empty((len(experts), *weight.shape), dtype=weight.dtype)
            out[k] = weight
        self.keys_read.append(key)
        return out

    def kept_experts(self, key, indices):
        """The experts (rows) of `key` that `indices` keeps: indices[0], or all."""
        return (indices[0] if indices and indices[0] is not None else torch.arange(self.header[key][1][0])).tolist()

    def close(self):
        for f in self.fds.values():
            f.close()
        self.fds = {}


# MXFP4 (OCP microscaling): 4-bit e2m1 values, two a byte (low nibble first), each block of 32 scaled by 2^(s - 127)
FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks, scales):
    """One expert's blocks [out, in/32, 16] and scales [out, in/32] (uint8) -> its weight [in, out] in bfloat16,
    exact: an e2m1 value times a power of two, computed in float32, within bfloat16's precision."""
    lut = torch.tensor(FP4_E2M1)
    values = torch.stack([lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]], -1).flatten(-2)  # [out, G, 32]
    values = torch.ldexp(values, scales.to(torch.int32)[..., None] - 127)
    return values.flatten(-2).t().to(torch.bfloat16)


def take(tensor, dim, idx):
    """tensor's slices idx along dim (a view when idx is evenly spaced)."""
    if len(idx) == tensor.shape[dim] and torch.equal(idx, torch.arange(len(idx))):
        return tensor
    if len(idx) > 1 and idx[1] > idx[0] and bool((idx.diff() == idx[1] - idx[0]).all()):
        return tensor.narrow(dim, int(idx[0]), int(idx[-1] - idx[0]) + 1)[
            (slice(None),) * dim + (slice(None, None, int(idx[1] - idx[0])),)]
    return tensor.index_select(dim, idx)


def shard_files(folder):
    """Shard file names: those of model.safetensors.index.json, or model.safetensors; checked to exist."""
    index = os.path.join(folder, 'model.safetensors.index.json')
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)['weight_map']
        except (ValueError, KeyError, TypeError):
            raise UserError(f'{index}: not a safetensors index (no weight_map)') from None
        files = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(folder, 'model.safetensors')):
        files = ['model.safetensors']
    else:
        other = [n for n in os.listdir(folder) if n.endswith(('.bin', '.pt', '.pth'))]
        hint = f' (found {other[0]}: convert it to safetensors first)' if other else ''
        raise UserError(f'{folder} holds no model.safetensors nor model.safetensors.index.json{hint}')
    missing = [n for n in files if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise UserError(f'{folder}: shard {missing[0]} named in model.safetensors.index.json is missing'
                        + (f' (+{len(missing) - 1} more)' if len(missing) > 1 else ''))
    return files


# ----------------------------------------------------------------------------------------------
# The plan: every student tensor, its source and its indices, decided before anything is read.

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


def kind_of(key, family):
    """A teacher key without its layer prefix (and with '*' for its expert): its tensor's name in family.tensors."""
    return student_keys(key, family, [])[1]


def student_keys(key, family, layer_map, expert_map=()):
    """The student keys a teacher key becomes: none when its layer (or expert) is dropped, one per student layer
    (and expert) that selects it otherwise."""
    m = family.block.match(key)
    if m is None:
        if key not in family.tensors:
            raise UserError(f"teacher tensor '{key}' is not one this selector knows for {family.name} models")
        return [key], key
    prefix, layer, rest = m[1], int(m[2]), m[3]
    e = family.expert_key.match(rest) if family.expert_key else None
    kind = rest if e is None else f'{e[1]}.*.{e[3]}'
    if kind not in family.tensors:
        raise UserError(f"teacher tensor '{key}' is not one this selector knows for {family.name} models")
    layers = [f'{prefix}.{j}' for j, i in enumerate(layer_map) if i == layer]
    if e is None:
        return [f'{p}.{rest}' for p in layers], kind
    experts = [k for k, x in enumerate(expert_map) if x == int(e[2])]
    return [f'{p}.{e[1]}.{k}.{e[3]}' for p in layers for k in experts], kind


def axis_sizes(w):
    """{axis name: size} of a model's Widths."""
    q, kv = w.heads * w.head_dim, w.kv_heads * w.head_dim
    return {'hidden': w.hidden, 'inter': w.inter, 'vocab': w.vocab, 'pos': w.positions, 'q': q, 'kv': kv,
            'qkv': q + 2 * kv, 'gate_up': 2 * w.inter, 'head_dim': w.head_dim, 'experts': w.experts,
            'expert_inter': w.expert_inter, 'shared_inter': w.shared_inter, 'hidden_pair': 2 * w.hidden,
            'pooler': w.pooler, 'heads': w.heads, 'gate_up_pairs': 2 * w.expert_inter, 'each_expert': w.experts,
            'qkv_per_head': 3 * q}


def plan_one(s_key, t_key, kind, teacher, family, t, s, axes, excluded):
    """A student tensor's plan. `axes`: the teacher indices kept along each axis, the same in every tensor; None
    under a tensorwise selection, where the whole teacher tensor is read and TensorwiseSelector chooses."""
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
        return Planned(s_key, t_key, shape, dtype, t_shape, [None] * len(names), names, tensorwise=True,
                       reordered=reordered)
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
                                    component_of(s_key) in exclude))
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
    stores only the latter. The student's output bias is the teacher's: decoder.bias where the file has it (an
    untied teacher uses that one alone), else cls.predictions.bias. A tied student stores it as the latter."""
    own, shared = family.head_bias
    source = own if own in teacher.header else shared
    if source not in teacher.header:
        return planned
    if tied:
        return [plan_one(shared, own, own, teacher, family, t, s, axes, False) if p.key == shared and source == own
                else p for p in planned if p.key != own]
    if any(p.key == own for p in planned):
        return planned
    return planned + [plan_one(own, shared, shared, teacher, family, t, s, axes, False)]


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


# ----------------------------------------------------------------------------------------------
# Writing: safetensors shards whose headers are known up front, so tensors stream straight to disk.

def parse_size(text):
    """'5GB' -> 5e9 bytes, as transformers' max_shard_size ('500MB', '2GiB' or a number of bytes)."""
    m = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*', str(text), re.IGNORECASE)
    if m is None:
        raise UserError(f"--max_shard_size {text}: write a size such as 5GB, 500MB or 2GiB")
    unit = (m[2] or 'B').upper()
    base = 1024 if 'I' in unit else 1000
    return int(float(m[1]) * base ** 'BKMGT'.index(unit[0]))


def split_shards(planned, max_bytes):
    shards, size = [[]], 0
    for p in planned:
        if shards[-1] and size + p.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += p.nbytes
    return shards


def write_shard(path, shard, make):
    """One safetensors file: header (dtypes, shapes, offsets, all known from the plan), then each tensor's
    bytes as soon as make(p) produces it."""
    header, offset = {'__metadata__': {'format': 'pt'}}, 0
    for p in shard:
        header[p.key] = {'dtype': p.dtype, 'shape': list(p.shape), 'data_offsets': [offset, offset + p.nbytes]}
        offset += p.nbytes
    raw = json.dumps(header, separators=(',', ':')).encode()
    raw += b' ' * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, 'wb') as f:
        f.write(struct.pack('<Q', len(raw)))
        f.write(raw)
        for p in shard:
            value = make(p)
            if tuple(value.shape) != p.shape or value.dtype != ST_DTYPES[p.dtype]:
                raise AssertionError(f'{p.key}: made {tuple(value.shape)} {value.dtype}, planned {p.shape} {p.dtype}')
            f.write(value.reshape(-1).view(torch.uint8).numpy())
        f.flush()
        os.fsync(f.fileno())


def write_student(folder, planned, max_bytes, make):
    """model.safetensors, or model-0000i-of-0000n.safetensors with model.safetensors.index.json."""
    shards = split_shards(planned, max_bytes)
    n = len(shards)
    names = ['model.safetensors'] if n == 1 else [f'model-{i + 1:05d}-of-{n:05d}.safetensors' for i in range(n)]
    for name, shard in zip(names, shards):
        write_shard(os.path.join(folder, name), shard, make)
    if n > 1:
        index = {'metadata': {'total_size': sum(p.nbytes for p in planned)},
                 'weight_map': {p.key: name for name, shard in zip(names, shards) for p in shard}}
        write_json(os.path.join(folder, 'model.safetensors.index.json'), index)
    return names


def write_json(path, obj):
    with open(path, 'w') as f:
        json.dump(obj, f, indent=2)
        f.write('\n')


# ----------------------------------------------------------------------------------------------
# Teacher folder (or hub id), output folder, and the whole selection.

def is_hf_teacher(name):
    return bool(name) and os.path.isfile(os.path.join(name, 'config.json'))


def resolve_teacher(name):
    """A local folder holding config.json; a hub id is downloaded when online."""
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, 'config.json')):
            raise UserError(f'--teacher {name} has no config.json; a Hugging Face teacher is a folder with config.json '
                            f'and model.safetensors (or shards and model.safetensors.index.json)')
        return name
    if os.path.exists(name) or not re.fullmatch(r'[\w.-]+(/[\w.-]+)?', name):
        raise UserError(f'--teacher {name}: not a folder holding config.json and safetensors, nor a hub id')
    return download(name)


def download(repo_id):
    hint = 'pass a local folder holding config.json and the *.safetensors files as --teacher'
    utils.check_hub_reachable(repo_id, hint)
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(f"'{repo_id}' is not a local folder and huggingface_hub is not installed; {hint}") from None
    try:
        # the transformers weights only: '*' would also match a folder's files (gpt-oss's original/*.safetensors)
        return snapshot_download(repo_id, allow_patterns=['config.json', 'model.safetensors', 'model-*.safetensors',
                                                          'model.safetensors.index.json'])
    except Exception as e:  # noqa: BLE001 - any download failure is reported in one line
        raise UserError(f"cannot fetch '{repo_id}' ({type(e).__name__}: {utils.first_line(e)}); {hint}") from None


def read_config(folder):
    path = os.path.join(folder, 'config.json')
    try:
        with open(path) as f:
            config = json.load(f)
    except ValueError as e:
        raise UserError(f'{path} is not valid JSON ({e})') from None
    if not isinstance(config, dict):
        raise UserError(f'{path} is not a JSON object')
    return config


def check_output(path):
    """The output folder must be new (or empty), in an existing folder: nothing is overwritten."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UserError(f'cannot write {path}: folder {parent} does not exist; create it first')
    if os.path.isfile(path):
        raise UserError(f'--output {path} is a file; a Hugging Face student is written to a folder')
    if os.path.isdir(path) and os.listdir(path):
        raise UserError(f'--output {path} exists and is not empty; choose a new folder')


def select_hf(teacher, student_overrides, output, layer_selection='first', element_selection='uniform', seed=0,
              exclude=(), head_selection='auto', max_shard_size='5GB'):
    """Write a student folder (config.json, safetensors, selection.json) selected from a Hugging Face teacher
    folder (or hub id). Everything is checked before the first byte is written; the folder appears whole
    (written under a temporary name, then renamed) or not at all. Returns selection.json's content."""
    check_output(output)
    unknown = [c for c in exclude if c not in EXCLUDABLE]
    if unknown:
        raise UserError(f"unknown component to exclude '{unknown[0]}'; choose from {', '.join(EXCLUDABLE)}")
    if head_selection not in HEAD_SELECTIONS:
        raise UserError(f"--head_selection {head_selection}: choose one of {', '.join(HEAD_SELECTIONS)}")
    max_bytes = parse_size(max_shard_size)
    if element_selection not in ELEMENT_SELECTIONS:
        raise UserError(f"--element_selection {element_selection}: choose one of {', '.join(ELEMENT_SELECTIONS)}")
    tensorwise = element_selection in TENSORWISE
    if tensorwise and head_selection == 'heads':
        raise UserError(f'--head_selection heads keeps the same whole heads in every tensor, but --element_selection '
                        f'{element_selection} chooses inside each tensor; pass --head_selection dims (or auto)')
    folder = resolve_teacher(teacher)
    t_cfg = read_config(folder)
    family = family_of(t_cfg, os.path.join(folder, 'config.json'))
    overrides = student_overrides if isinstance(student_overrides, dict) else read_overrides(student_overrides)
    t = widths_of(t_cfg, family, 'teacher')  # first: every field student_config reads is there and whole
    s_cfg, layer_map = student_config(t_cfg, t, overrides, family, layer_map_for(layer_selection))
    s = widths_of(s_cfg, family, 'student')
    check_not_wider(t, s)
    head_mode = 'dims' if tensorwise else \
        head_selection if head_selection != 'auto' else ('heads' if family.rotary else 'dims')
    chooser = IndexChooser('uniform' if tensorwise else element_selection, seed)
    experts = chooser.pick(t.experts, s.experts)  # the experts kept, in order: an axis that every mode keeps whole
    axes = None if tensorwise else {**axis_indices(t, s, family, head_mode, chooser), 'experts': experts,
                                    'each_expert': experts}
    shards = TeacherShards(folder)
    try:
        check_layers_whole(shards, family, t, dense_layers(t_cfg, t.layers) if family.sparse_layers else set())
        planned, unused = plan_tensors(shards, family, t, s, axes, layer_map, experts.tolist(),
                               s_cfg.get('tie_word_embeddings', family.tied_default), set(exclude),
                               t_cfg.get('tie_word_embeddings', family.tied_default),
                               (t_cfg.get('architectures') or [''])[0])
        selector = None
        if tensorwise:  # after the plan, which checks every teacher shape against the config
            selector = TensorwiseSelector(element_selection, seed, family, t, s,
                                          tensorwise_axes(t, s, family, element_selection, shards, experts))
        report = {'meta': {
            'teacher': teacher, 'teacher_folder': os.path.abspath(folder), 'family': family.name,
            'student_config': s_cfg, 'student_overrides': overrides,
            'settings': {'layer_selection': layer_selection, 'element_selection': element_selection, 'seed': seed,
                         'exclude': list(exclude), 'head_selection': head_mode, 'max_shard_size': max_shard_size},
            'layer_map': layer_map, 'versions': utils.versions(('safetensors',))}}
        if family.has_experts:
            report['meta']['experts'] = experts.tolist()  # the teacher expert of each student expert
        if unused:  # the teacher's own output layer, which a tied student replaces with its embedding
            report['meta']['unused'] = unused
        if head_mode == 'heads':  # which teacher heads the student's heads are, in order
            report['meta']['heads'] = {'query': (axes['q'][::t.head_dim] // t.head_dim).tolist(),
                                       'key_value': (axes['kv'][::t.head_dim] // t.head_dim).tolist()}
        report['tensors'] = {p.key: {'action': action_of(p), 'source': p.source,
                                     'teacher_shape': list(p.teacher_shape), 'shape': list(p.shape)}
                             for p in planned}
        make = lambda p, std: produce(p, shards, std, seed, selector, family.norm_init)  # noqa: E731
        write_output(output, s_cfg, planned, make, shards, max_bytes, report)
    finally:
        shards.close()
    report['keys_read'] = shards.keys_read
    return report


def write_output(output, s_cfg, planned, make, shards, max_bytes, report):
    """The student folder, written under a temporary name beside `output` and renamed when complete."""
    tmp = tempfile.mkdtemp(prefix='.tmp-' + os.path.basename(os.path.abspath(output)) + '-',
                           dir=os.path.dirname(os.path.abspath(output)))
    try:
        write_json(os.path.join(tmp, 'config.json'), s_cfg)
        std = s_cfg.get('initializer_range', 0.02)
        ahead = ReadAhead(planned, lambda p: make(p, std), shards.will_need)
        try:
            report['meta']['files'] = write_student(tmp, planned, max_bytes, ahead)
        finally:
            ahead.close()
        report['meta']['teacher_bytes_read'] = shards.bytes_read
        report['meta']['teacher_bytes'] = sum(os.path.getsize(os.path.join(shards.folder, n)) for n in shards.files)
        write_json(os.path.join(tmp, 'selection.json'), report)
        if os.path.isdir(output):
            os.rmdir(output)  # empty (checked before)
        os.rename(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def action_of(p):
    if p.source is None:
        return 'excluded'
    copied = p.shape == p.teacher_shape and not p.reordered and all(i is None for i in p.indices)
    return 'copied' if copied else 'selected'


def run(args):
    """weight_selection.py's command line with a Hugging Face teacher (see its --help)."""
    if not args.student_config:
        raise UserError(f'--teacher {args.teacher} is a Hugging Face folder: describe the student with '
                        f"--student_config '{{\"hidden_size\": ..., \"num_hidden_layers\": ...}}' "
                        f'(or a config.json file)')
    if not args.teacher or not args.output:
        raise UserError('missing --teacher or --output; e.g. --teacher HF_FOLDER --student_config '
                        "'{\"num_hidden_layers\": 4}' --output OUT_FOLDER")
    import time
    start = time.time()
    exclude = [c.strip() for c in args.exclude.split(',') if c.strip()]
    report = select_hf(args.teacher, read_overrides(args.student_config), args.output, args.layer_selection,
                       args.element_selection, args.seed, exclude, args.head_selection, args.max_shard_size)
    meta, counts = report['meta'], {}
    for entry in report['tensors'].values():
        counts[entry['action']] = counts.get(entry['action'], 0) + 1
    acts = ', '.join(f'{n} {a}' for a, n in sorted(counts.items()))
    ranking = ' (with the whole teacher once for the ranking)' if args.element_selection == 'l1_consistent' else ''
    experts = f", experts {meta['experts']}" if 'experts' in meta else ''
    if 'unused' in meta:
        print(f"note: the teacher's untied {', '.join(meta['unused'])} is left out: the student ties its output "
              f'layer to its input embedding (tie_word_embeddings)', file=sys.stdout)
    print(f"{meta['family']} student <- {args.teacher} (layers {meta['layer_map']}{experts}, "
          f"{meta['settings']['element_selection']} elements, {meta['settings']['head_selection']} attention): "
          f"{acts}; read {meta['teacher_bytes_read'] / 1e6:.1f} MB of the teacher's "
          f"{meta['teacher_bytes'] / 1e6:.1f} MB{ranking}; "
          f"wrote {args.output} ({len(meta['files'])} shard(s)) in {time.time() - start:.1f}s", file=sys.stdout)
