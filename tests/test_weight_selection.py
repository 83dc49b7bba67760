"""Weight selection against the paper's Algorithm 1 and Section 3.2, with small timm models (no network)."""
import os

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed, resample_patch_embed

import models  # noqa: F401
import weight_selection as ws
from models import io
from conftest import assert_clean_failure, expect_cli_error, run_script, shared_path
from utils import UserError


def make(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


# ---------------------------------------------------------------------------------------------- indices

def test_uniform_indices_paper_example():
    # "to initialize a linear layer W_s of shape 2x3 with W_t of shape 4x6, we select 1st and 3rd
    # slice along the first dimension, and 1st, 3rd, and 5th along the second"
    w = torch.arange(24.).reshape(4, 6)
    out = ws.ElementSelector('uniform', 0).select(w, (2, 3), 'w')
    assert out.tolist() == [[0., 2., 4.], [12., 14., 16.]]


@pytest.mark.parametrize('t,s,expected', [
    (4, 2, [0, 2]), (6, 3, [0, 2, 4]), (384, 192, list(range(0, 384, 2))),
    (7, 3, [0, 3, 6]), (10, 4, [0, 3, 6, 9]), (5, 5, [0, 1, 2, 3, 4]),
    # not divisible: round(linspace(0, t - 1, s)), worked by hand; 3.5 rounds to the even 4
    (8, 3, [0, 4, 7]), (9, 4, [0, 3, 5, 8]), (11, 4, [0, 3, 7, 10]),
])
def test_uniform_indices(t, s, expected):
    idx = ws.uniform_indices(t, s)
    assert idx.tolist() == expected
    assert len(set(idx.tolist())) == s


def test_consecutive_random_l1_magnitude_indices():
    w = torch.tensor([[1., -5., 2., 0.5], [3., 0., -4., 1.]])
    assert ws.ElementSelector('consecutive', 0).select(w, (2, 2), 'w').tolist() == [[1., -5.], [3., 0.]]
    r = ws.ElementSelector('random', 3).select(w, (2, 2), 'w')
    cols = [c for c in range(4) for k in range(2) if torch.equal(w[:, c], r[:, k])]
    assert len(cols) == 2 and cols == sorted(cols)
    # magnitude: the 4 largest |w| (-5, 2... ) kept in their original order, squeezed to 2x2
    assert ws.magnitude_squeeze(w, (2, 2)).tolist() == [[-5., 2.], [3., -4.]]
    # l1 of a non-embedding width is ranked per tensor: columns by L1 norm: 4, 5, 6, 1.5 -> keep 1, 2
    assert ws.ElementSelector('l1', 0, {}).select(w, (2, 2), 'w').tolist() == [[-5., 2.], [0., -4.]]


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float8_e4m3fn])
@pytest.mark.parametrize('block', [7, 64, 2 ** 22])
def test_magnitude_in_blocks_keeps_the_n_largest_first_ties_first(monkeypatch, dtype, block):
    """The blocked radix select keeps what a stable descending sort of |w| keeps (of equal magnitudes at the
    cut, the earlier ones), in the original order; bf16 rounded to quarters makes many ties."""
    monkeypatch.setattr(ws, 'BLOCK_ELEMENTS', block)
    generator = torch.Generator().manual_seed(0)
    for numel, n in [(100, 37), (1000, 1), (1000, 999), (257, 100), (300, 299)]:
        w = (torch.randn(numel, generator=generator) * 4).round() / 4 if dtype == torch.bfloat16 else \
            torch.randn(numel, generator=generator)
        w = w.to(dtype)
        order = torch.sort(w.float().abs() if dtype != torch.float64 else w.abs(), descending=True, stable=True)
        expected = w[order.indices[:n].sort().values]
        got = ws.magnitude_squeeze(w, (n,))
        assert got.dtype == dtype and torch.equal(got.view(torch.uint8), expected.view(torch.uint8)), (numel, n)
    assert ws.magnitude_squeeze(w, (0, 3)).shape == (0, 3)


