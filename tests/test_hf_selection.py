"""Weight selection from Hugging Face checkpoints (the hf_selection package): tiny random LLaMA (GQA), Qwen2/3, Gemma,
Phi-3, OLMo 2, mixtures of experts (gpt-oss's stacked, and MXFP4-packed), GPT-NeoX, GPT-2, BERT, ViT and DINOv2
teachers saved in shards by transformers; every student tensor is checked against index lists written out here."""
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip('transformers', reason='the Hugging Face tests need transformers '
                                                          '(pip install -r requirements-hf.txt)')

import hf_selection  # noqa: E402
import safetensors_io  # noqa: E402
import weight_selection  # noqa: E402
from conftest import ROOT, assert_clean_failure, expect_cli_error, run_script  # noqa: E402
from utils import UserError  # noqa: E402

transformers.logging.set_verbosity_error()

EVEN16 = list(range(0, 32, 2))    # Algorithm 1 on 32 -> 16: 32 // 16 = 2, so 0, 2, 4, ..., 30
INTER_48_20 = [0, 2, 5, 7, 10, 12, 15, 17, 20, 22, 25, 27, 30, 32, 35, 37, 40, 42, 45, 47]  # round(linspace(0, 47, 20))
INTER_128_48 = [0, 3, 5, 8, 11, 14, 16, 19, 22, 24, 27, 30, 32, 35, 38, 41, 43, 46, 49, 51, 54, 57, 59, 62, 65, 68,
                70, 73, 76, 78, 81, 84, 86, 89, 92, 95, 97, 100, 103, 105, 108, 111, 113, 116, 119, 122, 124, 127]


def rows(heads, head_dim=4):
    return [h * head_dim + d for h in heads for d in range(head_dim)]


LLAMA = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4,
             vocab_size=64, max_position_embeddings=32, tie_word_embeddings=False)
# head_dim 4 is kept: 4 query heads in 2 KV groups of 2
LLAMA_STUDENT = dict(hidden_size=16, intermediate_size=20, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2)


def save_teacher(folder, model):
    """Every parameter drawn at random first: a fresh model's norms are all ones and its biases all zeros,
    which any selection would reproduce."""
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.2)
    model.save_pretrained(folder, max_shard_size='20KB')
    return str(folder)


@pytest.fixture(scope='module')
def llama(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()
    return save_teacher(tmp_path_factory.mktemp('llama'), model), model.state_dict()


@pytest.fixture(scope='module')
def gpt2(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_head=4, n_layer=4, n_positions=64, vocab_size=64,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    return save_teacher(tmp_path_factory.mktemp('gpt2'), model), model.state_dict()


def load_strict(folder, auto=None, **model_kwargs):
    """from_pretrained with no missing, unexpected or mismatched key (a causal LM unless `auto` names a class)."""
    auto = auto or transformers.AutoModelForCausalLM
    model, info = auto.from_pretrained(folder, output_loading_info=True, **model_kwargs)
    assert not info['missing_keys'] and not info['unexpected_keys'] and not info['mismatched_keys'], info
    return model.eval()


def assert_stops_writing_nothing(teacher, overrides, tmp_path, match):
    """select_hf stops with one UserError matching `match`, and leaves no student and no temporary folder."""
    out = tmp_path / 'out' / 's'
    out.parent.mkdir()
    with pytest.raises(UserError, match=match):
        hf_selection.select_hf(teacher, overrides, str(out))
    assert os.listdir(out.parent) == []


def pick(tensor, *index_lists):
    for dim, idx in enumerate(index_lists):
        if idx is not None:
            tensor = tensor.index_select(dim, torch.tensor(idx))
    return tensor


def selected(s, t, key, *index_lists):
    """The student's tensor `key` is the teacher's with these indices kept along each dimension."""
    return torch.equal(s[key], pick(t[key], *index_lists))


def assert_tensors_are(s, expected):
    """The student holds exactly the keys of `expected`, each tensor equal to its expected value."""
    assert set(s) == set(expected)
    for key, value in expected.items():
        assert torch.equal(s[key], value), key


def forward_finite(model):
    logits = model(torch.tensor([[1, 5, 9, 3]]), use_cache=False).logits
    assert torch.isfinite(logits).all()
    return logits


# ---------------------------------------------------------------------------------------------- LLaMA

@pytest.mark.parametrize('selection,layers', [('first', [0, 1, 2]), ('uniform', [0, 2, 4]), ('mid', [1, 2, 3]),
                                              ('last', [3, 4, 5]), ('5,0,3', [5, 0, 3])])
def test_llama_gqa_every_tensor(llama, tmp_path, selection, layers):
    folder, t = llama
    report = hf_selection.select_hf(folder, LLAMA_STUDENT, str(tmp_path / 's'), layer_selection=selection,
                                    max_shard_size='10KB')
    s = load_strict(str(tmp_path / 's')).state_dict()
    assert os.path.isfile(tmp_path / 's' / 'model.safetensors.index.json')  # 10KB shards: several files
    h, inter = EVEN16, INTER_48_20
    # heads: KV groups 0 and 2 of 4 (Algorithm 1 on 4 -> 2), each with both of its query heads
    q, kv = rows([0, 1, 4, 5]), rows([0, 2])
    expected = {'model.embed_tokens.weight': pick(t['model.embed_tokens.weight'], None, h),
                'lm_head.weight': pick(t['lm_head.weight'], None, h),
                'model.norm.weight': pick(t['model.norm.weight'], h)}
    for j, i in enumerate(layers):
        src, dst = f'model.layers.{i}.', f'model.layers.{j}.'
        for name, idx in [('self_attn.q_proj.weight', (q, h)), ('self_attn.k_proj.weight', (kv, h)),
                          ('self_attn.v_proj.weight', (kv, h)), ('self_attn.o_proj.weight', (h, q)),
                          ('mlp.gate_proj.weight', (inter, h)), ('mlp.up_proj.weight', (inter, h)),
                          ('mlp.down_proj.weight', (h, inter)), ('input_layernorm.weight', (h,)),
                          ('post_attention_layernorm.weight', (h,))]:
            expected[dst + name] = pick(t[src + name], *idx)
    assert_tensors_are(s, expected)
    assert report['meta']['layer_map'] == layers
    assert report['tensors']['model.layers.0.self_attn.q_proj.weight']['source'] == \
        f'model.layers.{layers[0]}.self_attn.q_proj.weight'
    forward_finite(load_strict(str(tmp_path / 's')))


def test_llama_reads_only_selected_layers(llama, tmp_path):
    folder, _ = llama
    report = hf_selection.select_hf(folder, {'num_hidden_layers': 2}, str(tmp_path / 's'), layer_selection='last')
    layers_read = {int(k.split('.')[2]) for k in report['keys_read'] if k.startswith('model.layers.')}
    assert layers_read == {4, 5}
    assert report['meta']['teacher_bytes_read'] < report['meta']['teacher_bytes'] / 2
    # a student under the default 5GB max_shard_size: a single model.safetensors, as transformers writes it
    assert sorted(os.listdir(tmp_path / 's')) == ['config.json', 'model.safetensors', 'selection.json']


def test_student_config_from_a_file(llama, tmp_path):
    folder, t = llama
    config = dict(json.load(open(os.path.join(folder, 'config.json'))), **LLAMA_STUDENT)
    json.dump(config, open(tmp_path / 'student.json', 'w'))
    hf_selection.select_hf(folder, hf_selection.read_overrides(str(tmp_path / 'student.json')), str(tmp_path / 's'))
    s = load_strict(str(tmp_path / 's')).state_dict()
    assert selected(s, t, 'model.layers.2.mlp.up_proj.weight', INTER_48_20, EVEN16)
    json.dump(dict(config, model_type='mistral'), open(tmp_path / 'other.json', 'w'))
    with pytest.raises(UserError, match="model_type 'mistral' differs from the teacher's 'llama'"):
        hf_selection.select_hf(folder, hf_selection.read_overrides(str(tmp_path / 'other.json')), str(tmp_path / 'o'))


def test_student_config_written_in_full_or_as_a_folder(llama, tmp_path):
    """A config.json that transformers writes in full restates its common fields at their defaults, with a null
    class and dtype: these are not the user's changes, and the student is the one its sizes alone give."""
    folder, t = llama
    transformers.LlamaConfig(**dict(LLAMA, **LLAMA_STUDENT)).to_json_file(tmp_path / 'full.json', use_diff=False)
    full = json.load(open(tmp_path / 'full.json'))
    assert {'return_dict', 'id2label', '_name_or_path'} <= set(full) and full['architectures'] is None
    hf_selection.select_hf(folder, hf_selection.read_overrides(str(tmp_path / 'full.json')), str(tmp_path / 'a'))
    hf_selection.select_hf(folder, dict(LLAMA_STUDENT), str(tmp_path / 'b'))
    written = [json.load(open(tmp_path / s / 'config.json')) for s in 'ab']
    assert written[0] == written[1] and written[0]['architectures'] == ['LlamaForCausalLM']
    # a folder, as from_pretrained takes it: a student's own folder gives the same student again
    hf_selection.select_hf(folder, hf_selection.read_overrides(str(tmp_path / 'a')), str(tmp_path / 'c'))
    assert json.load(open(tmp_path / 'c' / 'config.json')) == written[0]
    with pytest.raises(UserError, match=r"dtype stays the teacher's \('float32'\)"):
        hf_selection.select_hf(folder, dict(LLAMA_STUDENT, dtype='bfloat16'), str(tmp_path / 'd'))  # 4.x: torch_dtype
    with pytest.raises(UserError, match="'return_dict' is not a field"):  # not the default: the user's change
        hf_selection.select_hf(folder, dict(LLAMA_STUDENT, return_dict=False), str(tmp_path / 'e'))


def test_llama_dims_mode(llama, tmp_path):
    folder, t = llama
    hf_selection.select_hf(folder, LLAMA_STUDENT, str(tmp_path / 's'), head_selection='dims')
    s = load_strict(str(tmp_path / 's')).state_dict()
    q, kv = EVEN16, list(range(0, 16, 2))  # per dimension: 32 -> 16 and 16 -> 8, stride 2 (mixes heads)
    assert selected(s, t, 'model.layers.0.self_attn.q_proj.weight', q, EVEN16)
    assert selected(s, t, 'model.layers.0.self_attn.k_proj.weight', kv, EVEN16)
    assert selected(s, t, 'model.layers.0.self_attn.o_proj.weight', EVEN16, q)


def test_heads_stay_whole_and_with_their_kv_group(llama, tmp_path):
    """Each student query head equals one whole teacher query head, and its KV head is that teacher head's own."""
    folder, t = llama
    hf_selection.select_hf(folder, dict(LLAMA_STUDENT, num_attention_heads=2, num_key_value_heads=2, head_dim=4),
                           str(tmp_path / 's'))
    s = load_strict(str(tmp_path / 's')).state_dict()
    wq_t = pick(t['model.layers.0.self_attn.q_proj.weight'], None, EVEN16).reshape(8, 4, 16)
    wk_t = pick(t['model.layers.0.self_attn.k_proj.weight'], None, EVEN16).reshape(4, 4, 16)
    wq_s = s['model.layers.0.self_attn.q_proj.weight'].reshape(2, 4, 16)
    wk_s = s['model.layers.0.self_attn.k_proj.weight'].reshape(2, 4, 16)
    found = []
    for hs in range(2):
        ht = [h for h in range(8) if torch.equal(wq_s[hs], wq_t[h])]
        assert len(ht) == 1, 'a student query head is not one whole teacher head'
        assert torch.equal(wk_s[hs], wk_t[ht[0] // 2]), 'a query head lost its own KV head'
        found.append(ht[0])
    assert found == [0, 4]  # KV groups 0 and 2, the first query head of each (Algorithm 1 on 2 -> 1)
    meta = json.load(open(tmp_path / 's' / 'selection.json'))['meta']
    assert meta['heads'] == {'query': [0, 4], 'key_value': [0, 2]} and meta['settings']['head_selection'] == 'heads'


def test_same_width_shallower_student_is_the_truncated_teacher(llama, tmp_path):
    folder, _ = llama
    hf_selection.select_hf(folder, {'num_hidden_layers': 3}, str(tmp_path / 's'), layer_selection='uniform')
    student = load_strict(str(tmp_path / 's'))
    teacher = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    teacher.model.layers = torch.nn.ModuleList([teacher.model.layers[i] for i in (0, 2, 4)])
    teacher.config.num_hidden_layers = 3
    with torch.no_grad():
        assert torch.equal(forward_finite(student), forward_finite(teacher))


def test_llama_base_model_checkpoint(llama, tmp_path):
    """A LlamaModel checkpoint (keys without `model.`, as LLM-based embedding models ship): a same-width shallower
    student is the truncated base model, keys as the teacher's, and loads strictly as a LlamaModel."""
    torch.manual_seed(0)
    base = transformers.LlamaModel(transformers.LlamaConfig(**LLAMA)).eval()
    folder = save_teacher(tmp_path / 't', base)
    assert any(k.startswith('layers.') for k in saved_tensors(folder))
    hf_selection.select_hf(folder, {'num_hidden_layers': 2}, str(tmp_path / 's'))
    student = load_strict(str(tmp_path / 's'), transformers.LlamaModel)
    base.layers = base.layers[:2]
    base.config.num_hidden_layers = 2
    x = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(student(x).last_hidden_state, base(x).last_hidden_state)
    hf_selection.select_hf(folder, LLAMA_STUDENT, str(tmp_path / 'narrow'))
    load_strict(str(tmp_path / 'narrow'), transformers.LlamaModel)
    # its keys say base model even where its config names a causal LM (as some embedding models' do), tied or not:
    # no output layer is asked for, nor made for an untied student
    config = json.load(open(os.path.join(folder, 'config.json')))
    for tied in (False, True):
        json.dump(dict(config, architectures=['LlamaForCausalLM'], tie_word_embeddings=tied),
                  open(os.path.join(folder, 'config.json'), 'w'))
        report = hf_selection.select_hf(folder, dict(LLAMA_STUDENT, tie_word_embeddings=False),
                                        str(tmp_path / f'named_{tied}'))
        assert 'lm_head.weight' not in report['tensors']
        load_strict(str(tmp_path / f'named_{tied}'), transformers.LlamaModel)


def test_untie_a_student_whose_teacher_config_leaves_tying_to_the_default(gpt2, tmp_path):
    """GPT-2's hub config.json has no tie_word_embeddings (tied by default): a student can still be untied, and
    its lm_head starts as its selected embedding."""
    folder, _ = gpt2
    copy = shutil.copytree(folder, tmp_path / 't')
    config = json.load(open(copy / 'config.json'))
    config.pop('tie_word_embeddings', None)
    json.dump(config, open(copy / 'config.json', 'w'))
    hf_selection.select_hf(str(copy), dict(n_embd=16, n_head=2, tie_word_embeddings=False), str(tmp_path / 's'))
    s = load_strict(str(tmp_path / 's')).state_dict()
    assert torch.equal(s['lm_head.weight'], s['transformer.wte.weight'])
    assert s['lm_head.weight'].data_ptr() != s['transformer.wte.weight'].data_ptr()


def test_qwen2_tied_teacher_untied_student_with_biases(tmp_path):
    torch.manual_seed(0)
    config = transformers.Qwen2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=8,
                                      num_key_value_heads=4, vocab_size=64, tie_word_embeddings=True)
    model = transformers.Qwen2ForCausalLM(config)
    folder = save_teacher(tmp_path / 't', model)
    t = model.state_dict()
    report = hf_selection.select_hf(folder, dict(LLAMA_STUDENT, num_hidden_layers=1, tie_word_embeddings=False),
                                    str(tmp_path / 's'), exclude=['mlp'])
    s = load_strict(str(tmp_path / 's')).state_dict()
    assert torch.equal(s['lm_head.weight'], pick(t['model.embed_tokens.weight'], None, EVEN16))
    assert selected(s, t, 'model.layers.0.self_attn.q_proj.bias', rows([0, 1, 4, 5]))
    assert selected(s, t, 'model.layers.0.self_attn.k_proj.bias', rows([0, 2]))
    assert report['tensors']['model.layers.0.mlp.up_proj.weight']['action'] == 'excluded'
    assert not selected(s, t, 'model.layers.0.mlp.up_proj.weight', INTER_48_20, EVEN16)
    assert json.load(open(tmp_path / 's' / 'config.json'))['layer_types'] == ['full_attention']


@pytest.mark.parametrize('head_selection', ['auto', 'dims'])
def test_qwen3_per_head_norms(tmp_path, head_selection):
    """Qwen3 adds an RMSNorm of head_dim over each head's queries and keys: kept whole with whole heads (auto),
    its dims chosen as any width's when heads are mixed (dims); everything else as LLaMA's."""
    torch.manual_seed(0)
    config = transformers.Qwen3Config(**LLAMA, head_dim=8)
    model = transformers.Qwen3ForCausalLM(config).eval()
    folder, t = save_teacher(tmp_path / 't', model), model.state_dict()
    student = dict(LLAMA_STUDENT, head_dim=8 if head_selection == 'auto' else 4)
    report = hf_selection.select_hf(folder, student, str(tmp_path / 's'), head_selection=head_selection)
    s = load_strict(str(tmp_path / 's')).state_dict()
    assert report['meta']['family'] == 'qwen3'
    if head_selection == 'auto':  # 8 heads of 8 dims in 4 KV groups -> 4 heads: groups 0 and 2, both heads of each
        within, q, kv = list(range(8)), rows([0, 1, 4, 5], 8), rows([0, 2], 8)
    else:  # per dimension: 64 -> 16 query dims, 32 -> 8 key/value dims, 8 -> 4 within a head (stride 2 or 4)
        within, q, kv = [0, 2, 4, 6], list(range(0, 64, 4)), list(range(0, 32, 4))
    for name, idx in [('self_attn.q_norm.weight', (within,)), ('self_attn.k_norm.weight', (within,)),
                      ('self_attn.q_proj.weight', (q, EVEN16)), ('self_attn.k_proj.weight', (kv, EVEN16)),
                      ('self_attn.o_proj.weight', (EVEN16, q)), ('mlp.up_proj.weight', (INTER_48_20, EVEN16))]:
        assert selected(s, t, f'model.layers.1.{name}', *idx), name
    forward_finite(load_strict(str(tmp_path / 's')))
    if head_selection == 'dims':  # the per-tensor modes choose the norms' dims inside each norm
        for mode in hf_selection.TENSORWISE:
            hf_selection.select_hf(folder, student, str(tmp_path / mode), element_selection=mode)
            forward_finite(load_strict(str(tmp_path / mode)))
    hf_selection.select_hf(folder, {'num_hidden_layers': 2}, str(tmp_path / 'same'))  # same width: the truncated teacher
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    with torch.no_grad():
        assert torch.equal(forward_finite(load_strict(str(tmp_path / 'same'))), forward_finite(model))


GEMMAS = {'gemma': ('GemmaConfig', 'GemmaForCausalLM'), 'gemma2': ('Gemma2Config', 'Gemma2ForCausalLM'),
          'gemma3_text': ('Gemma3TextConfig', 'Gemma3ForCausalLM')}


@pytest.mark.parametrize('model_type', GEMMAS)
def test_gemma_families(tmp_path, model_type):
    """Gemma: tied embeddings by default, and norms that scale by (1 + weight), so an excluded norm starts at 0;
    Gemma 2 and 3 add norms before and after the MLP, Gemma 3 per-head q/k norms."""
    config_cls, model_cls = (getattr(transformers, name) for name in GEMMAS[model_type])
    torch.manual_seed(0)
    config = config_cls(**{k: v for k, v in LLAMA.items() if k != 'tie_word_embeddings'}, head_dim=4)
    model = model_cls(config).eval()
    folder, t = save_teacher(tmp_path / 't', model), model.state_dict()
    report = hf_selection.select_hf(folder, LLAMA_STUDENT, str(tmp_path / 's'), layer_selection='uniform')
    s = load_strict(str(tmp_path / 's')).state_dict()
    assert report['meta']['family'] == model_type and 'lm_head.weight' not in report['tensors']  # tied
    norms = ['input_layernorm', 'post_attention_layernorm'] + \
        (['pre_feedforward_layernorm', 'post_feedforward_layernorm'] if model_type != 'gemma' else [])
    q = rows([0, 1, 4, 5])  # whole heads, as for LLaMA
    expected = [(f'{n}.weight', (EVEN16,)) for n in norms] + [('self_attn.q_proj.weight', (q, EVEN16)),
                                                              ('mlp.down_proj.weight', (EVEN16, INTER_48_20))]
    if model_type == 'gemma3_text':
        expected += [('self_attn.q_norm.weight', (None,)), ('self_attn.k_norm.weight', (None,))]
    for name, idx in expected:
        assert torch.equal(s[f'model.layers.1.{name}'], pick(t[f'model.layers.2.{name}'], *idx)), name  # uniform
    forward_finite(load_strict(str(tmp_path / 's')))
    hf_selection.select_hf(folder, LLAMA_STUDENT, str(tmp_path / 'x'), exclude=['norm'])
    excluded = load_strict(str(tmp_path / 'x')).state_dict()
    assert all(torch.equal(v, torch.zeros_like(v)) for k, v in excluded.items() if 'norm' in k)
    hf_selection.select_hf(folder, {'num_hidden_layers': 2}, str(tmp_path / 'same'))
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    if getattr(model.config, 'layer_types', None):
        model.config.layer_types = model.config.layer_types[:2]
    with torch.no_grad():
        assert torch.equal(forward_finite(load_strict(str(tmp_path / 'same'))), forward_finite(model))


def test_phi3_fused_projections(tmp_path):
    """Phi-3 holds q, k, v in one qkv_proj and gate, up in one gate_up_proj: each part keeps the rows its own
    tensor would (whole heads with their KV groups; the MLP width's set in both halves)."""
    torch.manual_seed(0)
    config = transformers.Phi3Config(**LLAMA, pad_token_id=0, eos_token_id=0, bos_token_id=0)
    model = transformers.Phi3ForCausalLM(config).eval()
    folder, t = save_teacher(tmp_path / 't', model), model.state_dict()
    hf_selection.select_hf(folder, LLAMA_STUDENT, str(tmp_path / 's'))
    s = load_strict(str(tmp_path / 's')).state_dict()
    q, kv = rows([0, 1, 4, 5]), rows([0, 2])  # as for the LLaMA teacher of the same shape
    qkv = q + [32 + i for i in kv] + [48 + i for i in kv]  # q rows 0..31, k 32..47, v 48..63
    assert selected(s, t, 'model.layers.0.self_attn.qkv_proj.weight', qkv, EVEN16)
    assert selected(s, t, 'model.layers.0.self_attn.o_proj.weight', EVEN16, q)
    assert selected(s, t, 'model.layers.0.mlp.gate_up_proj.weight', INTER_48_20 + [48 + i for i in INTER_48_20], EVEN16)
    assert selected(s, t, 'model.layers.0.mlp.down_proj.weight', EVEN16, INTER_48_20)
    forward_finite(load_strict(str(tmp_path / 's')))
    for mode in hf_selection.TENSORWISE:  # the parts chosen each on its own, the whole loads
        hf_selection.select_hf(folder, LLAMA_STUDENT, str(tmp_path / mode), element_selection=mode)
        forward_finite(load_strict(str(tmp_path / mode)))
    w = t['model.layers.0.mlp.gate_up_proj.weight']
    l1 = load_strict(str(tmp_path / 'l1')).state_dict()['model.layers.0.mlp.gate_up_proj.weight']
    assert torch.equal(l1, torch.cat([pick(h, top_l1(h, 0, 20), top_l1(h, 1, 16)) for h in (w[:48], w[48:])]))
    hf_selection.select_hf(folder, {'num_hidden_layers': 2}, str(tmp_path / 'same'))
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    with torch.no_grad():
        assert torch.equal(forward_finite(load_strict(str(tmp_path / 'same'))), forward_finite(model))


def test_olmo2_norms_after_attention_and_mlp(tmp_path):
    """OLMo 2: no input norm, a norm after attention and after the MLP, and an RMSNorm over all the queries and
    all the keys: each norm keeps the rows of the projection it follows (whole heads with their KV groups)."""
    torch.manual_seed(0)
    model = transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**LLAMA, pad_token_id=0, eos_token_id=0)).eval()
    folder, t = save_teacher(tmp_path / 't', model), model.state_dict()
    hf_selection.select_hf(folder, LLAMA_STUDENT, str(tmp_path / 's'))
    s = load_strict(str(tmp_path / 's')).state_dict()
    q, kv = rows([0, 1, 4, 5]), rows([0, 2])
    for name, idx in [('self_attn.q_norm.weight', (q,)), ('self_attn.k_norm.weight', (kv,)),
                      ('self_attn.q_proj.weight', (q, EVEN16)), ('self_attn.k_proj.weight', (kv, EVEN16)),
                      ('post_attention_layernorm.weight', (EVEN16,)), ('post_feedforward_layernorm.weight', (EVEN16,)),
                      ('mlp.down_proj.weight', (EVEN16, INTER_48_20))]:
        assert selected(s, t, f'model.layers.2.{name}', *idx), name
    assert not any('input_layernorm' in k for k in s)
    forward_finite(load_strict(str(tmp_path / 's')))
    hf_selection.select_hf(folder, {'num_hidden_layers': 2}, str(tmp_path / 'same'))
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    with torch.no_grad():
        assert torch.equal(forward_finite(load_strict(str(tmp_path / 'same'))), forward_finite(model))


# ---------------------------------------------------------------------------------------------- mixtures of experts

# model_type: config and model classes, the teacher's MoE fields, the student's, and the expert's key and projections
MOES = {
    'mixtral': ('MixtralConfig', 'MixtralForCausalLM', dict(num_local_experts=8), dict(num_local_experts=4),
                'block_sparse_moe', ('w1', 'w3', 'w2')),
    'olmoe': ('OlmoeConfig', 'OlmoeForCausalLM', dict(num_experts=8), dict(num_experts=4), 'mlp',
              ('gate_proj', 'up_proj', 'down_proj')),
    # Qwen's dense layers (intermediate_size 40) and experts (moe_intermediate_size 48) differ in width
    'qwen3_moe': ('Qwen3MoeConfig', 'Qwen3MoeForCausalLM',
                  dict(num_experts=8, moe_intermediate_size=48, head_dim=4, intermediate_size=40),
                  dict(num_experts=4, moe_intermediate_size=20), 'mlp', ('gate_proj', 'up_proj', 'down_proj')),
    'qwen2_moe': ('Qwen2MoeConfig', 'Qwen2MoeForCausalLM',
                  dict(num_experts=8, moe_intermediate_size=48, shared_expert_intermediate_size=128,
                       intermediate_size=40),
                  dict(num_experts=4, moe_intermediate_size=20, shared_expert_intermediate_size=48), 'mlp',
                  ('gate_proj', 'up_proj', 'down_proj')),
}


def saved_tensors(folder):
    """A saved model's tensors as stored (experts one by one), read with the safetensors package."""
    from safetensors.torch import load_file
    return {k: v for name in os.listdir(folder) if name.endswith('.safetensors')
            for k, v in load_file(os.path.join(folder, name)).items()}


def moe_teacher(tmp_path, model_type, **extra):
    config_cls, model_cls, teacher, student, moe, projections = MOES[model_type]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{**LLAMA, **teacher, **extra}, num_experts_per_tok=2, pad_token_id=0,
                                               eos_token_id=0, bos_token_id=0)
    model = getattr(transformers, model_cls)(config).eval()
    return save_teacher(tmp_path / 't', model), model, dict(LLAMA_STUDENT, **student), moe, projections


