"""Reproduction fidelity (issue 13): LARS, L1 pruning, exclusions by module type, selection without
consistency, best vs final reporting, fc_norm. Expected values are written out by hand."""
import pytest
import torch
import torch.nn as nn


# ---------------------------------------------------------------------------------------------- LARS

def _lars_step(opt, params, grads):
    for p, g in zip(params, grads):
        p.grad = torch.tensor(g)
    opt.step()


def test_lars_trust_ratio_with_zero_weight_decay_and_momentum():
    from lars import Lars
    w = nn.Parameter(torch.tensor([[3., 4.]]))   # ||w|| = 5
    opt = Lars([w], lr=1.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001)
    # step 1: ||g|| = 1, ratio 0.001 * 5 / 1 = 0.005 -> update (0.003, 0.004); mu = update
    _lars_step(opt, [w], [[[0.6, 0.8]]])
    torch.testing.assert_close(w.detach(), torch.tensor([[2.997, 3.996]]), rtol=0, atol=1e-7)
    # step 2: ||w|| = 4.995, ratio 0.004995 -> update (0.002997, 0.003996);
    # mu = 0.9 * (0.003, 0.004) + update = (0.005697, 0.007596)
    _lars_step(opt, [w], [[[0.6, 0.8]]])
    torch.testing.assert_close(w.detach(), torch.tensor([[2.991303, 3.988404]]), rtol=0, atol=1e-6)


def test_lars_weight_decay_enters_before_the_trust_ratio():
    from lars import Lars
    w = nn.Parameter(torch.tensor([[3., 4.]]))
    opt = Lars([w], lr=1.0, weight_decay=0.1, momentum=0.9)
    # g + 0.1 w = (0.3 + 0.3, 0.4 + 0.4) = (0.6, 0.8): norm 1, ratio 0.005
    _lars_step(opt, [w], [[[0.3, 0.4]]])
    torch.testing.assert_close(w.detach(), torch.tensor([[2.997, 3.996]]), rtol=0, atol=1e-7)


def test_lars_biases_skip_trust_ratio_and_weight_decay():
    from lars import Lars
    b = nn.Parameter(torch.tensor([2., -1.]))
    opt = Lars([b], lr=1.0, weight_decay=0.1, momentum=0.9)
    _lars_step(opt, [b], [[0.5, 0.5]])   # plain momentum SGD: b - 1.0 * g
    torch.testing.assert_close(b.detach(), torch.tensor([1.5, -1.5]))
    _lars_step(opt, [b], [[0.5, 0.5]])   # mu = 0.9 * 0.5 + 0.5 = 0.95
    torch.testing.assert_close(b.detach(), torch.tensor([0.55, -2.45]))


def test_lars_zero_weight_is_not_frozen_and_create_lars_takes_a_model():
    from lars import create_lars
    lin = nn.Linear(2, 1)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()
    lin.bias.requires_grad_(False)
    opt = create_lars(lin, lr=0.5, weight_decay=0.0, momentum=0.9)
    assert [p for g in opt.param_groups for p in g['params']] == [lin.weight]
    _lars_step(opt, [lin.weight], [[[1., -2.]]])   # ||w|| = 0: ratio 1, w = -0.5 g
    torch.testing.assert_close(lin.weight.detach(), torch.tensor([[-0.5, 1.0]]))


# ---------------------------------------------------------------------------------------------- helpers

def tiny_vit(embed_dim, **kwargs):
    import timm
    torch.manual_seed(0)
    kwargs = {'img_size': 8, 'patch_size': 4, 'depth': 1, 'num_heads': 2, 'num_classes': 3, **kwargs}
    return timm.create_model('vit_tiny_patch16_224', pretrained=False, embed_dim=embed_dim, **kwargs).eval()


def zeros_like_shapes(shapes):
    return {k: torch.zeros(shape) for k, shape in shapes.items()}


# ---------------------------------------------------------------------------------------------- l1 pruning