def test_l1_ranking_keeps_the_first_of_equal_norms():
    """Equal L1 norms (all-zero slices, a bias still at its init) are broken by position, the earlier first, as
    magnitude breaks equal magnitudes: the same student on every machine, whatever topk's kernel does."""
    w = torch.tensor([[0., 2., 0., 2., 0., 1.], [0., -2., 0., 2., 0., 1.]])  # column norms 0, 4, 0, 4, 0, 2
    assert ws.top_l1(w, 1, 1).tolist() == [1]
    assert ws.top_l1(w, 1, 4).tolist() == [0, 1, 3, 5]
    assert ws.top_l1(torch.zeros(40, 3), 0, 5).tolist() == [0, 1, 2, 3, 4]
    assert ws.ElementSelector('l1', 0, {}).select(torch.zeros(4, 6), (4, 3), 'b').shape == (4, 3)


@pytest.mark.parametrize('shape,dim', [((7, 5), 0), ((7, 5), 1), ((3, 4, 5, 2), 0), ((3, 4, 5, 2), 2), ((9,), 0)])
def test_l1_norms_summed_over_blocks_equal_the_whole_sums(monkeypatch, shape, dim):
    """l1_norms reduces a few rows at a time (BLOCK_ELEMENTS) so that a big Hugging Face tensor gets no float64
    copy; blocks of one or two rows must give the slice norms of the whole tensor."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    other = [d for d in range(w.ndim) if d != dim]
    expected = w.double().abs().sum(dim=other) if other else w.double().abs()
    for block in (1, 11, 10 ** 6):
        monkeypatch.setattr(ws, 'BLOCK_ELEMENTS', block)
        assert torch.allclose(ws.l1_norms(w, dim), expected, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------------------- layers

@pytest.mark.parametrize('mode,expected', [
    ('first', [0, 1, 2, 3, 4, 5]), ('uniform', [0, 2, 4, 6, 8, 10]),
    ('mid', [3, 4, 5, 6, 7, 8]), ('last', [6, 7, 8, 9, 10, 11]),
])
def test_layer_indices_12_to_6(mode, expected):
    assert ws.layer_indices(mode, 12, 6) == expected


def test_layer_maps_per_stage_convnext():
    t = make('convnext_tiny').state_dict().keys()
    s = make('convnext_femto').state_dict().keys()
    assert ws.layer_maps(t, s, 'first') == {'stages.0.blocks': [0, 1], 'stages.1.blocks': [0, 1],
                                             'stages.2.blocks': [0, 1, 2, 3, 4, 5], 'stages.3.blocks': [0, 1]}
    assert ws.layer_maps(t, s, 'uniform')['stages.2.blocks'] == [0, 2, 3, 5, 6, 8]
    assert ws.layer_maps(t, s, 'last')['stages.0.blocks'] == [1, 2]
    explicit = ws.layer_maps(t, s, '0,2;1,2;0,1,2,3,4,8;0,1')
    assert explicit['stages.2.blocks'] == [0, 1, 2, 3, 4, 8] and explicit['stages.1.blocks'] == [1, 2]
    with pytest.raises(UserError, match='one comma-separated list per group'):
        ws.layer_maps(t, s, '0,1,2')
    with pytest.raises(UserError, match='must list 2 teacher blocks'):
        ws.layer_maps(t, s, '0,5;0,1;0,1,2,3,4,5;0,1')


def test_student_deeper_than_teacher_is_an_error():
    with pytest.raises(UserError, match='13 blocks where the teacher has 12'):
        ws.select_weights(make('vit_small_patch16_224', img_size=32, patch_size=8),
                          make('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=13))


# ---------------------------------------------------------------------------------------------- full models

def halve(t, s_shape, key):
    """Independent expectation for a 2x narrower student: every halved dimension keeps indices 0, 2, 4, ...
    A fused qkv is halved per q, k and v block."""
    if key.endswith(('qkv.weight', 'qkv.bias')):
        t3 = t.reshape(3, t.shape[0] // 3, *t.shape[1:])
        return _halve_dims(t3, (3, s_shape[0] // 3, *s_shape[1:])).reshape(s_shape)
    return _halve_dims(t, s_shape)


def _halve_dims(t, s_shape):
    index = tuple(slice(None, None, 2) if ts == 2 * ss else slice(None) for ts, ss in zip(t.shape, s_shape))
    return t[index]


# ViT-S -> ViT-T, and Table 5's CLIP pair (pre-norm, no patch-embedding bias), narrowed: the layouts are the point
@pytest.mark.parametrize('teacher_name,student_name,kwargs', [
    ('vit_small_patch16_224', 'vit_tiny_patch16_224', ({}, {})),
    ('vit_base_patch16_clip_224', 'vit_tiny_patch16_clip_224',
     ({'depth': 2, 'embed_dim': 96, 'num_heads': 4}, {'depth': 2, 'embed_dim': 48, 'num_heads': 2}))])
def test_vit_to_half_width_every_key(teacher_name, student_name, kwargs):
    teacher, student = make(teacher_name, **kwargs[0]), make(student_name, **kwargs[1])
    sd, report = ws.select_weights(teacher, student)
    t_sd = teacher.state_dict()
    for key, value in student.state_dict().items():
        if key.startswith('head.'):
            assert report[key]['action'] == 'skipped' and torch.equal(sd[key], value)
            continue
        expected = halve(t_sd[key], tuple(value.shape), key)
        assert expected.shape == value.shape, key
        assert torch.equal(sd[key], expected), key
        assert report[key]['action'] == 'selected' and report[key]['source'] == key
    student.load_state_dict(sd)


@pytest.mark.parametrize('student_name,kwargs', [('convnext_femto', {}), ('convnext_femto_linear', {}),
                                                 ('convnext_femto', {'conv_mlp': False})])
@pytest.mark.parametrize('teacher_conv_mlp', [False, True])
def test_convnext_tiny_to_femto_every_key(student_name, kwargs, teacher_conv_mlp):
    teacher = make('convnext_tiny', conv_mlp=teacher_conv_mlp)
    student = make(student_name, **kwargs)
    sd, report = ws.select_weights(teacher, student)
    t_sd = teacher.state_dict()
    for key, value in student.state_dict().items():
        if key.startswith('head.fc.'):
            assert report[key]['action'] == 'skipped'
            continue
        t = t_sd[key]  # first-N per stage: student block i <- teacher block i, same name
        if t.ndim == 2 and value.ndim == 4:
            t = t[:, :, None, None]
        elif t.ndim == 4 and value.ndim == 2:
            t = t[:, :, 0, 0]
        expected = _halve_dims(t, tuple(value.shape))
        assert torch.equal(sd[key], expected), key
    student.load_state_dict(sd)
    # both MLP forms compute the same function from the same selection
    if student_name == 'convnext_femto' and not kwargs:
        other = make('convnext_femto_linear')
        other.load_state_dict(ws.select_weights(teacher, other)[0])
        x = torch.randn(2, 3, 64, 64)
        torch.testing.assert_close(student.forward_features(x), other.forward_features(x), atol=1e-4, rtol=1e-4)


def encode_teacher(teacher):
    """A teacher whose 1-D tensors of the embedding width hold their own index: the student's values
    reveal which indices each tensor kept."""
    sd = teacher.state_dict()
    for k, v in sd.items():
        if v.ndim == 1 and v.shape[0] == 384:
            v.copy_(torch.arange(384.))
    return teacher


@pytest.mark.parametrize('mode,consistent', [('uniform', True), ('consecutive', True), ('random', True),
                                             ('l1_consistent', True), ('random_inconsistent', False)])
def test_consistency_property(mode, consistent):
    teacher = encode_teacher(make('vit_small_patch16_224', img_size=32, patch_size=8))
    student = make('vit_tiny_patch16_224', img_size=32, patch_size=8)
    sd, _ = ws.select_weights(teacher, student, element_selection=mode, seed=1)
    sets = {k: tuple(v.long().tolist()) for k, v in sd.items()
            if v.ndim == 1 and v.shape[0] == 192 and not k.startswith('head')}
    assert len(sets) > 40
    distinct = set(sets.values())
    if consistent:
        assert len(distinct) == 1, mode
        (chosen,) = distinct
        assert list(chosen) == sorted(chosen)
        if mode == 'uniform':
            assert list(chosen) == list(range(0, 384, 2))
        if mode == 'consecutive':
            assert list(chosen) == list(range(192))
    else:
        assert len(distinct) > 40


def test_random_selection_depends_on_seed_only():
    teacher = make('vit_small_patch16_224', img_size=32, patch_size=8)
    student = make('vit_tiny_patch16_224', img_size=32, patch_size=8)
    a = ws.select_weights(teacher, student, element_selection='random', seed=1)[0]
    b = ws.select_weights(teacher, student, element_selection='random', seed=1)[0]
    c = ws.select_weights(teacher, student, element_selection='random', seed=2)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a['blocks.0.mlp.fc1.weight'], c['blocks.0.mlp.fc1.weight'])


@pytest.mark.parametrize('mode', ['uniform', 'random', 'consecutive'])
def test_qkv_pairing_non_divisible_width(mode):
    # 384 -> 240 is not divisible; q, k and v must each keep the width's index set.
    teacher = make('vit_small_patch16_224', img_size=32, patch_size=8)
    student = make('vit_tiny_patch16_224', img_size=32, patch_size=8, embed_dim=240, num_heads=4)
    with torch.no_grad():
        for k, v in teacher.state_dict().items():
            if k.endswith('qkv.bias'):
                v.copy_(torch.arange(1152.))
            elif k.endswith('proj.bias') or k.endswith('norm1.weight'):
                v.copy_(torch.arange(384.))
    sd, _ = ws.select_weights(teacher, student, element_selection=mode, seed=5)
    width_set = sd['blocks.0.norm1.weight'].long()
    qkv = sd['blocks.0.attn.qkv.bias'].long().reshape(3, 240)
    assert torch.equal(qkv[0], width_set)
    assert torch.equal(qkv[1], width_set + 384)
    assert torch.equal(qkv[2], width_set + 768)
    assert torch.equal(sd['blocks.0.attn.proj.bias'].long(), width_set)


def test_pos_embed_is_resampled_then_channel_selected():
    teacher = make('vit_small_patch16_224')                 # 14x14 grid + cls
    student = make('vit_tiny_patch16_224', img_size=112)     # 7x7 grid + cls
    sd, report = ws.select_weights(teacher, student)
    t_pos = teacher.pos_embed.detach()
    expected = resample_abs_pos_embed(t_pos, [7, 7], [14, 14], num_prefix_tokens=1)[..., ::2]
    torch.testing.assert_close(sd['pos_embed'], expected)
    assert report['pos_embed']['action'] == 'resampled'
    assert torch.equal(sd['pos_embed'][:, 0], t_pos[:, 0, ::2])  # the cls position is kept as is


def test_pos_embed_smooth_pattern_survives_resampling():
    teacher = make('vit_small_patch16_224')
    ramp = torch.linspace(-1, 1, 14)
    with torch.no_grad():  # channel 0 of the teacher grows along x
        teacher.pos_embed[0, 1:, 0] = ramp.repeat(14)
    student = make('vit_tiny_patch16_224', img_size=112)
    sd, _ = ws.select_weights(teacher, student)
    grid = sd['pos_embed'][0, 1:, 0].reshape(7, 7)
    assert (grid[:, 1:] > grid[:, :-1]).all()          # still increasing along x
    assert torch.allclose(grid[0], grid[6], atol=1e-5)  # and constant along y


def test_exclude_components_keep_student_init():
    teacher, student = make('vit_small_patch16_224', img_size=32, patch_size=8), \
        make('vit_tiny_patch16_224', img_size=32, patch_size=8)
    own = {k: v.clone() for k, v in student.state_dict().items()}
    sd, report = ws.select_weights(teacher, student, exclude=['attn', 'pos_embed', 'norm'])
    for k in sd:
        excluded = '.attn.' in k or k == 'pos_embed' or 'norm' in k
        assert (report[k]['action'] == 'excluded') == excluded, k
        if excluded:
            assert torch.equal(sd[k], own[k])
    assert report['blocks.0.mlp.fc1.weight']['action'] == 'selected'
    with pytest.raises(UserError, match="unknown component to exclude 'mpl'"):
        ws.select_weights(teacher, student, exclude=['mpl'])


def test_identity_when_widths_match_reproduces_truncated_teacher():
    teacher = make('vit_small_patch16_224', img_size=32, patch_size=8)
    student = make('vit_small_patch16_224', img_size=32, patch_size=8, depth=6)
    sd, report = ws.select_weights(teacher, student)
    student.load_state_dict(sd)
    assert all(e['action'] in ('copied', 'skipped') for e in report.values())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        t = teacher.patch_embed(x)
        t = teacher._pos_embed(t)
        t = teacher.norm_pre(t)
        for block in teacher.blocks[:6]:
            t = block(t)
        t = teacher.norm(t)
        torch.testing.assert_close(student.forward_features(x), t)


def test_keep_head():
    teacher = make('vit_small_patch16_224', img_size=32, patch_size=8, num_classes=10)
    student = make('vit_tiny_patch16_224', img_size=32, patch_size=8, num_classes=10)
    sd, report = ws.select_weights(teacher, student, keep_head=True)
    assert report['head.weight']['action'] == 'selected'
    assert torch.equal(sd['head.weight'], teacher.head.weight.detach()[:, ::2])
    with pytest.raises(UserError, match='--num_classes 10'):
        ws.select_weights(teacher, make('vit_tiny_patch16_224', img_size=32, patch_size=8, num_classes=5),
                          keep_head=True)


def test_state_dicts_work_like_models():
    teacher, student = make('vit_small_patch16_224'), make('vit_tiny_patch16_224', img_size=112)
    a, _ = ws.select_weights(teacher, student)
    b, _ = ws.select_weights(teacher.state_dict(), student.state_dict())
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_register_tokens_and_layer_scale():
    teacher = make('vit_small_patch14_reg4_dinov2', img_size=56)
    student = make('vit_tiny_patch14_dinov2', img_size=28, reg_tokens=4, no_embed_class=True)
    sd, report = ws.select_weights(teacher, student)
    assert torch.equal(sd['reg_token'], teacher.reg_token.detach()[..., ::2])
    assert torch.equal(sd['blocks.3.ls1.gamma'], teacher.blocks[3].ls1.gamma.detach()[::2])
    assert report['pos_embed']['action'] == 'resampled'
    student.load_state_dict(sd)


@pytest.mark.parametrize('img_size,patch_size', [(32, 8), (128, 32)])
def test_patch_embed_of_another_patch_size_is_resampled_then_channel_selected(img_size, patch_size):
    """A student of another patch size on the same 4x4 grid gets timm's FlexiViT resampling of the teacher's
    patch kernels, then the evenly spaced half of their output channels; the report says 'resampled'."""
    teacher = make('vit_small_patch16_224', img_size=64, depth=2)                # 16x16 patches
    student = make('vit_tiny_patch16_224', img_size=img_size, patch_size=patch_size, depth=2)
    sd, report = ws.select_weights(teacher, student)
    w = teacher.patch_embed.proj.weight.detach()
    expected = resample_patch_embed(w, [patch_size, patch_size])[::2]
    assert expected.shape == (192, 3, patch_size, patch_size)
    torch.testing.assert_close(sd['patch_embed.proj.weight'], expected)
    assert report['patch_embed.proj.weight']['action'] == 'resampled'
    assert torch.equal(sd['patch_embed.proj.bias'], teacher.patch_embed.proj.bias.detach()[::2])
    assert report['patch_embed.proj.bias']['action'] == 'selected'
    student.load_state_dict(sd)


@pytest.mark.parametrize('reg_tokens', [1, 2, 3])
def test_fewer_register_tokens_keep_the_first_ones(reg_tokens):
    """A student with fewer registers than its teacher (4) keeps the teacher's first registers, not evenly
    spaced ones, each with the evenly spaced half of the channels."""
    teacher = make('vit_small_patch14_reg4_dinov2', img_size=28, depth=2)
    student = make('vit_tiny_patch14_dinov2', img_size=28, depth=2, reg_tokens=reg_tokens, no_embed_class=True)
    sd, report = ws.select_weights(teacher, student)
    assert torch.equal(sd['reg_token'], teacher.reg_token.detach()[:, :reg_tokens, ::2])
    assert report['reg_token']['action'] == 'selected'
    student.load_state_dict(sd)


@pytest.mark.parametrize('img_size', [32, 64])
def test_no_embed_class_student_drops_the_teachers_class_position(img_size):
    """A student whose class token has no position (no_embed_class) takes the teacher's grid positions only: the
    class position (token 0) is dropped, the grid resampled when it differs (4x4 -> 8x8), channels halved."""
    teacher = make('vit_small_patch16_224', img_size=32, patch_size=8, depth=2)          # 4x4 grid + cls
    student = make('vit_tiny_patch16_224', img_size=img_size, patch_size=8, depth=2, no_embed_class=True)
    sd, report = ws.select_weights(teacher, student)
    t_pos = teacher.pos_embed.detach()
    side = img_size // 8
    if side != 4:
        t_pos = resample_abs_pos_embed(t_pos, [side, side], [4, 4], num_prefix_tokens=1)
    expected = t_pos[:, 1:, ::2]
    assert expected.shape == (1, side * side, 192)
    torch.testing.assert_close(sd['pos_embed'], expected)
    assert report['pos_embed']['action'] == ('selected' if side == 4 else 'resampled')
    student.load_state_dict(sd)


def test_real_dinov2_teacher_to_vit_tiny_224():
    path = shared_path('teachers', 'dinov2_vits14_imgfocus_fp16.pt')
    state, layout = io.load_pretrained('vit_small_patch14_dinov2', path)
    assert layout.grid == (37, 37) and layout.pos_prefix_tokens == 1
    student = make('vit_tiny_patch14_dinov2', img_size=224, num_classes=10)
    sd, report = ws.select_weights(state, student, teacher_layout=layout)
    assert sd['pos_embed'].shape == (1, 257, 192) and report['pos_embed']['action'] == 'resampled'
    assert sd['blocks.0.attn.qkv.weight'].dtype == torch.float32
    student.load_state_dict(sd)
    with torch.no_grad():
        assert torch.isfinite(student(torch.randn(1, 3, 224, 224))).all()


@pytest.mark.slow
def test_selection_from_real_dinov2_is_not_a_random_init(tmp_path):
    """The real teacher's weights come through the whole path (foreign fp16 checkpoint, 37x37 grid resampled
    to 4x4, layer scale): the selected ViT-T/14's class token sorts real CIFAR-10 images by k-NN, where a
    random init's class token hardly depends on the image (chance). A check of the path, not evidence of
    features: raw pixels score as high (results/knn_probe_dinov2_cifar10_cpu.md).
    Measured at 56 px, 50 training and 20 test images per class: 27.5% against 9.5%."""
    import main
    make_imagefolder = shared_path('data', 'cifar10', 'make_imagefolder.py')
    teacher = shared_path('teachers', 'dinov2_vits14_imgfocus_fp16.pt')
    proc = run_script(make_imagefolder, str(tmp_path / 'c10'), '--per-class-train', '50', '--per-class-test', '20')
    assert proc.returncode == 0, proc.stderr
    ws.main(['--teacher', 'vit_small_patch14_dinov2', '--teacher_checkpoint', teacher, '--student',
             'vit_tiny_patch14_dinov2', '--student_kwargs', '{"img_size": 56}', '--output', str(tmp_path / 'ws.pth'),
             '--quiet'])
    probe = ['--model', 'vit_tiny_patch14_dinov2', '--input_size', '56', '--data_set', 'image_folder', '--data_path',
             str(tmp_path / 'c10'), '--device', 'cpu', '--num_workers', '0', '--knn_probe', '20']
    selected = main.main(probe + ['--initialize', str(tmp_path / 'ws.pth')])['knn_acc1']
    random_init = main.main(probe)['knn_acc1']
    assert selected > random_init + 10, (selected, random_init)


# ---------------------------------------------------------------------------------------------- CLI

@pytest.fixture(scope='module')
def teacher_file(tmp_path_factory):
    path = tmp_path_factory.mktemp('teacher') / 'vit_s.pth'
    torch.save({'model': make('vit_small_patch16_224', img_size=32, patch_size=8).state_dict()}, path)
    return str(path)


SMALL = ['--teacher_kwargs', '{"img_size": 32, "patch_size": 8}']
SMALL_STUDENT = ['--student', 'vit_tiny_patch16_224', '--student_kwargs', '{"img_size": 32, "patch_size": 8}']


@pytest.mark.slow
def test_cli_writes_selection_with_meta(tmp_path, teacher_file):
    out = tmp_path / 'ws.pth'
    proc = run_script('weight_selection.py', '--teacher', 'vit_small_patch16_224', '--teacher_checkpoint',
                      teacher_file, *SMALL, *SMALL_STUDENT, '--num_classes', '10', '--element_selection',
                      'random', '--seed', '3', '--exclude', 'norm', '--output', str(out))
    assert proc.returncode == 0, proc.stderr
    assert 'inherited' in proc.stdout and 'wrote' in proc.stdout
    ckpt = torch.load(out, weights_only=True)
    meta = ckpt['meta']
    assert meta['element_selection'] == 'random' and meta['seed'] == 3 and meta['exclude'] == ['norm']
    assert len(meta['teacher_checkpoint_sha256']) == 64
    assert meta['report']['blocks.0.norm1.weight']['action'] == 'excluded'
    assert meta['versions']['timm'] == timm.__version__
    student = make('vit_tiny_patch16_224', img_size=32, patch_size=8, num_classes=10)
    student.load_state_dict(ckpt['model'])


@pytest.mark.slow
def test_cli_official_interface(tmp_path, teacher_file):
    proc = run_script('weight_selection.py', '--model_type', 'vit', '--pretrained_model', 'vit_small_patch16_224',
                      '--teacher_checkpoint', teacher_file, *SMALL, '--student_kwargs',
                      '{"img_size": 32, "patch_size": 8}', '--output_dir', str(tmp_path / 'out'))
    assert proc.returncode == 0, proc.stderr
    assert os.path.isfile(tmp_path / 'out' / 'vit.pth')


@pytest.mark.parametrize('args,needles', [
    (['--teacher', 'vit_smal_patch16_224'], ['unknown model', 'vit_smal_patch16_224']),
    (['--student', 'not_a_model'], ['unknown model', 'not_a_model']),
    (['--teacher_checkpoint', 'missing.pth'], ['not found', 'missing.pth']),
    (['--teacher_checkpoint', 'TRUNCATED'], ['cannot read checkpoint']),
    (['--teacher_checkpoint', 'CONVNEXT'], ['does not fit', 'missing cls_token']),
    (['--student', 'convnext_femto', '--student_kwargs', '{}'], ["student key 'stem.0.weight'", 'same model family']),
    (['--student', 'vit_base_patch16_224'], ['larger than the teacher', '768 > 384']),
    (['--student_kwargs', '{"img_size": 32, "patch_size": 8, "depth": 14}'], ['14 blocks where the teacher has 12']),
    (['--student_kwargs', '{img_size: 32}'], ['--student_kwargs is not valid JSON']),
    (['--element_selection', 'median'], ['invalid choice', 'median']),
    (['--layer_selection', 'middle'], ["unknown layer selection 'middle'"]),
    (['--exclude', 'mpl'], ["unknown component to exclude 'mpl'"]),
    (['--output', '/nonexistent_dir/ws.pth'], ['does not exist']),
    (['--teacher_checkpoint', None], ['--teacher_checkpoint']),
    (['--num_classes', '-5'], ['--num_classes -5: give the number of classes']),  # timm made it headless
])
def test_cli_bad_input(tmp_path, teacher_file, capsys, args, needles):
    base = {'--teacher': 'vit_small_patch16_224', '--teacher_checkpoint': teacher_file,
            '--student': 'vit_tiny_patch16_224', '--student_kwargs': '{"img_size": 32, "patch_size": 8}',
            '--output': str(tmp_path / 'ws.pth')}
    special = {'TRUNCATED': tmp_path / 't.pth', 'CONVNEXT': tmp_path / 'c.pth'}
    with open(teacher_file, 'rb') as f:
        special['TRUNCATED'].write_bytes(f.read()[:5000])
    torch.save(make('convnext_atto').state_dict(), special['CONVNEXT'])
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = str(special.get(value, value)) if value is not None else None
    argv = list(SMALL)
    for flag, value in base.items():
        if value is not None:
            argv += [flag, value]
    expect_cli_error(ws.main, argv, capsys, *needles)
    assert not os.path.exists(tmp_path / 'ws.pth')
    assert not [p for p in os.listdir(tmp_path) if p.startswith('.tmp')]


@pytest.mark.slow
def test_cli_error_is_one_line_without_traceback(tmp_path):
    """The catalogue above runs in process; this is the real command line: one line, exit 1, no file."""
    proc = run_script('weight_selection.py', '--teacher', 'vit_small_patch16_224', '--teacher_checkpoint',
                      str(tmp_path / 'missing.pth'), '--student', 'vit_tiny_patch16_224', '--output', str(tmp_path / 'o.pth'))
    assert proc.returncode == 1
    assert_clean_failure(proc, 'checkpoint not found')
    assert not os.path.exists(tmp_path / 'o.pth')