@pytest.mark.parametrize('model_type', MOES)
def test_mixture_of_experts_keeps_whole_experts_and_their_router_rows(tmp_path, model_type):
    """8 experts -> 4: Algorithm 1's uniform set 0, 2, 4, 6 (stride 8 // 4), each expert selected as a LLaMA MLP and
    the router keeping those experts' rows; checked on the files as stored, and the student loads and runs."""
    folder, _, student, moe, (gate, up, down) = moe_teacher(tmp_path, model_type)
    report = hf_selection.select_hf(folder, student, str(tmp_path / 's'), layer_selection='uniform')
    load_strict(str(tmp_path / 's'))
    t, s = saved_tensors(folder), saved_tensors(str(tmp_path / 's'))
    kept = [0, 2, 4, 6]
    assert report['meta']['experts'] == kept and report['meta']['family'] == model_type
    for j, i in enumerate([0, 2, 4]):
        router = f'model.layers.{{}}.{moe}.gate.weight'
        assert torch.equal(s[router.format(j)], pick(t[router.format(i)], kept, EVEN16))
        for k, e in enumerate(kept):
            for name, idx in [(gate, (INTER_48_20, EVEN16)), (up, (INTER_48_20, EVEN16)),
                              (down, (EVEN16, INTER_48_20))]:
                key = f'model.layers.{{}}.{moe}.experts.{{}}.{name}.weight'
                assert torch.equal(s[key.format(j, k)], pick(t[key.format(i, e)], *idx)), (j, k, name)
    assert not any(f'experts.{k}.' in key for key in s for k in range(4, 8))
    if model_type == 'qwen2_moe':  # the shared expert is one more MLP; its 1-row gate keeps its row
        for name, idx in [('shared_expert.up_proj', (INTER_128_48, EVEN16)), ('shared_expert_gate', (None, EVEN16))]:
            key = f'model.layers.{{}}.mlp.{name}.weight'
            assert torch.equal(s[key.format(1)], pick(t[key.format(2)], *idx))
    forward_finite(load_strict(str(tmp_path / 's')))


@pytest.mark.parametrize('model_type', MOES)
def test_mixture_of_experts_tensorwise_modes_keep_the_uniform_experts(tmp_path, model_type):
    """The per-tensor modes choose inside each tensor, but the experts (and so the router's rows) are the same set
    in every layer: uniform. Under magnitude, each router row keeps its own largest weights, in order."""
    folder, _, student, moe, _ = moe_teacher(tmp_path, model_type)
    t = saved_tensors(folder)
    for mode in hf_selection.TENSORWISE:
        report = hf_selection.select_hf(folder, student, str(tmp_path / mode), element_selection=mode)
        assert report['meta']['experts'] == [0, 2, 4, 6]
        forward_finite(load_strict(str(tmp_path / mode)))
    router = t[f'model.layers.1.{moe}.gate.weight'][[0, 2, 4, 6]]
    largest = first_largest(router.abs(), 16)
    s = saved_tensors(str(tmp_path / 'magnitude'))
    assert torch.equal(s[f'model.layers.1.{moe}.gate.weight'], router.gather(1, largest))


@pytest.mark.parametrize('model_type', MOES)
def test_mixture_of_experts_same_width_shallower_is_the_truncated_teacher(tmp_path, model_type):
    folder, model, _, _, _ = moe_teacher(tmp_path, model_type)
    hf_selection.select_hf(folder, {'num_hidden_layers': 2}, str(tmp_path / 'same'))
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    with torch.no_grad():
        assert torch.equal(forward_finite(load_strict(str(tmp_path / 'same'))), forward_finite(model))


@pytest.mark.parametrize('model_type', MOES)
def test_mixture_of_experts_base_model_checkpoint(tmp_path, model_type):
    """A base model's file (MixtralModel, ...: keys without 'model.', no lm_head) gives a base student, which
    loads strictly with AutoModel and, as wide as its teacher, computes the truncated teacher's hidden states."""
    folder, model, _, _, _ = moe_teacher(tmp_path, model_type)
    base = save_teacher_as_is(model.model, tmp_path / 'base')
    hf_selection.select_hf(base, {'num_hidden_layers': 2}, str(tmp_path / 's'))
    assert not any(k.startswith('model.') or k == 'lm_head.weight' for k in saved_tensors(str(tmp_path / 's')))
    student = load_strict(str(tmp_path / 's'), transformers.AutoModel)
    model.model.layers = model.model.layers[:2]
    model.model.config.num_hidden_layers = 2
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(student(ids).last_hidden_state, model.model(ids).last_hidden_state)