def l1_teacher():
    """A hand-made teacher: a Linear 4x3 with bias, a norm of width 4, a fused qkv of width 4 (input 2)."""
    return {
        # row L1 norms 1, 5, 4, 0.5 -> rows 1, 2; column L1 norms 3, 7, 0.5 -> columns 0, 1
        'lin.weight': torch.tensor([[1., 0., 0.], [0., -5., 0.], [2., 2., 0.], [0., 0., 0.5]]),
        # on its own it would keep 0, 3 (|9|, |8|); it must keep its weight's rows 1, 2
        'lin.bias': torch.tensor([9., 0.1, 0.2, 8.]),
        # |w| = 3, 0.1, 0.5, 2 -> 0, 3 (another set than lin's rows of the same width)
        'norm.weight': torch.tensor([-3., 0.1, 0.5, 2.]),
        'norm.bias': torch.tensor([0.01, 7., 6., 0.02]),
        # q rows' L1 1, 4, 3, 2 -> 1, 2; k 5, 1.5, 2, 6 -> 0, 3; v 1.1, 2.1, 3.1, 4.1 -> 2, 3
        'blocks.0.attn.qkv.weight': torch.tensor([[a, 0.] for a in
                                                  (1., 4., 3., 2., 5., 1.5, 2., 6., 1.1, 2.1, 3.1, 4.1)]),
        'blocks.0.attn.qkv.bias': 100 + torch.arange(12.),
    }


L1_STUDENT = {'lin.weight': (2, 2), 'lin.bias': (2,), 'norm.weight': (2,), 'norm.bias': (2,),
              'blocks.0.attn.qkv.weight': (6, 2), 'blocks.0.attn.qkv.bias': (6,)}


def test_l1_pruning_ranks_each_tensor_and_keeps_bias_with_its_neurons():
    import weight_selection as ws
    sd, _ = ws.select_weights(l1_teacher(), zeros_like_shapes(L1_STUDENT), element_selection='l1')
    assert sd['lin.weight'].tolist() == [[0., -5.], [2., 2.]]            # rows 1, 2; columns 0, 1
    assert sd['lin.bias'].tolist() == pytest.approx([0.1, 0.2])          # rows 1, 2
    assert sd['norm.weight'].tolist() == [-3., 2.]                       # 0, 3
    assert sd['norm.bias'].tolist() == pytest.approx([0.01, 0.02])       # 0, 3
    assert sd['blocks.0.attn.qkv.weight'][:, 0].tolist() == pytest.approx([4., 3., 5., 6., 3.1, 4.1])
    # q rows 1, 2 -> 101, 102; k rows 0, 3 -> 104, 107; v rows 2, 3 -> 110, 111
    assert sd['blocks.0.attn.qkv.bias'].tolist() == [101., 102., 104., 107., 110., 111.]


def test_l1_consistent_keeps_one_ranking_per_embedding_width():
    import weight_selection as ws
    # summed L1 per index of width 4 over every tensor: lin rows (1, 5, 4, 0.5) + lin.bias (9, .1, .2, 8)
    # + norm.weight (3, .1, .5, 2) + norm.bias (.01, 7, 6, .02) + q+k+v rows (7.1, 7.6, 8.1, 12.1)
    # + q+k+v biases (312, 315, 318, 321) = 332.11, 334.8, 336.8, 343.62 -> every width-4 dimension keeps 2, 3
    sd, _ = ws.select_weights(l1_teacher(), zeros_like_shapes(L1_STUDENT), element_selection='l1_consistent')
    assert sd['lin.bias'].tolist() == pytest.approx([0.2, 8.])
    assert sd['norm.weight'].tolist() == [0.5, 2.]
    assert sd['blocks.0.attn.qkv.bias'].tolist() == [102., 103., 106., 107., 110., 111.]
    args = ws.get_args_parser().parse_args(['--element_selection', 'l1_consistent'])
    assert args.element_selection == 'l1_consistent'


