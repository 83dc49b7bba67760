"""Families: the config.json fields of every width, the layer keys, and the axes ("widths") of every tensor; which
family a teacher is, its widths, and what each of its keys becomes in the student."""
import re
from dataclasses import dataclass, replace

from utils import UserError


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