@pytest.mark.parametrize('model_type,dense,layer_selection,student_dense', [
    ('qwen3_moe', dict(mlp_only_layers=[2]), 'uniform', [1]),     # teacher layers 0, 2, 4: the second is dense
    ('qwen2_moe', dict(decoder_sparse_step=2), 'first', [0, 2]),  # experts in layers 1, 3, 5 only
])
def test_qwen_moe_dense_layers_follow_layer_selection(tmp_path, model_type, dense, layer_selection, student_dense):
    """A student layer has a dense MLP where its teacher layer has one: the student's config names them."""
    folder, _, student, _, _ = moe_teacher(tmp_path, model_type, **dense)
    report = hf_selection.select_hf(folder, student, str(tmp_path / 's'), layer_selection=layer_selection)
    config = json.load(open(tmp_path / 's' / 'config.json'))
    assert config['mlp_only_layers'] == student_dense and config['decoder_sparse_step'] == 1
    s, t = load_strict(str(tmp_path / 's')).state_dict(), saved_tensors(folder)
    teacher_of = report['meta']['layer_map']
    for j in range(3):
        has_experts = any(k.startswith(f'model.layers.{j}.mlp.experts') for k in s)
        assert has_experts == (j not in student_dense)
        if j in student_dense:
            assert torch.equal(s[f'model.layers.{j}.mlp.down_proj.weight'],
                               pick(t[f'model.layers.{teacher_of[j]}.mlp.down_proj.weight'], EVEN16,
                                    list(range(0, 40, 2))))
    forward_finite(load_strict(str(tmp_path / 's')))
    with pytest.raises(UserError, match='mlp_only_layers follows layer selection'):
        hf_selection.select_hf(folder, dict(student, mlp_only_layers=[]), str(tmp_path / 'x'))


def edit_json(name, change):
    """A damage for broken_copy: the copy's JSON file `name` replaced by change(its content)."""
    def damage(copy):
        content = json.load(open(copy / name))
        json.dump(change(content), open(copy / name, 'w'))
    return damage


def without(pattern):
    """A damage for broken_copy: the teacher's tensors whose key matches `pattern` removed from their shards (each
    rewritten without them) and from the index."""
    from safetensors.torch import load_file, save_file

    def damage(copy):
        index = json.load(open(copy / 'model.safetensors.index.json'))
        for key in [k for k in index['weight_map'] if re.fullmatch(pattern, k)]:
            shard = copy / index['weight_map'].pop(key)
            tensors = load_file(str(shard))
            del tensors[key]
            save_file(tensors, str(shard), metadata={'format': 'pt'})
        json.dump(index, open(copy / 'model.safetensors.index.json', 'w'))
    return damage


both_counts = edit_json('config.json', lambda config: dict(config, num_local_experts=8, num_experts=4))


@pytest.mark.parametrize('damage,overrides,match', [
    (None, {'num_local_experts': 16}, 'the student has experts 16 where the teacher has 8'),
    (None, {'num_local_experts': 1},
     r'student: num_experts_per_tok is 2; it must be between 1 and num_local_experts \(1\)'),
    (None, {'num_experts': 0}, 'num_experts must be a positive whole number, got 0'),
    (None, {'num_experts': 4, 'num_local_experts': 2}, 'gives num_experts and num_local_experts, two names of one'),
    (both_counts, {}, 'teacher: config gives the expert count twice, differently: num_local_experts 8, num_experts 4'),
    (without(r'model\.layers\.0\.block_sparse_moe\.experts\.2\.w2\.weight'), {'num_local_experts': 4},
     r"no 'model\.layers\.0\.block_sparse_moe\.experts\.2\.w2\.weight' though its config.json gives each layer 8 "
     'experts; the checkpoint does not match its config'),
    (without(r'model\.layers\.1\.block_sparse_moe\.experts\.\d\.w2\.weight'), {},  # every expert's w2 in a layer
     r"no 'model\.layers\.1\.block_sparse_moe\.experts\.\*\.w2\.weight' though its other layers have it"),
    (without(r'model\.layers\.5\.block_sparse_moe\.gate\.weight'), {},
     r"no 'model\.layers\.5\.block_sparse_moe\.gate\.weight' though its other layers have it"),
])
def test_mixture_of_experts_bad_input(tmp_path, damage, overrides, match):
    folder, *_ = moe_teacher(tmp_path, 'mixtral')
    assert_stops_writing_nothing(broken_copy(folder, tmp_path, damage) if damage else folder, overrides, tmp_path,
                                 match)


@pytest.mark.parametrize('mode,kept', [('consecutive', [0, 1, 2, 3]), ('random', None)])
def test_mixture_of_experts_expert_set_follows_the_element_selection(tmp_path, mode, kept):
    """consecutive keeps the first experts; random a random set, the same in every layer; each student router row
    is its expert's teacher row on the hidden indices the layer's norm keeps (found by value: teacher values are
    distinct draws). A student with as many experts per token as experts loads and runs."""
    folder, _, student, moe, _ = moe_teacher(tmp_path, 'mixtral')
    report = hf_selection.select_hf(folder, student, str(tmp_path / 's'), element_selection=mode)
    experts = report['meta']['experts']
    if kept:
        assert experts == kept
    else:
        assert experts == sorted(set(experts)) and len(experts) == 4 and experts != [0, 2, 4, 6]
    t, s = saved_tensors(folder), saved_tensors(str(tmp_path / 's'))
    for layer in range(3):
        norm = t[f'model.layers.{layer}.input_layernorm.weight']
        hidden = [int((norm == v).nonzero()) for v in s[f'model.layers.{layer}.input_layernorm.weight']]
        router = f'model.layers.{layer}.{moe}.gate.weight'
        assert torch.equal(s[router], pick(t[router], experts, hidden))
    hf_selection.select_hf(folder, dict(student, num_experts_per_tok=4), str(tmp_path / 'all'))
    forward_finite(load_strict(str(tmp_path / 'all')))


def test_qwen3_moe_reads_either_name_of_the_expert_count(tmp_path):
    """Hub configs say num_experts, transformers 5 writes num_local_experts: a teacher with either, and a student
    override with either, select the same student, whose config holds the teacher's name only."""
    folder, *_ = moe_teacher(tmp_path, 'qwen3_moe')
    config = json.load(open(os.path.join(folder, 'config.json')))
    name = 'num_local_experts' if 'num_local_experts' in config else 'num_experts'
    other = {'num_local_experts': 'num_experts', 'num_experts': 'num_local_experts'}[name]
    hf_selection.select_hf(folder, {other: 4}, str(tmp_path / 'a'))
    renamed = shutil.copytree(folder, tmp_path / 'renamed')
    config[other] = config.pop(name)
    json.dump(config, open(renamed / 'config.json', 'w'))
    report = hf_selection.select_hf(str(renamed), {name: 4}, str(tmp_path / 'b'))
    assert report['meta']['experts'] == [0, 2, 4, 6] and report['meta']['student_config'][other] == 4
    assert name not in report['meta']['student_config']
    a, b = saved_tensors(str(tmp_path / 'a')), saved_tensors(str(tmp_path / 'b'))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    load_strict(str(tmp_path / 'b'))


# gpt-oss: a layer's experts stacked in one tensor per projection, [experts, in, out], gate and up interleaved
# (MXFP4 packs blocks of 32 inputs: the hidden and intermediate sizes are multiples of 32)
GPT_OSS = dict(LLAMA, intermediate_size=64, num_hidden_layers=4, head_dim=4, num_local_experts=8,
               num_experts_per_tok=2, sliding_window=4, layer_types=['sliding_attention', 'full_attention'] * 2)
GPT_OSS_STUDENT = dict(LLAMA_STUDENT, intermediate_size=32, num_hidden_layers=2, num_local_experts=4)
EVEN32 = list(range(0, 64, 2))  # Algorithm 1 on 64 -> 32


def pairs(indices):
    """gate_up_proj's columns of the kept MLP neurons: gate 2i and up 2i + 1 for each."""
    return [c for i in indices for c in (2 * i, 2 * i + 1)]


@pytest.fixture(scope='module')
def gpt_oss(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(transformers.GptOssConfig(**GPT_OSS)).eval()
    return save_teacher(tmp_path_factory.mktemp('gpt_oss'), model), model


def test_gpt_oss_every_tensor(gpt_oss, tmp_path):
    """Experts 0, 2, 4, 6 (8 -> 4) in each stacked tensor and in the router (rows and bias); gate and up keep the
    same neurons, in their interleaved columns; each kept query head keeps its sink; layer_types follow the
    layers kept. Checked on the files as stored, and the student loads strictly and runs."""
    folder, _ = gpt_oss
    report = hf_selection.select_hf(folder, GPT_OSS_STUDENT, str(tmp_path / 's'), layer_selection='uniform')
    t, s = saved_tensors(folder), saved_tensors(str(tmp_path / 's'))
    h, inter, experts, heads = EVEN16, EVEN32, [0, 2, 4, 6], [0, 1, 4, 5]
    q, kv = rows(heads), rows([0, 2])
    assert report['meta']['experts'] == experts and report['meta']['heads']['query'] == heads
    layers = report['meta']['layer_map']
    assert layers == [0, 2] and report['meta']['student_config']['layer_types'] == ['sliding_attention'] * 2
    expected = {'model.embed_tokens.weight': pick(t['model.embed_tokens.weight'], None, h),
                'lm_head.weight': pick(t['lm_head.weight'], None, h),
                'model.norm.weight': pick(t['model.norm.weight'], h)}
    for j, i in enumerate(layers):
        for name, idx in [('self_attn.q_proj.weight', (q, h)), ('self_attn.q_proj.bias', (q,)),
                          ('self_attn.k_proj.weight', (kv, h)), ('self_attn.k_proj.bias', (kv,)),
                          ('self_attn.v_proj.weight', (kv, h)), ('self_attn.v_proj.bias', (kv,)),
                          ('self_attn.o_proj.weight', (h, q)), ('self_attn.o_proj.bias', (h,)),
                          ('self_attn.sinks', (heads,)), ('input_layernorm.weight', (h,)),
                          ('post_attention_layernorm.weight', (h,)),
                          ('mlp.router.weight', (experts, h)), ('mlp.router.bias', (experts,)),
                          ('mlp.experts.gate_up_proj', (experts, h, pairs(inter))),
                          ('mlp.experts.gate_up_proj_bias', (experts, pairs(inter))),
                          ('mlp.experts.down_proj', (experts, inter, h)), ('mlp.experts.down_proj_bias', (experts, h))]:
            expected[f'model.layers.{j}.{name}'] = pick(t[f'model.layers.{i}.{name}'], *idx)
    assert_tensors_are(s, expected)
    forward_finite(load_strict(str(tmp_path / 's')))


@pytest.mark.parametrize('mode', ['uniform', 'l1'])
def test_rows_far_apart_are_read_apart(gpt_oss, tmp_path, monkeypatch, mode):
    """A stack's unkept experts are skipped (rows further apart than SKIP_GAP_BYTES are read apart; here every
    gap, down to one row of a weight): the student is the same bytes, and what is read of each stack is its kept
    experts exactly."""
    folder, _ = gpt_oss
    hf_selection.select_hf(folder, GPT_OSS_STUDENT, str(tmp_path / 'whole'), element_selection=mode)
    spans, read_rows = [], hf_selection.teacher.read_rows

    def recorded(f, path, key, info, lo, hi):
        spans.append((key, lo, hi))
        return read_rows(f, path, key, info, lo, hi)
    monkeypatch.setattr(hf_selection.teacher, 'read_rows', recorded)
    monkeypatch.setattr(hf_selection.teacher, 'SKIP_GAP_BYTES', 0)
    hf_selection.select_hf(folder, GPT_OSS_STUDENT, str(tmp_path / 'apart'), element_selection=mode)
    whole, apart = saved_tensors(str(tmp_path / 'whole')), saved_tensors(str(tmp_path / 'apart'))
    assert set(whole) == set(apart) and all(torch.equal(whole[k], apart[k]) for k in whole)
    stack = 'model.layers.0.mlp.experts.gate_up_proj'
    runs = [(lo, hi) for key, lo, hi in spans if key == stack]  # under l1 twice: its bias, which ranks by it, is
    assert runs == [(0, 1), (2, 3), (4, 5), (6, 7)] * (2 if mode == 'l1' else 1)  # in another shard here
    if mode == 'l1':  # a bias read just before its weight (x.bias sorts first) ranks by that weight, which is then
        # not read again
        assert [key for key, _, _ in spans].count('model.layers.0.self_attn.q_proj.weight') == 1
    if mode == 'uniform':  # heads 0, 1, 4, 5 of 4 dims: q_proj's rows in two runs
        assert [(lo, hi) for key, lo, hi in spans if key == 'model.layers.0.self_attn.q_proj.weight'] == \
            [(0, 8), (16, 24)]


def test_gpt_oss_same_width_shallower_is_the_truncated_teacher(gpt_oss, tmp_path):
    folder, model = gpt_oss
    hf_selection.select_hf(folder, {'num_hidden_layers': 2}, str(tmp_path / 'same'))
    config = transformers.GptOssConfig(**dict(GPT_OSS, num_hidden_layers=2, layer_types=GPT_OSS['layer_types'][:2]))
    truncated = transformers.GptOssForCausalLM(config)
    truncated.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith(
        ('model.layers.2.', 'model.layers.3.'))})
    with torch.no_grad():
        assert torch.equal(forward_finite(load_strict(str(tmp_path / 'same'))), forward_finite(truncated.eval()))


def test_gpt_oss_l1_ranks_each_expert_and_biases_follow_their_neurons(gpt_oss, tmp_path):
    """Under l1 each kept expert is ranked as a tensor of its own (as Mixtral's experts, stored one by one): gate and
    up each by their own column and row norms, down_proj likewise; a bias keeps its weight's output neurons (the
    columns of these [in, out] weights); a sink is ranked by its magnitude."""
    folder, _ = gpt_oss
    hf_selection.select_hf(folder, GPT_OSS_STUDENT, str(tmp_path / 's'), element_selection='l1')
    t, s = saved_tensors(folder), saved_tensors(str(tmp_path / 's'))
    p = 'model.layers.1.'
    for k, e in enumerate([0, 2, 4, 6]):
        w, b = t[p + 'mlp.experts.gate_up_proj'][e], t[p + 'mlp.experts.gate_up_proj_bias'][e]
        gate, up = w[:, 0::2], w[:, 1::2]
        kept = {name: (top_l1(part, 0, 16), top_l1(part, 1, 32)) for name, part in (('gate', gate), ('up', up))}
        want = torch.stack([pick(gate, *kept['gate']), pick(up, *kept['up'])], 2).flatten(1)
        assert torch.equal(s[p + 'mlp.experts.gate_up_proj'][k], want), k
        bias = torch.stack([b[0::2][kept['gate'][1]], b[1::2][kept['up'][1]]], 1).flatten()
        assert torch.equal(s[p + 'mlp.experts.gate_up_proj_bias'][k], bias), k
        down = t[p + 'mlp.experts.down_proj'][e]
        assert torch.equal(s[p + 'mlp.experts.down_proj'][k], pick(down, top_l1(down, 0, 32), top_l1(down, 1, 16)))
        assert torch.equal(s[p + 'mlp.experts.down_proj_bias'][k],
                           t[p + 'mlp.experts.down_proj_bias'][e][top_l1(down, 1, 16)])
    router = t[p + 'mlp.router.weight']
    assert torch.equal(s[p + 'mlp.router.weight'], pick(router, [0, 2, 4, 6], top_l1(router, 1, 16)))
    assert torch.equal(s[p + 'self_attn.sinks'], pick(t[p + 'self_attn.sinks'], top_l1(t[p + 'self_attn.sinks'], 0, 4)))
    forward_finite(load_strict(str(tmp_path / 's')))


def test_gpt_oss_dims_mode_and_excluded_mlp(gpt_oss, tmp_path):
    """--head_selection dims keeps the sinks of Algorithm 1's heads (8 -> 4: 0, 2, 4, 6), as any width's indices;
    --exclude mlp starts the router and experts afresh: weights N(0, 0.02), biases 0."""
    folder, _ = gpt_oss
    hf_selection.select_hf(folder, GPT_OSS_STUDENT, str(tmp_path / 's'), head_selection='dims', exclude=['mlp'])
    t, s = saved_tensors(folder), saved_tensors(str(tmp_path / 's'))
    assert torch.equal(s['model.layers.1.self_attn.sinks'], pick(t['model.layers.1.self_attn.sinks'], [0, 2, 4, 6]))
    assert selected(s, t, 'model.layers.1.self_attn.q_proj.weight', EVEN16, EVEN16)
    for name in ('router.bias', 'experts.gate_up_proj_bias', 'experts.down_proj_bias'):
        assert not s[f'model.layers.1.mlp.{name}'].any(), name
    weights = s['model.layers.1.mlp.experts.gate_up_proj']
    assert 0.01 < float(weights.std()) < 0.03
    assert not torch.isin(weights, t['model.layers.1.mlp.experts.gate_up_proj']).any()
    forward_finite(load_strict(str(tmp_path / 's')))