def test_l1_consistent_keeps_a_bias_with_its_weight_on_a_width_ranked_per_tensor():
    import weight_selection as ws
    # width 3 is no normalization's: ranked per tensor. fc1 rows' L1 1, 6, 5 -> rows 1, 2; the bias alone would
    # keep 0, 1 (|7|, |4|) and split the neurons; it keeps its weight's rows 1, 2
    teacher = {'norm.weight': torch.tensor([1., 3.]),
               'mlp.fc1.weight': torch.tensor([[1., 0.], [0., 6.], [2., 3.]]),
               'mlp.fc1.bias': torch.tensor([7., 4., 0.5])}
    student = zeros_like_shapes({'norm.weight': (2,), 'mlp.fc1.weight': (2, 2), 'mlp.fc1.bias': (2,)})
    sd, _ = ws.select_weights(teacher, student, element_selection='l1_consistent')
    assert sd['mlp.fc1.weight'].tolist() == [[0., 6.], [2., 3.]] and sd['mlp.fc1.bias'].tolist() == [4., 0.5]


def test_l1_bias_follows_teacher_weight_of_the_mapped_block():
    import weight_selection as ws
    # student block 0 <- teacher block 1 (last layer selection): the bias follows teacher block 1's weight
    teacher = {'blocks.0.fc.weight': torch.tensor([[5.], [0.], [0.], [4.]]), 'blocks.0.fc.bias': torch.zeros(4),
               'blocks.1.fc.weight': torch.tensor([[0.], [3.], [2.], [0.]]), 'blocks.1.fc.bias': torch.arange(4.)}
    student = zeros_like_shapes({'blocks.0.fc.weight': (2, 1), 'blocks.0.fc.bias': (2,)})
    sd, _ = ws.select_weights(teacher, student, layer_selection='last', element_selection='l1')
    assert sd['blocks.0.fc.bias'].tolist() == [1., 2.]


# ---------------------------------------------------------------------------------------------- random without consistency