def test_gpt_oss_random_inconsistent_draws_a_set_per_expert(gpt_oss, tmp_path):
    """Each stacked expert is a tensor of its own: its hidden rows are a fresh random set (found by value: the
    teacher's values are distinct draws), not one set for the stack."""
    folder, _ = gpt_oss
    hf_selection.select_hf(folder, GPT_OSS_STUDENT, str(tmp_path / 's'), element_selection='random_inconsistent')
    t, s = saved_tensors(folder), saved_tensors(str(tmp_path / 's'))
    key, sets = 'model.layers.0.mlp.experts.down_proj', []
    for k, e in enumerate([0, 2, 4, 6]):  # [inter, hidden]: the columns of the student's first row
        sets.append(tuple(int((t[key][e] == v).nonzero()[0, 1]) for v in s[key][k][0]))
    assert len(set(sets)) == 4, sets


quantized = edit_json('config.json', lambda config: dict(config, quantization_config={'quant_method': 'fp8'}))


@pytest.mark.parametrize('damage,overrides,match', [
    (None, {'num_local_experts': 16}, 'the student has experts 16 where the teacher has 8'),
    (None, {'num_local_experts': 4, 'num_experts_per_tok': 5}, 'num_experts_per_tok is 5; it must be between 1 and'),
    (without(r'model\.layers\.2\.self_attn\.sinks'), {},
     r"no 'model\.layers\.2\.self_attn\.sinks' though its other layers have it"),
    (quantized, {}, r'the teacher is quantized \(fp8\); weight selection reads unquantized weights: give a '
                    'dequantized copy'),
])
def test_gpt_oss_bad_input(gpt_oss, tmp_path, damage, overrides, match):
    folder, _ = gpt_oss
    assert_stops_writing_nothing(broken_copy(folder, tmp_path, damage) if damage else folder, overrides, tmp_path,
                                 match)


@pytest.fixture(scope='module')
def gpt_oss_mxfp4(gpt_oss, tmp_path_factory):
    """The gpt-oss teacher as the hub stores gpt-oss: its experts' projections MXFP4-packed (random blocks, scales
    2^-3 .. 2^2), and its config saying so; with the weights transformers dequantizes them to."""
    from safetensors.torch import save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    folder, _ = gpt_oss
    out = tmp_path_factory.mktemp('gpt_oss_mxfp4')
    tensors, dequantized, generator = saved_tensors(folder), {}, torch.Generator().manual_seed(0)
    for key in [k for k in tensors if k.endswith(('gate_up_proj', 'down_proj'))]:
        experts, d_in, d_out = tensors.pop(key).shape
        blocks = torch.randint(0, 256, (experts, d_out, d_in // 32, 16), generator=generator, dtype=torch.uint8)
        scales = torch.randint(124, 130, (experts, d_out, d_in // 32), generator=generator, dtype=torch.uint8)
        tensors[key + '_blocks'], tensors[key + '_scales'] = blocks, scales
        dequantized[key] = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)
    save_file(tensors, str(out / 'model.safetensors'), metadata={'format': 'pt'})
    config = json.load(open(os.path.join(folder, 'config.json')))
    json.dump(dict(config, quantization_config={'quant_method': 'mxfp4', 'modules_to_not_convert': []}),
              open(out / 'config.json', 'w'))
    return str(out), dequantized


def test_gpt_oss_mxfp4_teacher_is_read_dequantized(gpt_oss_mxfp4, tmp_path, monkeypatch):
    """Each kept expert is dequantized (as transformers dequantizes it) and selected; the student is written in
    bfloat16 without quantization_config, and loads strictly and runs. Only the kept experts' blocks are read."""
    folder, dequantized = gpt_oss_mxfp4
    spans, hints, read_rows, bytes_read, advise = [], [], hf_selection.teacher.read_rows, [0], os.posix_fadvise

    def recorded(f, path, key, info, lo, hi):
        spans.append((key, lo, hi))
        bytes_read[0] += safetensors_io.byte_span(info, lo, hi)[1]
        return read_rows(f, path, key, info, lo, hi)
    monkeypatch.setattr(hf_selection.teacher, 'read_rows', recorded)
    monkeypatch.setattr(os, 'posix_fadvise', lambda fd, offset, n, advice: hints.append((offset, n)) or
                        advise(fd, offset, n, advice))
    report = hf_selection.select_hf(folder, dict(GPT_OSS_STUDENT, hidden_size=32, num_attention_heads=8,
                                                 num_key_value_heads=4), str(tmp_path / 's'))
    s = saved_tensors(str(tmp_path / 's'))
    assert 'quantization_config' not in json.load(open(tmp_path / 's' / 'config.json'))
    experts, pairs32 = [0, 2, 4, 6], pairs(EVEN32)
    for j in range(2):
        key = f'model.layers.{j}.mlp.experts.'
        assert s[key + 'gate_up_proj'].dtype == torch.bfloat16
        assert torch.equal(s[key + 'gate_up_proj'], pick(dequantized[key + 'gate_up_proj'], experts, None, pairs32))
        assert torch.equal(s[key + 'down_proj'], pick(dequantized[key + 'down_proj'], experts, EVEN32))
    forward_finite(load_strict(str(tmp_path / 's')))
    packed = sorted(span for span in spans if span[0].endswith(('_blocks', '_scales')))
    assert packed == sorted((f'model.layers.{j}.mlp.experts.{w}_{part}', e, e + 1) for j in range(2)
                            for w in ('gate_up_proj', 'down_proj') for part in ('blocks', 'scales') for e in experts)
    assert report['meta']['teacher_bytes_read'] == bytes_read[0]
    # the readahead asks for the kept experts' blocks and scales, and for no other expert's
    header = safetensors_io.read_header(os.path.join(folder, 'model.safetensors'))
    packed_spans = {key: info for key, info in header.items() if key.endswith(('_blocks', '_scales'))}
    hinted = {span for span in hints if any(info[2][0] <= span[0] < info[2][1] for info in packed_spans.values())}
    wanted = {safetensors_io.byte_span(packed_spans[key], lo, hi) for key, lo, hi in packed}
    assert hinted == wanted


@pytest.mark.parametrize('change,match', [
    (lambda tensors: tensors.pop('model.layers.2.mlp.experts.down_proj_scales'),
     r"teacher tensor 'model\.layers\.2\.mlp\.experts\.down_proj_blocks' has no "
     r"'model\.layers\.2\.mlp\.experts\.down_proj_scales': an MXFP4 weight is stored as both"),
    (lambda tensors: tensors.update({'model.layers.0.mlp.experts.down_proj_scales': torch.zeros(8, 32, 3,
                                                                                                dtype=torch.uint8)}),
     r"'model\.layers\.0\.mlp\.experts\.down_proj_blocks' U8 \[8, 32, 2, 16\] and .*_scales' U8 \[8, 32, 3\] are "
     r'not MXFP4 experts'),
])
def test_gpt_oss_mxfp4_malformed_teacher_stops(gpt_oss_mxfp4, tmp_path, change, match):
    from safetensors.torch import save_file
    folder, _ = gpt_oss_mxfp4
    broken = shutil.copytree(folder, tmp_path / 'broken')
    tensors = saved_tensors(str(broken))
    change(tensors)
    save_file(tensors, str(broken / 'model.safetensors'), metadata={'format': 'pt'})
    assert_stops_writing_nothing(str(broken), GPT_OSS_STUDENT, tmp_path, match)


@pytest.mark.parametrize('mode', ['l1', 'magnitude'])
def test_gpt_oss_mxfp4_tensorwise_selects_the_dequantized_weights(gpt_oss_mxfp4, tmp_path, monkeypatch, mode):
    """A per-tensor mode sees the dequantized experts: the student equals that of a bfloat16 teacher holding them.
    It reads (and dequantizes) only the kept experts, and the readahead asks for no other expert's bytes."""
    from safetensors.torch import save_file
    folder, dequantized = gpt_oss_mxfp4
    experts_read, read_rows, hints, advise = set(), hf_selection.teacher.read_rows, [], os.posix_fadvise

    def recorded(f, path, key, info, lo, hi):
        if key.endswith('_blocks'):
            experts_read.update(range(lo, hi))
        return read_rows(f, path, key, info, lo, hi)
    monkeypatch.setattr(hf_selection.teacher, 'read_rows', recorded)
    monkeypatch.setattr(os, 'posix_fadvise', lambda fd, offset, n, advice: hints.append((offset, n)) or
                        advise(fd, offset, n, advice))
    plain = shutil.copytree(folder, tmp_path / 'plain')
    tensors = {k: v for k, v in saved_tensors(str(plain)).items() if not k.endswith(('_blocks', '_scales'))}
    save_file({**tensors, **dequantized}, str(plain / 'model.safetensors'), metadata={'format': 'pt'})
    config = json.load(open(plain / 'config.json'))
    json.dump({k: v for k, v in config.items() if k != 'quantization_config'}, open(plain / 'config.json', 'w'))
    for teacher, name in [(folder, 'a'), (str(plain), 'b')]:
        hf_selection.select_hf(teacher, GPT_OSS_STUDENT, str(tmp_path / name), element_selection=mode)
        if name == 'a':  # the hints into the packed experts are kept experts' rows (those of the plans read ahead)
            header = safetensors_io.read_header(os.path.join(folder, 'model.safetensors'))
            packed = [info for key, info in header.items() if key.endswith(('_blocks', '_scales'))]
            hinted = {span for span in hints if any(info[2][0] <= span[0] < info[2][1] for info in packed)}
            assert hinted and hinted <= {safetensors_io.byte_span(info, e, e + 1) for info in packed
                                         for e in (0, 2, 4, 6)}
    a, b = saved_tensors(str(tmp_path / 'a')), saved_tensors(str(tmp_path / 'b'))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert experts_read == {0, 2, 4, 6}


@pytest.mark.parametrize('mode', ['random_inconsistent', 'l1_consistent', 'magnitude'])
def test_gpt_oss_other_tensorwise_modes_load_and_run(gpt_oss, tmp_path, mode):
    """Under magnitude each kept expert's weights are squeezed on their own (a row of the stack)."""
    folder, _ = gpt_oss
    report = hf_selection.select_hf(folder, GPT_OSS_STUDENT, str(tmp_path / 's'), element_selection=mode)
    assert report['meta']['experts'] == [0, 2, 4, 6]
    forward_finite(load_strict(str(tmp_path / 's')))
    if mode == 'magnitude':
        t, s = saved_tensors(folder), saved_tensors(str(tmp_path / 's'))
        key = 'model.layers.0.mlp.experts.down_proj'
        for k, e in enumerate([0, 2, 4, 6]):
            flat = t[key][e].flatten()
            assert torch.equal(s[key][k].flatten(), flat[first_largest(flat.abs(), 32 * 16)])


# ---------------------------------------------------------------------------------------------- GPT-NeoX (Pythia)

NEOX = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=8,
            max_position_embeddings=64)
NEOX_STUDENT = dict(hidden_size=16, intermediate_size=32, num_attention_heads=4, num_hidden_layers=2)


@pytest.fixture(scope='module')
def neox(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**NEOX)).eval()
    return save_teacher(tmp_path_factory.mktemp('neox'), model), model


def neox_qkv_rows(head_dims, head_dim=4):
    """query_key_value's rows for a student whose head j holds the teacher's (head, dim) pairs head_dims[j]: a
    head's q dims, then its k dims, then its v dims (rows head * 3 * head_dim + part * head_dim + dim)."""
    return [h * 3 * head_dim + part * head_dim + d for pairs in head_dims for part in range(3) for h, d in pairs]


@pytest.mark.parametrize('head_selection', ['auto', 'dims'])
def test_gpt_neox_every_tensor(neox, tmp_path, head_selection):
    """8 heads -> 4: whole heads 0, 2, 4, 6 by default (rotary), each keeping its q, k and v rows; under dims, the
    query width's Algorithm 1 set (every other dim of 32), q, k and v alike, in each student head's rows."""
    folder, _ = neox
    report = hf_selection.select_hf(folder, NEOX_STUDENT, str(tmp_path / 's'), layer_selection='uniform',
                                    head_selection=head_selection)
    t, s = saved_tensors(folder), saved_tensors(str(tmp_path / 's'))
    h = EVEN16
    if head_selection == 'auto':
        assert report['meta']['heads']['query'] == [0, 2, 4, 6]
        head_dims = [[(head, d) for d in range(4)] for head in (0, 2, 4, 6)]
    else:
        head_dims = [[divmod(i, 4) for i in EVEN16[4 * j:4 * j + 4]] for j in range(4)]
    q = [head * 4 + d for pairs in head_dims for head, d in pairs]  # attention.dense's columns
    expected = {'gpt_neox.embed_in.weight': pick(t['gpt_neox.embed_in.weight'], None, h),
                'embed_out.weight': pick(t['embed_out.weight'], None, h)}
    for part in ('weight', 'bias'):
        expected[f'gpt_neox.final_layer_norm.{part}'] = pick(t[f'gpt_neox.final_layer_norm.{part}'], h)
    for j, i in enumerate([0, 2]):
        for name, idx in [('attention.query_key_value.weight', (neox_qkv_rows(head_dims), h)),
                          ('attention.query_key_value.bias', (neox_qkv_rows(head_dims),)),
                          ('attention.dense.weight', (h, q)), ('attention.dense.bias', (h,)),
                          ('mlp.dense_h_to_4h.weight', (EVEN32, h)), ('mlp.dense_h_to_4h.bias', (EVEN32,)),
                          ('mlp.dense_4h_to_h.weight', (h, EVEN32)), ('mlp.dense_4h_to_h.bias', (h,)),
                          *[(f'{norm}.{part}', (h,)) for norm in ('input_layernorm', 'post_attention_layernorm')
                            for part in ('weight', 'bias')]]:
            expected[f'gpt_neox.layers.{j}.{name}'] = pick(t[f'gpt_neox.layers.{i}.{name}'], *idx)
    assert_tensors_are(s, expected)
    forward_finite(load_strict(str(tmp_path / 's')))


@pytest.mark.parametrize('mode', ['uniform', 'l1'])
def test_gpt_neox_fewer_wider_heads_regroup_q_k_and_v(neox, tmp_path, mode):
    """Same hidden size, 8 heads of 4 dims -> 4 heads of 8 (dims mode): every row is kept, but a student head's q,
    k and v rows are two teacher heads' each, so query_key_value's rows move; uniform keeps the dims in order,
    l1 ranks each part's 32 rows (all kept) and keeps them in order too."""
    folder, _ = neox
    report = hf_selection.select_hf(folder, {'num_attention_heads': 4}, str(tmp_path / 's'), head_selection='dims',
                                    element_selection=mode)
    t, s = saved_tensors(folder), saved_tensors(str(tmp_path / 's'))
    key = 'gpt_neox.layers.0.attention.query_key_value.weight'
    rows = [h * 12 + part * 4 + d for j in range(4) for part in range(3) for h in (2 * j, 2 * j + 1) for d in range(4)]
    assert torch.equal(s[key], t[key][rows])
    assert report['tensors'][key]['action'] == 'selected'
    assert report['tensors']['gpt_neox.layers.0.attention.dense.weight']['action'] == 'copied'
    forward_finite(load_strict(str(tmp_path / 's')))


def test_gpt_neox_l1_consistent_counts_q_k_and_v_toward_the_hidden_ranking(neox, tmp_path):
    """The hidden width is ranked by the summed L1 norms of every teacher slice along a width of 32: the hidden
    axis, and q, k and v of each query_key_value (a part's 32 rows: each head's 4 rows of that part)."""
    folder, _ = neox
    scores = torch.zeros(32, dtype=torch.float64)
    for key, value in stored_tensors(folder).items():
        value = value.double().abs()
        if key.endswith('query_key_value.weight'):
            for part in range(3):
                scores += value.view(8, 3, 4, 32)[:, part].reshape(32, 32).sum(1) + value.sum(0) / 3
        elif key.endswith('query_key_value.bias'):
            scores += value.view(8, 3, 4).sum(1).reshape(32)
        else:
            for dim, size in enumerate(value.shape):
                if size == 32:
                    scores += value.sum(dim=[d for d in range(value.ndim) if d != dim]) if value.ndim > 1 else value
    h = first_largest(scores, 16).tolist()
    hf_selection.select_hf(folder, NEOX_STUDENT, str(tmp_path / 's'), element_selection='l1_consistent')
    t, s = saved_tensors(folder), saved_tensors(str(tmp_path / 's'))
    assert torch.equal(s['gpt_neox.final_layer_norm.weight'], t['gpt_neox.final_layer_norm.weight'][h])
    assert h != EVEN16


def test_gpt_neox_exclude_embed_starts_both_embeddings_afresh(neox, tmp_path):
    folder, _ = neox
    report = hf_selection.select_hf(folder, NEOX_STUDENT, str(tmp_path / 's'), exclude=['embed'])
    assert {k for k, v in report['tensors'].items() if v['action'] == 'excluded'} == \
        {'gpt_neox.embed_in.weight', 'embed_out.weight'}
    forward_finite(load_strict(str(tmp_path / 's')))


def test_gpt_neox_same_width_shallower_is_the_truncated_teacher(neox, tmp_path):
    folder, model = neox
    hf_selection.select_hf(folder, {'num_hidden_layers': 2}, str(tmp_path / 'same'))
    config = transformers.GPTNeoXConfig(**dict(NEOX, num_hidden_layers=2))
    truncated = transformers.GPTNeoXForCausalLM(config).eval()
    truncated.load_state_dict({k: v for k, v in model.state_dict().items()
                               if not k.startswith(('gpt_neox.layers.2.', 'gpt_neox.layers.3.'))})
    with torch.no_grad():
        assert torch.equal(forward_finite(load_strict(str(tmp_path / 'same'))), forward_finite(truncated))


def test_gpt_neox_l1_ranks_q_k_and_v_each_on_its_own(neox, tmp_path):
    """Under l1, q, k and v of query_key_value are three tensors (each head's rows of one part), each ranked by its
    own rows and columns and put back in the student's per-head layout; the bias keeps its part's rows."""
    folder, _ = neox
    hf_selection.select_hf(folder, NEOX_STUDENT, str(tmp_path / 's'), element_selection='l1')
    t, s = saved_tensors(folder), saved_tensors(str(tmp_path / 's'))
    key = 'gpt_neox.layers.1.attention.query_key_value.'
    w, b = t[key + 'weight'].view(8, 3, 4, 32), t[key + 'bias'].view(8, 3, 4)
    weights, biases = [], []
    for part in range(3):
        part_w, part_b = w[:, part].reshape(32, 32), b[:, part].reshape(32)
        rows = top_l1(part_w, 0, 16)
        weights.append(pick(part_w, rows, top_l1(part_w, 1, 16)).view(4, 4, 16))
        biases.append(part_b[rows].view(4, 4))
    assert torch.equal(s[key + 'weight'], torch.stack(weights, 1).reshape(48, 16))
    assert torch.equal(s[key + 'bias'], torch.stack(biases, 1).reshape(48))
    forward_finite(load_strict(str(tmp_path / 's')))


def test_gpt_neox_base_model_with_old_buffers_and_head_dim_refused(tmp_path):
    """A GPTNeoXModel checkpoint (keys without `gpt_neox.`) holding the buffers older Pythia files carry (masks and
    rotary frequencies) selects a student that GPTNeoXModel loads strictly; head_dim, which GPT-NeoX ignores,
    cannot be overridden."""
    from safetensors.torch import save_file
    torch.manual_seed(0)
    folder = save_teacher(tmp_path / 't', transformers.GPTNeoXModel(transformers.GPTNeoXConfig(**NEOX)))
    tensors = saved_tensors(folder)
    for layer in range(4):
        tensors[f'layers.{layer}.attention.bias'] = torch.ones(1, 1, 64, 64, dtype=torch.bool)
        tensors[f'layers.{layer}.attention.masked_bias'] = torch.tensor(-1e9)
        tensors[f'layers.{layer}.attention.rotary_emb.inv_freq'] = torch.ones(1)
    for name in os.listdir(folder):
        if name.endswith(('.safetensors', '.index.json')):
            os.remove(os.path.join(folder, name))
    save_file(tensors, os.path.join(folder, 'model.safetensors'), metadata={'format': 'pt'})
    hf_selection.select_hf(folder, NEOX_STUDENT, str(tmp_path / 's'))
    model = load_strict(str(tmp_path / 's'), transformers.GPTNeoXModel)
    assert torch.isfinite(model(torch.tensor([[1, 5, 9]])).last_hidden_state).all()
    assert not any('masked_bias' in k or k.endswith('attention.bias') for k in saved_tensors(str(tmp_path / 's')))
    with pytest.raises(UserError, match=r"head_dim stays the teacher's in gpt_neox models \(GPT-NeoX's attention "
                                        'splits hidden_size into num_attention_heads heads whatever head_dim says'):
        hf_selection.select_hf(folder, dict(NEOX_STUDENT, head_dim=8), str(tmp_path / 'x'))
    with pytest.raises(UserError, match=r'hidden/heads = 4, or pass --head_selection dims$'):  # no head_dim advice
        hf_selection.select_hf(folder, {'num_attention_heads': 4}, str(tmp_path / 'x'))


# ---------------------------------------------------------------------------------------------- vision transformers

VIT = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=48, image_size=32,
           patch_size=8)
VIT_STUDENT = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2)


def vision_teacher(tmp_path, config_cls, model_cls, model_kwargs=(), **config):
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**VIT, **config),
                                             **dict(model_kwargs)).eval()
    return save_teacher(tmp_path / 't', model), model


def load_vision(folder, teacher, **model_kwargs):
    """The student, strictly, as the teacher's class."""
    return load_strict(folder, type(teacher), **model_kwargs)


def truncate(model, layers):
    """The model with only its first `layers` layers (transformers 5 names the stack `layers` or `layer`)."""
    name = next(n for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList))
    parent = model.get_submodule(name.rpartition('.')[0])
    setattr(parent, name.rpartition('.')[2], getattr(parent, name.rpartition('.')[2])[:layers])
    model.config.num_hidden_layers = layers
    return model


def vision_output(model):
    with torch.no_grad():
        out = model(pixel_values=torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    out = out.logits if hasattr(out, 'logits') else out.last_hidden_state
    assert torch.isfinite(out).all()
    return out


@pytest.mark.parametrize('classifier', [True, False])
def test_vit_every_tensor(tmp_path, classifier):
    """ViT: the class token, every position and the patch embedding's output channels keep the hidden width's
    indices; a classifier keeps its classes; a pooler whose output restated the hidden size follows the student's."""
    cls, kwargs = ('ViTForImageClassification', {}) if classifier else ('ViTModel', {'use_mask_token': True})
    folder, model = vision_teacher(tmp_path, 'ViTConfig', cls, kwargs, num_labels=5)
    report = hf_selection.select_hf(folder, dict(VIT_STUDENT, intermediate_size=20), str(tmp_path / 's'),
                                    layer_selection='uniform')
    student = load_vision(str(tmp_path / 's'), model, **kwargs)
    t, s, p = saved_tensors(folder), saved_tensors(str(tmp_path / 's')), 'vit.' if classifier else ''  # as stored
    assert report['meta']['family'] == 'vit' and report['meta']['layer_map'] == [0, 2]
    expected = [('embeddings.cls_token', (None, None, EVEN16)),
                ('embeddings.position_embeddings', (None, None, EVEN16)),
                ('embeddings.patch_embeddings.projection.weight', (EVEN16,)), ('layernorm.bias', (EVEN16,))]
    expected += [('classifier.weight', (None, EVEN16))] if classifier else \
        [('embeddings.mask_token', (None, None, EVEN16)), ('pooler.dense.weight', (EVEN16, EVEN16))]
    for name, idx in expected:
        key = name if name.startswith('classifier') else p + name
        assert torch.equal(s[key], pick(t[key], *idx)), key
    for name, idx in [('attention.attention.query.weight', (EVEN16, EVEN16)),
                      ('attention.attention.value.bias', (EVEN16,)),
                      ('attention.output.dense.weight', (EVEN16, EVEN16)),
                      ('intermediate.dense.weight', (INTER_48_20, EVEN16)),
                      ('output.dense.weight', (EVEN16, INTER_48_20)), ('layernorm_after.weight', (EVEN16,))]:
        assert torch.equal(s[f'{p}encoder.layer.1.{name}'], pick(t[f'{p}encoder.layer.2.{name}'], *idx)), name
    if not classifier:
        assert json.load(open(tmp_path / 's' / 'config.json'))['pooler_output_size'] == 16
    vision_output(student)
    hf_selection.select_hf(folder, {'num_hidden_layers': 2}, str(tmp_path / 'same'))  # the truncated teacher
    same = vision_output(load_vision(str(tmp_path / 'same'), model, **kwargs))
    assert torch.equal(same, vision_output(truncate(model, 2)))


@pytest.mark.parametrize('variant', ['classifier', 'swiglu', 'registers'])
def test_dinov2_every_tensor(tmp_path, variant):
    """DINOv2: its MLP width is hidden x mlp_ratio (128 -> 64, stride 2; SwiGLU's fused gate and up each keep the
    set), layer scales and the mask token keep the hidden width's indices, and the image classifier, which reads
    the class token and the mean patch token side by side, keeps the hidden set in each half."""
    config_cls, model_cls, config = {
        'classifier': ('Dinov2Config', 'Dinov2ForImageClassification', dict(num_labels=5)),
        'swiglu': ('Dinov2Config', 'Dinov2Model', dict(use_swiglu_ffn=True)),
        'registers': ('Dinov2WithRegistersConfig', 'Dinov2WithRegistersModel', dict(num_register_tokens=2))}[variant]
    folder, model = vision_teacher(tmp_path, config_cls, model_cls, **config)
    hf_selection.select_hf(folder, VIT_STUDENT, str(tmp_path / 's'), layer_selection='uniform')
    student = load_vision(str(tmp_path / 's'), model)
    t, s, p = saved_tensors(folder), saved_tensors(str(tmp_path / 's')), 'dinov2.' if variant == 'classifier' else ''
    for name, idx in [('embeddings.mask_token', (None, EVEN16)),
                      ('embeddings.position_embeddings', (None, None, EVEN16))]:
        assert torch.equal(s[p + name], pick(t[p + name], *idx)), name
    layer = [('layer_scale1.lambda1', (EVEN16,)), ('norm2.weight', (EVEN16,)),
             ('attention.attention.key.weight', (EVEN16, EVEN16))]
    if variant == 'swiglu':  # 32 x 4 = 128 -> 88 in SwiGLU, twice in weights_in; 16 x 4 = 64 -> 48
        mlp = [round(i * 87 / 47) for i in range(48)]
        layer += [('mlp.weights_in.weight', (mlp + [88 + i for i in mlp], EVEN16)),
                  ('mlp.weights_out.weight', (EVEN16, mlp))]
    else:
        layer += [('mlp.fc1.weight', (list(range(0, 128, 2)), EVEN16)), ('mlp.fc2.bias', (EVEN16,))]
    for name, idx in layer:
        assert torch.equal(s[f'{p}encoder.layer.1.{name}'], pick(t[f'{p}encoder.layer.2.{name}'], *idx)), name
    if variant == 'classifier':
        both_halves = EVEN16 + [32 + i for i in EVEN16]
        assert torch.equal(s['classifier.weight'], pick(t['classifier.weight'], None, both_halves))
    if variant == 'registers':
        assert torch.equal(s['embeddings.register_tokens'], pick(t['embeddings.register_tokens'], None, None, EVEN16))
    assert json.load(open(tmp_path / 's' / 'config.json'))['stage_names'] == ['stem', 'stage1', 'stage2']
    vision_output(student)
    for mode in hf_selection.TENSORWISE:
        hf_selection.select_hf(folder, VIT_STUDENT, str(tmp_path / mode), element_selection=mode)
        vision_output(load_vision(str(tmp_path / mode), model))
    magnitude = saved_tensors(str(tmp_path / 'magnitude'))
    positions = t[p + 'embeddings.position_embeddings'][0]  # under magnitude each position keeps its own values
    largest = first_largest(positions.abs(), 16)
    assert torch.equal(magnitude[p + 'embeddings.position_embeddings'][0], positions.gather(1, largest))


@pytest.mark.parametrize('overrides,match', [
    ({'image_size': 64}, "image_size stays the teacher's in dinov2 models .the student keeps the teacher's learned "
                         'positions.'),
    ({'intermediate_size': 24}, 'DINOv2 does not read it: its MLP width is hidden_size x mlp_ratio; change mlp_ratio'),
    ({'mlp_ratio': 'four'}, 'mlp_ratio must be a positive number'),
    ({'mlp_ratio': 8}, 'intermediate size 256 where the teacher has 128'),
])
def test_dinov2_bad_student(tmp_path, overrides, match):
    folder, _ = vision_teacher(tmp_path, 'Dinov2Config', 'Dinov2Model')
    with pytest.raises(UserError, match=match):
        hf_selection.select_hf(folder, overrides, str(tmp_path / 's'))
    assert not os.path.exists(tmp_path / 's')


def test_dinov2_backbone_outputs_follow_layer_selection(tmp_path):
    """A backbone's stages are one per layer: the student outputs the stages of the teacher's output layers it
    keeps (teacher stages 1 and 3 are its layers 0 and 2, the student's stages 1 and 2 under uniform)."""
    folder, model = vision_teacher(tmp_path, 'Dinov2Config', 'Dinov2Backbone', out_indices=[1, 3])
    hf_selection.select_hf(folder, VIT_STUDENT, str(tmp_path / 's'), layer_selection='uniform')
    config = json.load(open(tmp_path / 's' / 'config.json'))
    assert config['out_indices'] == [1, 2] and config['out_features'] == ['stage1', 'stage2']
    student = load_vision(str(tmp_path / 's'), model)
    with torch.no_grad():
        maps = student(pixel_values=torch.randn(1, 3, 32, 32)).feature_maps
    assert len(maps) == 2 and all(m.shape == (1, 16, 4, 4) for m in maps)


# ---------------------------------------------------------------------------------------------- GPT-2

def test_null_sizes_restate_the_teachers_defaults(gpt2, tmp_path):
    """A null size is accepted where the teacher's config.json has it null (GPT-2's n_inner: 4 x n_embd), and
    dropped where the teacher leaves it out, so the student has the teacher's default; both load."""
    folder, _ = gpt2
    teacher = json.load(open(os.path.join(folder, 'config.json')))
    assert teacher['n_inner'] is None
    shutil.copytree(folder, tmp_path / 'left_out')  # the same teacher, its config.json without n_inner
    del teacher['n_inner']
    (tmp_path / 'left_out' / 'config.json').write_text(json.dumps(teacher))
    for name, teacher_folder in (('s', folder), ('s2', str(tmp_path / 'left_out'))):
        hf_selection.select_hf(teacher_folder, dict(n_embd=16, n_head=2, n_inner=None), str(tmp_path / name))
        config = json.load(open(tmp_path / name / 'config.json'))
        assert config.get('n_inner', 'left out') == (None if name == 's' else 'left out')
        assert load_strict(str(tmp_path / name)).transformer.h[0].mlp.c_fc.weight.shape == (16, 64)


def test_gpt2_every_tensor(gpt2, tmp_path):
    folder, t = gpt2
    student = dict(n_embd=16, n_head=2, n_layer=2, n_positions=32, n_inner=48)
    weight_selection.main(['--teacher', folder, '--student_config', json.dumps(student),  # the CLI, in process
                           '--layer_selection', 'last', '--output', str(tmp_path / 's')])
    s = load_strict(str(tmp_path / 's')).state_dict()
    h, inter = EVEN16, INTER_128_48
    qkv = h + [32 + i for i in h] + [64 + i for i in h]  # Conv1D [in, out]: q, k, v each take the width's indices
    expected = {'transformer.wte.weight': pick(t['transformer.wte.weight'], None, h),
                'transformer.wpe.weight': pick(t['transformer.wpe.weight'], list(range(32)), h),
                'transformer.ln_f.weight': pick(t['transformer.ln_f.weight'], h),
                'transformer.ln_f.bias': pick(t['transformer.ln_f.bias'], h)}
    for j, i in enumerate([2, 3]):
        src, dst = f'transformer.h.{i}.', f'transformer.h.{j}.'
        for name, idx in [('ln_1.weight', (h,)), ('ln_1.bias', (h,)), ('ln_2.weight', (h,)), ('ln_2.bias', (h,)),
                          ('attn.c_attn.weight', (h, qkv)), ('attn.c_attn.bias', (qkv,)),
                          ('attn.c_proj.weight', (h, h)), ('attn.c_proj.bias', (h,)),
                          ('mlp.c_fc.weight', (h, inter)), ('mlp.c_fc.bias', (inter,)),
                          ('mlp.c_proj.weight', (inter, h)), ('mlp.c_proj.bias', (h,))]:
            expected[dst + name] = pick(t[src + name], *idx)
    expected['lm_head.weight'] = expected['transformer.wte.weight']  # tied
    assert_tensors_are(s, expected)
    forward_finite(load_strict(str(tmp_path / 's')))


def test_untied_student_of_a_tied_base_model_gets_no_output_layer(tmp_path):
    """A GPT2Model checkpoint has no output layer to untie: the untied student is a GPT2Model too, with none.
    From GPT2LMHeadModel (tied), the untied student's lm_head starts as its selected embedding."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_head=4, n_layer=2, n_positions=64, vocab_size=64)
    student = dict(n_embd=16, n_head=2, tie_word_embeddings=False)
    for cls, name in [(transformers.GPT2Model, 'base'), (transformers.GPT2LMHeadModel, 'lm')]:
        folder = save_teacher(tmp_path / name, cls(config))
        report = hf_selection.select_hf(folder, student, str(tmp_path / f'{name}_s'))
        model = load_strict(str(tmp_path / f'{name}_s'), cls)
        assert ('lm_head.weight' in report['tensors']) == (name == 'lm')
    s = model.state_dict()
    assert torch.equal(s['lm_head.weight'], s['transformer.wte.weight'])


def test_gpt2_same_width_shallower_is_the_truncated_teacher(gpt2, tmp_path):
    folder, _ = gpt2
    hf_selection.select_hf(folder, {'n_layer': 2}, str(tmp_path / 's'), layer_selection='first')
    teacher = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    teacher.transformer.h = teacher.transformer.h[:2]
    teacher.config.n_layer = 2
    with torch.no_grad():
        assert torch.equal(forward_finite(load_strict(str(tmp_path / 's'))), forward_finite(teacher))


# ---------------------------------------------------------------------------------------------- mistakes

def broken_copy(folder, tmp_path, damage):
    copy = tmp_path / 'teacher'
    shutil.copytree(folder, copy)
    damage(copy)
    return str(copy)


def shard_of(folder, key):
    with open(os.path.join(folder, 'model.safetensors.index.json')) as f:
        return json.load(f)['weight_map'][key]


SHARD_L1 = 'model.layers.1.mlp.up_proj.weight'  # its shard is removed or cut in the tests below


def remove_shard(copy):
    os.remove(copy / shard_of(copy, SHARD_L1))


def truncate_shard(copy):
    path = copy / shard_of(copy, SHARD_L1)
    with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) - 100)


drop_heads_field = edit_json('config.json', lambda config: {k: v for k, v in config.items()
                                                             if k != 'num_attention_heads'})
set_model_type = edit_json('config.json', lambda config: dict(config, model_type='t5'))


@pytest.mark.parametrize('damage,overrides,match', [
    (lambda c: os.remove(c / 'config.json'), {}, 'has no config.json'),
    (edit_json('model.safetensors.index.json', lambda index: dict(index, weight_map=list(index['weight_map']))), {},
     'its weight_map is not a mapping of tensor names to shard file names'),
    (edit_json('model.safetensors.index.json', lambda index: dict(index, weight_map={
        k: '../' + v for k, v in index['weight_map'].items()})), {}, 'its weight_map is not a mapping'),
    (edit_json('config.json', lambda config: dict(config, architectures='LlamaForCausalLM')), {},
     r'architectures is "LlamaForCausalLM"; transformers writes a list of model classes there'),
    (remove_shard, {}, r'shard model-000\d\d-of-000\d\d\.safetensors named in .* is missing'),
    (truncate_shard, {}, r'model-000\d\d-of-000\d\d\.safetensors: truncated'),
    (set_model_type, {}, "unknown architecture model_type 't5'.*supports llama, mistral, qwen2, qwen3, gemma, gemma2, "
                         'gemma3_text, phi3, olmo2, mixtral, olmoe, qwen2_moe, qwen3_moe, gpt_oss, gpt_neox, gpt2, '
                         'bert'),
    (drop_heads_field, {}, 'teacher: config has no num_attention_heads'),
    (without(r'lm_head\.weight'), {},
     r"the teacher has no 'lm_head\.weight', its output layer, though its config\.json unties it from the input "
     r'embedding \(LlamaForCausalLM\); the checkpoint is'),
    (None, {'hidden_size': 64}, 'hidden size 64 where the teacher has 32.*no wider'),
    (None, {'num_attention_heads': 8, 'num_key_value_heads': 3}, '8 attention heads do not divide into 3'),
    (None, {'hidden_size': 16, 'num_attention_heads': 8}, 'keeps whole heads of 4 dims.*--head_selection dims'),
    (None, {'num_hidden_layers': 7}, 'no deeper than its teacher'),
    (None, {'hiden_size': 16}, "'hiden_size' is not a field"),
    (None, {'hidden_size': '16'}, "hidden_size must be a positive whole number, got '16'"),
    (None, {'tie_word_embeddings': 'false'}, "tie_word_embeddings must be true or false, got 'false'"),
    (None, {'vocab_size': 32}, 'vocab_size 32, the teacher 64'),
    # 0 and null are not sizes (0 used to read as unset: a traceback, numbers the user never gave, or a student
    # whose config.json transformers cannot load)
    (None, {'hidden_size': 0}, 'hidden_size must be a positive whole number, got 0'),
    (None, {'num_hidden_layers': None}, 'num_hidden_layers must be a positive whole number, got None'),
    (None, {'head_dim': 0}, 'head_dim must be a positive whole number, got 0'),
    (None, {'intermediate_size': 0}, 'intermediate_size must be a positive whole number, got 0'),
    (None, {'num_key_value_heads': 0}, 'num_key_value_heads must be a positive whole number, got 0'),
    # a null the teacher's config.json does not have (transformers refuses LLaMA's intermediate_size null)
    (None, dict(LLAMA_STUDENT, intermediate_size=None), 'intermediate_size must be a positive whole number, got '
                                                        "None .null only where the teacher's config.json has it null"),
    (None, {'num_key_value_heads': None}, 'num_key_value_heads must be a positive whole number, got None'),
    # switches that add tensors the teacher has no weights for (transformers would fill them at random)
    (None, {'attention_bias': True}, "attention_bias stays the teacher's .False.: another value adds or removes"),
    (None, {'mlp_bias': True}, "mlp_bias stays the teacher's"),
    (None, {'num_labels': 3}, "num_labels stays the teacher's .2.: the student keeps the teacher's classifier"),
    (None, {'id2label': {'0': 'cat'}}, "id2label stays the teacher's"),
    (None, {'model_type': 'gpt2', 'n_embd': 16}, "model_type 'gpt2' differs from the teacher's 'llama'"),
    (without(r'model\.layers\.4\.self_attn\.q_proj\.weight'), {},  # a layer that layer selection drops, too
     r"no 'model\.layers\.4\.self_attn\.q_proj\.weight' though its other layers have it; the checkpoint does not"),
])
def test_bad_input_one_clear_error_nothing_written(llama, tmp_path, damage, overrides, match):
    folder, _ = llama
    assert_stops_writing_nothing(broken_copy(folder, tmp_path, damage) if damage else folder, overrides, tmp_path,
                                 match)


def test_switches_left_as_the_teacher_has_them_are_accepted(llama, tmp_path):
    """A student config.json that restates the teacher's switches, or transformers' default labels that the
    teacher leaves out, is not refused; num_labels, which config.json does not store, is not written."""
    restated = dict(LLAMA_STUDENT, attention_bias=False, num_labels=2,
                    id2label={'0': 'LABEL_0', '1': 'LABEL_1'})
    hf_selection.select_hf(llama[0], restated, str(tmp_path / 's'))
    config = json.load(open(tmp_path / 's' / 'config.json'))
    assert 'num_labels' not in config and config['attention_bias'] is False
    forward_finite(load_strict(str(tmp_path / 's')))


def test_a_stale_index_beside_model_safetensors_is_not_read(llama, tmp_path):
    """from_pretrained reads model.safetensors where a folder has it, whatever index lies beside it; so does the
    selection, or the two would read different teachers."""
    folder, model = tmp_path / 't', transformers.LlamaForCausalLM.from_pretrained(llama[0])
    model.save_pretrained(folder, max_shard_size='1GB')  # one file
    shutil.copy(os.path.join(llama[0], 'model.safetensors.index.json'), folder)
    index = json.load(open(folder / 'model.safetensors.index.json'))
    for shard in set(index['weight_map'].values()):
        (folder / shard).write_bytes(b'stale')  # were they read, the selection would stop
    hf_selection.select_hf(str(folder), {}, str(tmp_path / 's'))
    student = load_strict(str(tmp_path / 's'))
    assert all(torch.equal(v, llama[1][k]) for k, v in student.state_dict().items())


@pytest.mark.parametrize('teacher, overrides, match', [
    ('bert', {'type_vocab_size': 1}, "type_vocab_size stays the teacher's .2."),
    ('gpt2', {'add_cross_attention': True}, "add_cross_attention stays the teacher's .False."),
    ('vit', {'qkv_bias': False}, "qkv_bias stays the teacher's .True."),  # would drop the selected q/k/v biases
])
def test_switches_that_add_or_remove_tensors_stop(request, tmp_path, teacher, overrides, match):
    folder = vision_teacher(tmp_path, 'ViTConfig', 'ViTModel')[0] if teacher == 'vit' \
        else request.getfixturevalue(teacher)[0]
    assert_stops_writing_nothing(folder, overrides, tmp_path, match)


def test_selection_needs_neither_safetensors_nor_transformers(llama, tmp_path):
    """The engine parses safetensors itself and reads configs as JSON: with both packages unimportable it still
    writes the student (loaded here, with them, to check it)."""
    code = ('import sys; sys.modules["safetensors"] = sys.modules["transformers"] = None; '
            f'sys.path.insert(0, {ROOT!r}); import hf_selection; '
            f'hf_selection.select_hf({llama[0]!r}, {LLAMA_STUDENT!r}, {str(tmp_path / "s")!r})')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    forward_finite(load_strict(str(tmp_path / 's')))


@pytest.mark.parametrize('kwargs,match', [
    ({'element_selection': 'l2'}, '--element_selection l2: choose one of uniform, consecutive'),
    ({'element_selection': 'l1', 'head_selection': 'heads'}, 'l1 chooses inside each tensor; pass --head_selection dims'),
    ({'exclude': ['patch_embed']}, "unknown component to exclude 'patch_embed'; choose from embed, attn, mlp, norm"),
    ({'max_shard_size': 'lots'}, 'write a size such as 5GB'),
    ({'layer_selection': '0,9,1'}, r"for 'layers' must list 3 teacher blocks in 0\.\.5, got 0,9,1"),
    ({'layer_selection': '0,1;2'}, 'a Hugging Face model has one stack of layers'),
    ({'layer_selection': 'middle'}, "unknown layer selection 'middle'"),
])
def test_bad_settings(llama, tmp_path, kwargs, match):
    with pytest.raises(UserError, match=match):
        hf_selection.select_hf(llama[0], LLAMA_STUDENT, str(tmp_path / 's'), **kwargs)
    assert os.listdir(tmp_path) == []


def test_hub_id_offline_names_what_to_pass(tmp_path, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    with pytest.raises(UserError, match='offline.*pass a local folder'):
        hf_selection.select_hf('someone/tiny-llama', {}, str(tmp_path / 's'))


@pytest.mark.parametrize('name', ['./no_such_folder', '../no_such_folder', 'a/b/c', '-x', 'org/x..y'])
def test_a_missing_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch, name):
    """Names that huggingface_hub would refuse as repo ids are paths: a missing one is named as such, not
    reported as a failed download."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match='not a folder holding config.json'):
        hf_selection.select_hf(name, {}, str(tmp_path / 's'))


def test_hub_id_is_fetched_when_online_and_a_failure_is_one_line(llama, tmp_path, monkeypatch):
    import socket
    huggingface_hub = pytest.importorskip('huggingface_hub')
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
    monkeypatch.setattr(socket, 'getaddrinfo', lambda host, port: [])  # the hub "resolves"
    asked = []

    def fetched(repo_id, allow_patterns):
        asked.append((repo_id, allow_patterns))
        return llama[0]
    monkeypatch.setattr(huggingface_hub, 'snapshot_download', fetched)
    hf_selection.select_hf('someone/tiny-llama', LLAMA_STUDENT, str(tmp_path / 's'))
    assert asked[0][0] == 'someone/tiny-llama'
    from huggingface_hub.utils import filter_repo_objects  # the hub's own matching: weights only, no pickles, and
    files = ['config.json', 'model.safetensors.index.json', 'model-00001-of-00002.safetensors', 'model.safetensors',
             'pytorch_model.bin', 'original/model.safetensors', 'README.md']  # not gpt-oss's original/ copy
    assert list(filter_repo_objects(files, allow_patterns=asked[0][1])) == files[:4]
    assert os.path.isfile(tmp_path / 's' / 'config.json')

    def gated(*args, **kwargs):
        raise OSError('401 Client Error: gated repo\nAccess to model is restricted.')
    monkeypatch.setattr(huggingface_hub, 'snapshot_download', gated)
    with pytest.raises(UserError, match=r"^cannot fetch 'someone/gated' \(OSError: 401 Client Error: gated repo\); "
                                         r'pass a local folder'):
        hf_selection.select_hf('someone/gated', LLAMA_STUDENT, str(tmp_path / 't'))
    assert not os.path.exists(tmp_path / 't')


@pytest.mark.slow
def test_cli_bad_input_exits_with_one_line(llama, tmp_path):
    folder, _ = llama
    teacher = broken_copy(folder, tmp_path, remove_shard)
    proc = run_script('weight_selection.py', '--teacher', teacher, '--student_config', '{"num_hidden_layers": 2}',
                      '--output', str(tmp_path / 's'), timeout=120)
    assert_clean_failure(proc, shard_of(folder, SHARD_L1), 'missing')
    assert proc.returncode == 1 and not os.path.exists(tmp_path / 's')


def test_sigterm_while_writing_leaves_nothing_behind(llama, tmp_path):
    """A scheduler's SIGTERM half-way through the student (sent here by the third tensor's read) ends the CLI as
    Ctrl-C does: the temporary folder is removed, one line, exit status 143."""
    code = (f'import os, runpy, signal, sys; sys.path.insert(0, {ROOT!r}); import hf_selection.selection as s\n'
            'made, produce = [], s.produce\n'
            'def killed_midway(*args):\n'
            '    made.append(1)\n'
            '    if len(made) == 3:\n'
            '        os.kill(os.getpid(), signal.SIGTERM)\n'
            '    return produce(*args)\n'
            's.produce = killed_midway\n'
            f'sys.argv = ["weight_selection.py", "--teacher", {llama[0]!r}, "--student_config", '
            f'{json.dumps(json.dumps(LLAMA_STUDENT))}, "--output", {str(tmp_path / "out" / "s")!r}]\n'
            f'runpy.run_path({os.path.join(ROOT, "weight_selection.py")!r}, run_name="__main__")\n')
    (tmp_path / 'out').mkdir()
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 143 and proc.stderr.strip().splitlines()[-1] == 'terminated', proc.stderr[-2000:]
    assert 'Traceback' not in proc.stderr and os.listdir(tmp_path / 'out') == []


@pytest.mark.parametrize('flags,needle', [
    (['--student', 'vit_tiny_patch16_224'], '--student is for timm models'),
    (['--num_classes', '10'], '--num_classes is for timm models'),
    (['--keep_head'], '--keep_head is for timm models'),
])
def test_timm_flags_with_a_hugging_face_teacher_stop(llama, tmp_path, capsys, flags, needle):
    argv = ['--teacher', llama[0], '--student_config', '{"num_hidden_layers": 2}', '--output', str(tmp_path / 's')]
    line = expect_cli_error(weight_selection.main, argv + flags, capsys, needle)
    assert '--student_config' in line and not os.path.exists(tmp_path / 's')


@pytest.mark.parametrize('extra', [[], ['--teacher_checkpoint', 'vit_small.pth']])
def test_a_timm_teacher_given_the_hugging_face_student_flag_stops(tmp_path, capsys, extra):
    """A timm name with --student_config is not sent to the hub as a Hugging Face id."""
    argv = ['--teacher', 'vit_small_patch16_224.augreg_in21k', '--student_config', '{"hidden_size": 32}',
            '--output', str(tmp_path / 'ws'), *extra]
    expect_cli_error(weight_selection.main, argv, capsys, '--teacher vit_small_patch16_224.augreg_in21k is a timm '
                     'model: give its student with --student NAME')
    assert not os.path.exists(tmp_path / 'ws')


def test_a_hub_id_given_a_timm_only_flag_stops(tmp_path, capsys):
    argv = ['--teacher', 'org/model', '--teacher_checkpoint', 'model.pth', '--student_config', '{"hidden_size": 32}',
            '--output', str(tmp_path / 'ws')]
    expect_cli_error(weight_selection.main, argv, capsys, '--teacher_checkpoint is for timm teachers and '
                     '--student_config for Hugging Face ones', 'give --student NAME instead of --student_config')


def test_hugging_face_flags_with_a_timm_teacher_stop(tmp_path, capsys):
    argv = ['--teacher', 'vit_small_patch16_224', '--student', 'vit_tiny_patch16_224', '--head_selection', 'heads',
            '--output', str(tmp_path / 'ws.pth')]
    expect_cli_error(weight_selection.main, argv, capsys, '--head_selection is for Hugging Face teachers')
    assert not os.path.exists(tmp_path / 'ws.pth')


# ---------------------------------------------------------------------------------------------- timm, .safetensors

def test_timm_safetensors_teacher_is_read_lazily_and_selects_the_same(tmp_path):
    import timm
    from safetensors.torch import load_file, save_file

    from models import io
    torch.manual_seed(0)
    teacher = timm.create_model('vit_tiny_patch16_224', depth=3, img_size=32, patch_size=8, num_classes=5)
    student = timm.create_model('vit_tiny_patch16_224', depth=2, img_size=32, patch_size=8, num_classes=5,
                                embed_dim=96)
    path = str(tmp_path / 'teacher.safetensors')
    save_file(teacher.state_dict(), path)
    lazy = io.read_state_dict(path)
    assert isinstance(lazy, safetensors_io.SafetensorsStateDict) and set(lazy) == set(teacher.state_dict())
    looked_up = []
    get = safetensors_io.SafetensorsStateDict.__getitem__
    lazy_counting = type('Counting', (safetensors_io.SafetensorsStateDict,),
                         {'__getitem__': lambda self, k: looked_up.append(k) or get(self, k)})(path)
    layout = weight_selection.layout_of(teacher)
    got, _ = weight_selection.select_weights(lazy_counting, student, teacher_layout=layout)
    want, _ = weight_selection.select_weights(load_file(path), student, teacher_layout=layout)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert not any(k.startswith('blocks.2.') for k in looked_up)  # the dropped block is never read
    with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) - 10)
    with pytest.raises(UserError, match='truncated'):
        io.read_state_dict(path)