def test_random_inconsistent_draws_fresh_sets_for_q_k_v_and_every_dimension():
    import weight_selection as ws
    teacher, student = tiny_vit(64), tiny_vit(32)
    with torch.no_grad():
        teacher.blocks[0].attn.qkv.bias.copy_(torch.arange(192.))
        teacher.blocks[0].attn.proj.weight.copy_(torch.arange(64.)[:, None] * 1000 + torch.arange(64.))
    sd, _ = ws.select_weights(teacher, student, element_selection='random_inconsistent', seed=0)
    q, k, v = sd['blocks.0.attn.qkv.bias'].long().reshape(3, 32).tolist()
    k, v = [i - 64 for i in k], [i - 128 for i in v]
    for chosen in (q, k, v):
        assert chosen == sorted(chosen) and len(set(chosen)) == 32 and 0 <= min(chosen) and max(chosen) < 64
    assert q != k and k != v and q != v
    proj = sd['blocks.0.attn.proj.weight']
    rows, cols = (proj[:, 0] // 1000).long().tolist(), (proj[0] % 1000).long().tolist()
    assert rows != cols


# ---------------------------------------------------------------------------------------------- --exclude by module type

def test_exclude_norm_finds_convnext_stem_and_downsample_layernorms():
    import timm
    import weight_selection as ws
    torch.manual_seed(1)
    teacher = timm.create_model('convnext_femto', pretrained=False)
    torch.manual_seed(0)
    student = timm.create_model('convnext_femto', pretrained=False)
    own = {k: v.clone() for k, v in student.state_dict().items()}
    # ConvNeXt-F: depths 2, 2, 6, 2; stage 0 has no downsample
    norms = ['stem.1', 'stages.1.downsample.0', 'stages.2.downsample.0', 'stages.3.downsample.0', 'head.norm']
    norms += [f'stages.{s}.blocks.{b}.norm' for s, depth in enumerate((2, 2, 6, 2)) for b in range(depth)]
    expected = {f'{m}.{p}' for m in norms for p in ('weight', 'bias')}
    sd, report = ws.select_weights(teacher, student, exclude=['norm'])
    excluded = {k for k, e in report.items() if e['action'] == 'excluded'}
    assert excluded == expected
    for k in expected:
        assert torch.equal(sd[k], own[k]), k
    assert torch.equal(sd['stages.1.downsample.1.weight'], teacher.stages[1].downsample[1].weight.detach())


def test_exclude_attn_mlp_by_type_and_bare_state_dicts_by_name():
    import weight_selection as ws
    teacher, student = tiny_vit(16), tiny_vit(8)
    sd, report = ws.select_weights(teacher, student, exclude=['attn', 'mlp'])
    excluded = {k for k, e in report.items() if e['action'] == 'excluded'}
    assert excluded == {'blocks.0.attn.qkv.weight', 'blocks.0.attn.qkv.bias', 'blocks.0.attn.proj.weight',
                        'blocks.0.attn.proj.bias', 'blocks.0.mlp.fc1.weight', 'blocks.0.mlp.fc1.bias',
                        'blocks.0.mlp.fc2.weight', 'blocks.0.mlp.fc2.bias'}
    # a bare state dict has no module types: the name rule ('norm' in a module name)
    _, report = ws.select_weights(teacher.state_dict(), student.state_dict(), exclude=['norm'])
    excluded = {k for k, e in report.items() if e['action'] == 'excluded'}
    assert excluded == {'blocks.0.norm1.weight', 'blocks.0.norm1.bias', 'blocks.0.norm2.weight',
                        'blocks.0.norm2.bias', 'norm.weight', 'norm.bias'}


# ---------------------------------------------------------------------------------------------- fc_norm

def test_avg_pool_student_takes_the_teachers_final_norm_as_fc_norm_and_back():
    import weight_selection as ws
    token_teacher = tiny_vit(16)
    with torch.no_grad():
        token_teacher.norm.weight.copy_(torch.arange(16.))
        token_teacher.norm.bias.copy_(-torch.arange(16.))
    avg_student = tiny_vit(8, global_pool='avg')
    assert 'fc_norm.weight' in avg_student.state_dict() and 'norm.weight' not in avg_student.state_dict()
    sd, report = ws.select_weights(token_teacher, avg_student)
    assert sd['fc_norm.weight'].tolist() == [0., 2., 4., 6., 8., 10., 12., 14.]
    assert sd['fc_norm.bias'].tolist() == [0., -2., -4., -6., -8., -10., -12., -14.]
    assert report['fc_norm.weight']['source'] == 'norm.weight'
    avg_student.load_state_dict(sd)

    avg_teacher = tiny_vit(16, global_pool='avg')
    with torch.no_grad():
        avg_teacher.fc_norm.weight.copy_(torch.arange(16.))
    token_student = tiny_vit(8)
    sd, report = ws.select_weights(avg_teacher, token_student)
    assert sd['norm.weight'].tolist() == [0., 2., 4., 6., 8., 10., 12., 14.]
    assert report['norm.weight']['source'] == 'fc_norm.weight'


# ---------------------------------------------------------------------------------------------- best vs final

def test_collect_results_reports_best_and_final_epoch(tmp_path):
    import json
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'scripts'))
    import collect_results
    run = tmp_path / 'runs' / 'table9' / 'weight_selection' / 'cifar100' / 'vit_tiny' / 'seed0'
    run.mkdir(parents=True)
    lines = [{'epoch': 0, 'train_loss': 4.0}, {'epoch': 0, 'test_acc1': 50.0}, {'epoch': 1, 'test_acc1': 62.5},
             {'epoch': 2, 'test_acc1': 60.0}]
    (run / 'log.txt').write_text(''.join(json.dumps(line) + '\n' for line in lines))
    (run / 'config.yaml').write_text('seed: 0\n')  # and a command without --config: main.py's defaults, kept
    (run / 'run_info.json').write_text(json.dumps({'command': ['main.py']}))
    collect_results.main([str(tmp_path / 'runs'), '--out', str(tmp_path / 'res')])
    md = (tmp_path / 'res' / 'tables.md').read_text()
    # Table 9 columns: convnext_femto (no runs; paper 23.6), vit_tiny (best epoch 1, final epoch 2; paper 28.2)
    assert '| weight_selection | - / - / 23.6 | 62.5 / 60.0 / 28.2 |' in md
    assert 'cifar100 vit_tiny (best / final / paper)' in md
    csv_lines = (tmp_path / 'res' / 'tables.csv').read_text().splitlines()
    assert csv_lines[0] == 'table,row,dataset,model,n,best_mean,best_std,best_median,final_mean,final_std,' \
                           'final_median,paper,departures_from_recipe'
    assert '9,weight_selection,cifar100,vit_tiny,1,62.50,,62.50,60.00,,60.00,28.2,' in csv_lines  # on recipe