def test_safetensors_reader_matches_the_safetensors_package_for_every_dtype_and_shape(tmp_path):
    from safetensors.torch import load_file, save_file
    g = torch.Generator().manual_seed(0)
    tensors = {'f32': torch.randn(3, 4, generator=g), 'bf16': torch.randn(5, 2, 3, generator=g).bfloat16(),
               'f16_vector': torch.randn(7, generator=g).half(), 'scalar': torch.tensor(2.5, dtype=torch.float64),
               'i64': torch.arange(6).reshape(2, 3), 'flags': torch.tensor([True, False, True]),
               'empty': torch.zeros(0, 4)}
    path = str(tmp_path / 't.safetensors')
    save_file(tensors, path)
    want, got = load_file(path), safetensors_io.SafetensorsStateDict(path)
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape and torch.equal(got[key], value), key
    header = safetensors_io.read_header(path)
    with open(path, 'rb', buffering=0) as f:  # a range of rows, as the Hugging Face path reads them
        assert torch.equal(safetensors_io.read_rows(f, path, 'bf16', header['bf16'], 1, 4), want['bf16'][1:4])


# ---------------------------------------------------------------------------------------------- other modes

def test_llama_consecutive_and_random_are_consistent(llama, tmp_path):
    folder, t = llama
    hf_selection.select_hf(folder, LLAMA_STUDENT, str(tmp_path / 'c'), element_selection='consecutive')
    s = load_strict(str(tmp_path / 'c')).state_dict()
    # the first 16 dims, 20 MLP channels, KV groups 0 and 1 with their query heads 0-3
    assert torch.equal(s['model.layers.0.self_attn.q_proj.weight'],
                       pick(t['model.layers.0.self_attn.q_proj.weight'], rows([0, 1, 2, 3]), list(range(16))))
    assert torch.equal(s['model.layers.0.mlp.down_proj.weight'],
                       pick(t['model.layers.0.mlp.down_proj.weight'], list(range(16)), list(range(20))))
    hf_selection.select_hf(folder, LLAMA_STUDENT, str(tmp_path / 'r'), element_selection='random', seed=3)
    s = load_strict(str(tmp_path / 'r')).state_dict()
    # one random set of 16 of the 32 dims, recovered from the embedding's columns, explains every tensor
    emb_t, emb_s = t['model.embed_tokens.weight'], s['model.embed_tokens.weight']
    hidden = [next(j for j in range(32) if torch.equal(emb_t[:, j], emb_s[:, i])) for i in range(16)]
    assert hidden == sorted(hidden) and hidden != EVEN16 and hidden != list(range(16))
    wq_t = pick(t['model.layers.1.self_attn.q_proj.weight'], None, hidden).reshape(8, 4, 16)
    wq_s = s['model.layers.1.self_attn.q_proj.weight'].reshape(4, 4, 16)
    q_heads = [next(h for h in range(8) if torch.equal(wq_s[i], wq_t[h])) for i in range(4)]
    # whole KV groups of two query heads each
    assert q_heads in ([0, 1, 2, 3], [0, 1, 4, 5], [0, 1, 6, 7], [2, 3, 4, 5], [2, 3, 6, 7], [4, 5, 6, 7])
    for key, idx in [('lm_head.weight', (None, hidden)), ('model.norm.weight', (hidden,)),
                     ('model.layers.1.self_attn.o_proj.weight', (hidden, rows(q_heads)))]:
        assert torch.equal(s[key], pick(t[key], *idx)), key
    # 20 of 48 MLP channels, recovered from down_proj's columns, are gate_proj's rows
    down_t = pick(t['model.layers.1.mlp.down_proj.weight'], hidden, None)
    down_s = s['model.layers.1.mlp.down_proj.weight']
    inter = [next(j for j in range(48) if torch.equal(down_t[:, j], down_s[:, i])) for i in range(20)]
    assert inter == sorted(inter) and inter != INTER_48_20
    assert selected(s, t, 'model.layers.1.mlp.gate_proj.weight', inter, hidden)


def test_gpt2_heads_mode_takes_whole_heads_for_q_k_v(gpt2, tmp_path):
    folder, t = gpt2
    hf_selection.select_hf(folder, dict(n_embd=16, n_head=2, n_layer=1), str(tmp_path / 's'), head_selection='heads')
    s = load_strict(str(tmp_path / 's')).state_dict()
    heads = rows([0, 2], head_dim=8)  # 2 of 4 heads of 8 dims, Algorithm 1 on 4 -> 2
    cols = heads + [32 + i for i in heads] + [64 + i for i in heads]
    assert selected(s, t, 'transformer.h.0.attn.c_attn.weight', EVEN16, cols)
    assert selected(s, t, 'transformer.h.0.attn.c_proj.weight', heads, EVEN16)


# ---------------------------------------------------------------------------------------------- tensorwise modes

def stored_tensors(folder):
    """Every tensor of a folder's safetensors files, read with the safetensors package."""
    from safetensors.torch import load_file
    return {k: v for name in sorted(os.listdir(folder)) if name.endswith('.safetensors')
            for k, v in load_file(os.path.join(folder, name)).items()}


def top_l1(tensor, dim, s):
    """The s slices along dim with the largest L1 norms, in order (written here, apart from the selector)."""
    other = [d for d in range(tensor.ndim) if d != dim]
    norms = tensor.double().abs().sum(dim=other) if other else tensor.double().abs()
    return first_largest(norms, s).tolist()


def first_largest(values, k):
    """Indices of the k largest along the last dimension, in order; of equal values, the first ones (the
    selector's rule for ties, which topk leaves to its kernel)."""
    return values.sort(dim=-1, descending=True, stable=True).indices[..., :k].sort(dim=-1).values


@pytest.mark.parametrize('mode', hf_selection.TENSORWISE)
def test_llama_tensorwise_modes_select_as_the_timm_selector(llama, tmp_path, monkeypatch, mode):
    """Each student tensor is what weight_selection's ElementSelector makes of its teacher tensor (the timm path),
    except that under magnitude a token's embedding row keeps only its own values (squeezed here a row or two
    at a time: BLOCK_ELEMENTS 40 over rows of 32)."""
    folder, t = llama
    monkeypatch.setattr(hf_selection.axes, 'BLOCK_ELEMENTS', 40)
    report = hf_selection.select_hf(folder, LLAMA_STUDENT, str(tmp_path / 's'), layer_selection='uniform',
                                    element_selection=mode, seed=5)
    s = load_strict(str(tmp_path / 's')).state_dict()
    assert report['meta']['settings']['head_selection'] == 'dims'
    selector = weight_selection.ElementSelector(mode, 5, t)
    for key, value in s.items():
        source = report['tensors'][key]['source']
        if mode == 'magnitude' and key in ('model.embed_tokens.weight', 'lm_head.weight'):
            keep = first_largest(t[source].abs(), 16)
            expected = torch.stack([row[k] for row, k in zip(t[source], keep)])
        else:
            expected = selector.select(t[source], value.shape, key, source)
        assert torch.equal(value, expected), key
    # they read whole tensors, and still only those of the layers kept (0, 2, 4), but for l1_consistent's ranking
    dropped = [k for k in report['keys_read'] if k.startswith(('model.layers.1.', 'model.layers.3.'))]
    assert bool(dropped) == (mode == 'l1_consistent')
    assert not torch.equal(s['model.layers.0.mlp.up_proj.weight'],
                           pick(t['model.layers.0.mlp.up_proj.weight'], INTER_48_20, EVEN16))
    forward_finite(load_strict(str(tmp_path / 's')))


def kept_indices(student, teacher):
    """The teacher indices a student tensor kept along each dimension, recovered from its values (each teacher value
    is found at exactly one place): None if the student is no grid of teacher slices."""
    hits = (student.reshape(-1, 1) == teacher.reshape(1, -1)).nonzero()
    assert torch.equal(hits[:, 0], torch.arange(student.numel())), 'a value found at no or at several places'
    coords = torch.stack(torch.unravel_index(hits[:, 1], teacher.shape), -1).reshape(*student.shape, teacher.ndim)
    kept = []
    for dim in range(teacher.ndim):
        along = coords[..., dim].movedim(dim, 0).reshape(student.shape[dim], -1)
        if not (along == along[:, :1]).all():
            return None
        kept.append(tuple(along[:, 0].tolist()))
    return kept


def test_llama_random_inconsistent_draws_a_sorted_set_per_tensor_and_dimension(llama, tmp_path):
    """random_inconsistent: every student tensor is a grid of its teacher's slices, along each narrowed dimension a
    sorted set of distinct indices of the student's size, drawn afresh: no two tensors share one."""
    folder, t = llama
    report = hf_selection.select_hf(folder, LLAMA_STUDENT, str(tmp_path / 's'), element_selection='random_inconsistent',
                                    seed=5)
    s = load_strict(str(tmp_path / 's')).state_dict()
    drawn = {}  # (teacher size, student size) -> the index sets drawn for it
    for key, value in s.items():
        assert report['tensors'][key]['source'] == key  # first-N layers: student layer i is teacher layer i
        kept = kept_indices(value, t[key])
        assert kept is not None, key
        for size, idx in zip(t[key].shape, kept):
            assert list(idx) == sorted(set(idx)) and 0 <= idx[0] and idx[-1] < size, key
            if len(idx) < size:
                drawn.setdefault((size, len(idx)), []).append(idx)
            else:
                assert idx == tuple(range(size)), key  # vocab rows stay themselves
    assert sorted(drawn) == [(16, 8), (32, 16), (48, 20)]
    for sets in drawn.values():
        assert len(sets) > 1 and len(set(sets)) == len(sets)
    assert tuple(EVEN16) not in drawn[32, 16] and tuple(INTER_48_20) not in drawn[48, 20]


def magnitude_expected(tensor, shape):
    """Table 7's magnitude pruning written here: the n largest |w| by a stable descending sort (of equal magnitudes,
    the earlier ones), kept in their original order, reshaped to the student's shape."""
    flat = tensor.reshape(-1)
    keep = flat.abs().sort(descending=True, stable=True).indices[:math.prod(shape)].sort().values
    return flat[keep].reshape(shape)


@pytest.mark.parametrize('block', [7, 2 ** 22])
def test_llama_magnitude_keeps_the_largest_weights_first_of_ties_in_order(tmp_path, monkeypatch, block):
    """magnitude squeezes each tensor's largest |w| into the student's shape, the earlier of equal magnitudes first
    (weights in steps of 1/4: many ties, also across blocks of 7), and a token's row keeps only its own values."""
    monkeypatch.setattr(weight_selection, 'BLOCK_ELEMENTS', block)
    monkeypatch.setattr(hf_selection.axes, 'BLOCK_ELEMENTS', block)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    with torch.no_grad():
        for param in model.parameters():
            param.copy_((torch.randn(param.shape) * 2).round() / 4)
    model.save_pretrained(tmp_path / 't', max_shard_size='20KB')
    t = model.state_dict()
    hf_selection.select_hf(str(tmp_path / 't'), LLAMA_STUDENT, str(tmp_path / 's'), element_selection='magnitude')
    s = load_strict(str(tmp_path / 's')).state_dict()
    ties = 0
    for key, value in s.items():
        if key in ('model.embed_tokens.weight', 'lm_head.weight'):  # 64 tokens' rows of 32 -> 16
            expected = torch.stack([magnitude_expected(row, (16,)) for row in t[key]])
        else:
            expected = magnitude_expected(t[key], tuple(value.shape))
            magnitudes = t[key].abs().reshape(-1).sort(descending=True).values
            ties += int(magnitudes[value.numel() - 1] == magnitudes[value.numel()])  # a tie at the cut
        assert torch.equal(value, expected), key
    assert ties > 10


def test_gpt2_l1_prunes_each_tensor_and_biases_follow_their_neurons(gpt2, tmp_path):
    """Table 7's L1 pruning on GPT-2's [in, out] Conv1D weights: a neuron is a column; q, k and v of the fused
    c_attn are three tensors; a bias (and a LayerNorm's bias) keeps the neurons of its weight."""
    folder, t = gpt2
    hf_selection.select_hf(folder, dict(n_embd=16, n_head=2, n_layer=2), str(tmp_path / 's'), element_selection='l1')
    s = load_strict(str(tmp_path / 's')).state_dict()
    for layer in range(2):
        src = dst = f'transformer.h.{layer}.'
        w = t[src + 'attn.c_attn.weight']
        parts = [w[:, 32 * i:32 * (i + 1)] for i in range(3)]
        assert torch.equal(s[dst + 'attn.c_attn.weight'],
                           torch.cat([pick(p, top_l1(p, 0, 16), top_l1(p, 1, 16)) for p in parts], 1))
        assert torch.equal(s[dst + 'attn.c_attn.bias'], torch.cat([
            t[src + 'attn.c_attn.bias'][32 * i:32 * (i + 1)][top_l1(p, 1, 16)] for i, p in enumerate(parts)]))
        for name, out in [('attn.c_proj', 16), ('mlp.c_fc', 64), ('mlp.c_proj', 16)]:
            w = t[src + name + '.weight']
            assert selected(s, t, dst + name + '.weight', top_l1(w, 0, w.shape[0] // 2), top_l1(w, 1, out)), name
            assert selected(s, t, dst + name + '.bias', top_l1(w, 1, out)), name
        for ln in ('ln_1', 'ln_2'):
            keep = top_l1(t[src + ln + '.weight'], 0, 16)
            assert selected(s, t, dst + ln + '.weight', keep) and selected(s, t, dst + ln + '.bias', keep)
    for key in ('transformer.wte.weight', 'transformer.wpe.weight'):
        assert selected(s, t, key, None, top_l1(t[key], 1, 16)), key
    forward_finite(load_strict(str(tmp_path / 's')))


def test_gpt2_l1_consistent_ranks_the_hidden_width_over_the_whole_teacher(gpt2, tmp_path):
    """One hidden index set, by the summed L1 norms of every teacher slice along a width of 32 (the hidden width,
    and q, k and v of c_attn); the MLP width is ranked in each tensor on its own, a bias with its weight."""
    folder, t = gpt2
    stored = stored_tensors(folder)
    scores = torch.zeros(32, dtype=torch.float64)
    for key, value in stored.items():
        for dim, size in enumerate(value.shape):
            if size in (32, 96):
                for part in value.split(32, dim):
                    other = [d for d in range(value.ndim) if d != dim]
                    scores += part.double().abs().sum(dim=other) if other else part.double().abs()
    h = first_largest(scores, 16).tolist()
    hf_selection.select_hf(folder, dict(n_embd=16, n_head=2, n_layer=1), str(tmp_path / 's'),
                           element_selection='l1_consistent')
    s = load_strict(str(tmp_path / 's')).state_dict()
    p = 'transformer.h.0.'
    assert selected(s, t, 'transformer.ln_f.weight', h) and selected(s, t, 'transformer.wte.weight', None, h)
    assert selected(s, t, p + 'attn.c_attn.weight', h, h + [32 + i for i in h] + [64 + i for i in h])
    assert selected(s, t, p + 'attn.c_proj.weight', h, h)
    assert selected(s, t, p + 'mlp.c_fc.weight', h, top_l1(t[p + 'mlp.c_fc.weight'], 1, 64))
    assert selected(s, t, p + 'mlp.c_fc.bias', top_l1(t[p + 'mlp.c_fc.weight'], 1, 64))  # its weight's neurons
    assert selected(s, t, p + 'mlp.c_proj.weight', top_l1(t[p + 'mlp.c_proj.weight'], 0, 64), h)
    assert h != EVEN16


# ---------------------------------------------------------------------------------------------- BERT

@pytest.fixture(scope='module')
def bert(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
                                     vocab_size=64, max_position_embeddings=40)
    model = transformers.BertForMaskedLM(config).eval()
    return save_teacher(tmp_path_factory.mktemp('bert'), model), model.state_dict()


def test_bert_every_tensor(bert, tmp_path):
    folder, t = bert
    student = dict(hidden_size=16, num_attention_heads=2, intermediate_size=20, num_hidden_layers=2,
                   max_position_embeddings=24)
    hf_selection.select_hf(folder, student, str(tmp_path / 's'), layer_selection='uniform')
    s = load_strict(str(tmp_path / 's'), transformers.AutoModelForMaskedLM).state_dict()
    h, inter = EVEN16, INTER_48_20  # per dimension (no rotary): query, key, value take the width's set
    expected = {'bert.embeddings.word_embeddings.weight': (None, h), 'bert.embeddings.position_embeddings.weight':
                (list(range(24)), h), 'bert.embeddings.token_type_embeddings.weight': (None, h),
                'bert.embeddings.LayerNorm.weight': (h,), 'bert.embeddings.LayerNorm.bias': (h,),
                'cls.predictions.bias': (None,), 'cls.predictions.transform.dense.weight': (h, h),
                'cls.predictions.transform.dense.bias': (h,), 'cls.predictions.transform.LayerNorm.weight': (h,),
                'cls.predictions.transform.LayerNorm.bias': (h,)}
    expected = {k: pick(t[k], *idx) for k, idx in expected.items()}
    for j, i in enumerate([0, 2]):  # Algorithm 1 on 3 -> 2: round(linspace(0, 2, 2))
        src, dst = f'bert.encoder.layer.{i}.', f'bert.encoder.layer.{j}.'
        for name, idx in [('attention.self.query', (h, h)), ('attention.self.key', (h, h)),
                          ('attention.self.value', (h, h)),
                          ('attention.output.dense', (h, h)), ('attention.output.LayerNorm', (h,)),
                          ('intermediate.dense', (inter, h)), ('output.dense', (h, inter)), ('output.LayerNorm', (h,))]:
            expected[dst + name + '.weight'] = pick(t[src + name + '.weight'], *idx)
            expected[dst + name + '.bias'] = pick(t[src + name + '.bias'], idx[0])
    expected['cls.predictions.decoder.weight'] = expected['bert.embeddings.word_embeddings.weight']  # tied
    expected['cls.predictions.decoder.bias'] = expected['cls.predictions.bias']  # the same parameter in the model
    assert_tensors_are(s, expected)


@pytest.mark.parametrize('tie', [True, False])
def test_bert_plans_read_the_teacher_file_in_order(bert, tmp_path, tie):
    """Every teacher tensor is read where the file has it, the output bias too (reads go forward)."""
    folder, _ = bert
    report = hf_selection.select_hf(folder, {'num_hidden_layers': 2, 'hidden_size': 16, 'num_attention_heads': 2,
                                             'tie_word_embeddings': tie}, str(tmp_path / 's'))
    shards = hf_selection.teacher.TeacherShards(folder)
    sources = [entry['source'] for key, entry in report['tensors'].items()
               if not (key == 'cls.predictions.decoder.weight' and not tie)]  # an untied head: the embedding again
    places = [(shards.where[source], shards.header[source][2][0]) for source in sources]
    assert 'cls.predictions.bias' in sources and places == sorted(places)


def test_bert_same_width_shallower_is_the_truncated_teacher(bert, tmp_path):
    folder, _ = bert
    hf_selection.select_hf(folder, {'num_hidden_layers': 2}, str(tmp_path / 's'))
    teacher = transformers.AutoModelForMaskedLM.from_pretrained(folder).eval()
    teacher.bert.encoder.layer = teacher.bert.encoder.layer[:2]
    ids = torch.tensor([[2, 7, 9, 3]])
    with torch.no_grad():
        got, want = load_strict(str(tmp_path / 's'), transformers.AutoModelForMaskedLM)(ids).logits, teacher(ids).logits
    assert torch.isfinite(got).all() and torch.equal(got, want)


def test_bert_untied_student_of_a_tied_teacher_keeps_its_output_bias(bert, tmp_path):
    """A tied BERT file stores the output bias only as cls.predictions.bias; an untied student's output layer
    (cls.predictions.decoder) takes the embedding and that bias, so that a student as wide as its teacher computes
    the truncated teacher's logits."""
    folder, t = bert
    hf_selection.select_hf(folder, {'num_hidden_layers': 2, 'tie_word_embeddings': False}, str(tmp_path / 's'))
    student = load_strict(str(tmp_path / 's'), transformers.AutoModelForMaskedLM)
    s = student.state_dict()
    assert s['cls.predictions.decoder.weight'].data_ptr() != s['bert.embeddings.word_embeddings.weight'].data_ptr()
    assert torch.equal(s['cls.predictions.decoder.bias'], t['cls.predictions.bias'])
    assert torch.equal(s['cls.predictions.decoder.weight'], t['bert.embeddings.word_embeddings.weight'])
    teacher = transformers.AutoModelForMaskedLM.from_pretrained(folder).eval()
    teacher.bert.encoder.layer = teacher.bert.encoder.layer[:2]
    ids = torch.tensor([[2, 7, 9, 3]])
    with torch.no_grad():
        assert torch.equal(student(ids).logits, teacher(ids).logits)


def test_tied_student_of_an_untied_teacher_says_what_it_leaves_out(bert, llama, tmp_path, capsys):
    """An untied teacher's output layer has no place in a tied student: the report and the command line name it.
    An untied BERT teacher computes with cls.predictions.decoder.bias, which the tied student stores as
    cls.predictions.bias."""
    folder, _ = bert
    untied = transformers.AutoModelForMaskedLM.from_pretrained(folder, tie_word_embeddings=False)
    torch.manual_seed(1)
    untied.cls.predictions.decoder.bias.data.normal_()
    untied.cls.predictions.decoder.weight.data.normal_()
    t = untied.state_dict()
    assert not torch.equal(t['cls.predictions.decoder.bias'], t['cls.predictions.bias'])
    teacher = save_teacher_as_is(untied, tmp_path / 't')
    report = hf_selection.select_hf(teacher, {'num_hidden_layers': 2, 'tie_word_embeddings': True}, str(tmp_path / 's'))
    assert report['meta']['unused'] == ['cls.predictions.decoder.weight']
    s = load_strict(str(tmp_path / 's'), transformers.AutoModelForMaskedLM).state_dict()
    assert torch.equal(s['cls.predictions.bias'], t['cls.predictions.decoder.bias'])
    assert torch.equal(s['cls.predictions.decoder.weight'], t['bert.embeddings.word_embeddings.weight'])
    weight_selection.main(['--teacher', llama[0], '--student_config', json.dumps(dict(
        LLAMA_STUDENT, tie_word_embeddings=True)), '--output', str(tmp_path / 'l')])
    assert "note: the teacher's untied lm_head.weight is left out" in capsys.readouterr().out
    assert json.load(open(tmp_path / 'l' / 'selection.json'))['meta']['unused'] == ['lm_head.weight']
    weight_selection.main(['--teacher', llama[0], '--student_config', json.dumps(dict(
        LLAMA_STUDENT, tie_word_embeddings=True)), '--output', str(tmp_path / 'q'), '--quiet'])
    assert len(capsys.readouterr().out.splitlines()) == 1  # --quiet: the summary line only


@pytest.mark.parametrize('tie', [True, False])
def test_bert_output_bias_from_a_file_that_names_it_decoder_bias(bert, tmp_path, tie):
    """A BERT file whose output bias is stored only as cls.predictions.decoder.bias (as older exports hold it): a
    tied student stores it as cls.predictions.bias, an untied one as both, and either computes the truncated
    teacher's logits."""
    from safetensors.torch import load_file, save_file
    folder, t = bert
    copy = shutil.copytree(folder, tmp_path / 't')
    for name in os.listdir(copy):
        if name.endswith('.safetensors'):
            tensors = load_file(copy / name)
            if 'cls.predictions.bias' in tensors:
                tensors['cls.predictions.decoder.bias'] = tensors.pop('cls.predictions.bias')
                save_file(tensors, copy / name, metadata={'format': 'pt'})
    index = json.load(open(copy / 'model.safetensors.index.json'))
    index['weight_map']['cls.predictions.decoder.bias'] = index['weight_map'].pop('cls.predictions.bias')
    json.dump(index, open(copy / 'model.safetensors.index.json', 'w'))
    hf_selection.select_hf(str(copy), {'num_hidden_layers': 2, 'tie_word_embeddings': tie}, str(tmp_path / 's'))
    student = load_strict(str(tmp_path / 's'), transformers.AutoModelForMaskedLM)
    assert torch.equal(student.cls.predictions.decoder.bias, t['cls.predictions.bias'])
    teacher = transformers.AutoModelForMaskedLM.from_pretrained(folder).eval()
    teacher.bert.encoder.layer = teacher.bert.encoder.layer[:2]
    ids = torch.tensor([[2, 7, 9, 3]])
    with torch.no_grad():
        assert torch.equal(student(ids).logits, teacher(ids).logits)


def save_teacher_as_is(model, folder):
    model.save_pretrained(folder, max_shard_size='20KB')
    return str(folder)


@pytest.mark.parametrize('mode', hf_selection.TENSORWISE)
def test_bert_tensorwise_modes_load_and_keep_tokens_and_positions(bert, tmp_path, mode):
    folder, t = bert
    student = dict(hidden_size=16, num_attention_heads=2, intermediate_size=20, num_hidden_layers=2,
                   max_position_embeddings=24)
    hf_selection.select_hf(folder, student, str(tmp_path / 's'), element_selection=mode)
    model = load_strict(str(tmp_path / 's'), transformers.AutoModelForMaskedLM)
    s = model.state_dict()
    assert torch.isfinite(model(torch.tensor([[2, 7, 9, 3]])).logits).all()
    assert torch.equal(s['cls.predictions.bias'], t['cls.predictions.bias'])  # a bias per token: all kept
    for key in ('bert.embeddings.position_embeddings.weight', 'bert.embeddings.token_type_embeddings.weight'):
        for row in range(len(s[key])):  # the first rows, each holding only its own teacher row's values
            assert torch.isin(s[key][row], t[key][row]).all(), (key, row)
    if mode == 'l1':  # Linear weights [out, in]: a bias keeps its weight's rows; positions: the first 24
        for name, kept in [('bert.encoder.layer.1.attention.self.query', 16),
                           ('bert.encoder.layer.0.intermediate.dense', 20),
                           ('cls.predictions.transform.dense', 16)]:  # [hidden, hidden]: the rows, its output
            assert selected(s, t, name + '.bias', top_l1(t[name + '.weight'], 0, kept)), name
        pos = t['bert.embeddings.position_embeddings.weight']
        assert selected(s, t, 'bert.embeddings.position_embeddings.weight', list(range(24)), top_l1(pos, 1, 16))
        types = t['bert.embeddings.token_type_embeddings.weight']
        assert selected(s, t, 'bert.embeddings.token_type_embeddings.weight', None, top_l1(types, 1, 16))


def save_as(folder, dtype, out):
    """A copy of the Hugging Face folder with every tensor stored in `dtype` (the dtypes transformers does not
    write: float8)."""
    from safetensors.torch import load_file, save_file
    shutil.copytree(folder, out)
    for name in os.listdir(out):
        if name.endswith('.safetensors'):
            path = os.path.join(out, name)
            save_file({k: v.to(dtype) for k, v in load_file(path).items()}, path, metadata={'format': 'pt'})
    return str(out)


@pytest.mark.parametrize('mode', hf_selection.TENSORWISE)
def test_qwen2_bf16_tied_teacher_tensorwise(tmp_path, mode):
    """bf16 stays bf16; a student as wide as its teacher is its first layer exactly; an untied student's lm_head
    starts from the embedding; --exclude still initializes; under l1 the q/k/v biases keep their weights' rows;
    a float8 teacher selects too (magnitude included: float8 has no topk or gather kernel)."""
    torch.manual_seed(0)
    config = transformers.Qwen2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=8,
                                      num_key_value_heads=4, vocab_size=64, tie_word_embeddings=True)
    folder = save_teacher(tmp_path / 't', transformers.Qwen2ForCausalLM(config).to(torch.bfloat16))
    t = {k: v for k, v in load_strict(folder).state_dict().items()}
    untied = dict(LLAMA_STUDENT, num_hidden_layers=1, tie_word_embeddings=False)
    hf_selection.select_hf(folder, untied, str(tmp_path / 's'), element_selection=mode, exclude=['mlp'])
    s = load_strict(str(tmp_path / 's')).state_dict()
    assert {v.dtype for v in s.values()} == {torch.bfloat16}
    assert torch.equal(s['lm_head.weight'], s['model.embed_tokens.weight']) == (mode != 'random_inconsistent')
    assert not selected(s, t, 'model.layers.0.mlp.up_proj.weight', INTER_48_20, EVEN16)  # excluded: initialized
    if mode == 'l1':
        for name, kept in [('q_proj', 16), ('k_proj', 8), ('v_proj', 8)]:
            w = t[f'model.layers.0.self_attn.{name}.weight']
            assert selected(s, t, f'model.layers.0.self_attn.{name}.bias', top_l1(w, 0, kept)), name
    hf_selection.select_hf(folder, {'num_hidden_layers': 1}, str(tmp_path / 'same'), element_selection=mode)
    same = load_strict(str(tmp_path / 'same')).state_dict()
    assert all(torch.equal(v, t[k]) for k, v in same.items())
    fp8 = save_as(folder, torch.float8_e4m3fn, tmp_path / 't8')
    hf_selection.select_hf(fp8, LLAMA_STUDENT | {'num_hidden_layers': 1}, str(tmp_path / 's8'), element_selection=mode)
    s8 = stored_tensors(str(tmp_path / 's8'))
    assert {v.dtype for v in s8.values()} == {torch.float8_e4m3fn}
    if mode == 'magnitude':  # each token's row: its 16 largest values, in order, the first of equal ones (float8
        emb = stored_tensors(fp8)['model.embed_tokens.weight'].float()  # has many)
        keep = first_largest(emb.abs(), 16)
        assert any(len(set(row.tolist())) < 32 for row in emb.abs())
        assert torch.equal(s8['model.embed_tokens.weight'].float(), emb.gather(1, keep))
