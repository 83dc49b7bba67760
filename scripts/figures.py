"""The paper's figures as PNG files (needs matplotlib: pip install -r requirements-figures.txt).

    python scripts/figures.py curves RUN_DIR [RUN_DIR ...] --out fig3.png         # Figure 3: test acc@1 and loss per epoch
    python scripts/figures.py budget RUN_DIR [RUN_DIR ...] --out fig4a.png        # Figure 4a: final acc@1 against epochs
    python scripts/figures.py pretraining RUN_DIR [RUN_DIR ...] --out fig4b.png   # Figure 4b: against pretraining epochs
    python scripts/figures.py attention --teacher vit_small_patch16_224.augreg_in21k [--teacher_checkpoint F] \\
        --selection ws.pth --student vit_tiny_patch16_224 --out fig5.png          # Figure 5: W_q W_k^T and W_v W_proj

Run folders are main.py's --output_dir (log.txt, config.yaml). A run is labelled by what it started from, as
its config says: "weight selection" (--initialize), "pretraining + fine-tuning" (--initialize of a main.py run's
checkpoint), "random init" or "<init> init", with "+ <mode> distillation" (or pass --labels). budget and
pretraining plot the mean over the runs of a point (seeds) and leave out, with a note, a run that did not finish.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import utils  # noqa: E402


def _plt():
    try:
        import matplotlib
    except ImportError:
        print('error: figures need matplotlib: pip install -r requirements-figures.txt', file=sys.stderr)
        sys.exit(1)
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def read_run(folder):
    import yaml
    log_path = os.path.join(folder, 'log.txt')
    if not os.path.isfile(log_path):
        print(f'error: {folder} has no log.txt; pass main.py output folders', file=sys.stderr)
        sys.exit(1)
    try:
        log = utils.read_jsonl(log_path, 'pass main.py output folders (or fix that line)')
    except utils.UserError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(1)
    config = {}
    if os.path.isfile(os.path.join(folder, 'config.yaml')):
        with open(os.path.join(folder, 'config.yaml')) as f:
            config = yaml.safe_load(f) or {}
    return log, config


def check_format(out):
    """A file name whose extension matplotlib writes (or none: a PNG), checked before any figure is drawn."""
    ext = os.path.splitext(out)[1][1:].lower()
    if not ext:
        return
    _plt()
    from matplotlib.backend_bases import FigureCanvasBase
    formats = FigureCanvasBase.get_supported_filetypes()
    if ext not in formats:
        print(f'error: --out {out}: matplotlib cannot write .{ext} files; give one of .{", .".join(sorted(formats))} '
              f'(e.g. fig3.png)', file=sys.stderr)
        sys.exit(1)


def label_of(config, folder):
    """What a run started from, as its config.yaml says: a pretraining run's checkpoint (Figure 4b), a selection,
    or an init (timm's default: random init); distillation added. The folder's name without a config.yaml."""
    if not config:
        return os.path.basename(folder)
    if config.get('initialize'):
        start = 'pretraining + fine-tuning' if pretraining_epochs(config, folder) is not None else 'weight selection'
    else:
        start = 'random init' if config.get('init', 'timm') == 'timm' else f"{config['init']} init"
    return start + (f" + {config['distill']} distillation" if config.get('distill', 'none') != 'none' else '')


def finished(folder, log, config):
    """Whether the run logged every epoch it set out to train; a note on stderr where not (it is left out: its last
    record is not the final accuracy it would have reached)."""
    epochs = {r.get('epoch') for r in log}
    if isinstance(config.get('epochs'), int) and len(epochs) < config['epochs']:
        print(f'note: left out {folder}: unfinished ({len(epochs)} of {config["epochs"]} epochs logged)',
              file=sys.stderr)
        return False
    return True


def plot_curves(runs, labels, out):
    plt = _plt()
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    for folder, label in zip(runs, labels):
        log, config = read_run(folder)
        label = label or label_of(config, folder)
        evaluated = [r for r in log if 'test_acc1' in r]  # every epoch, or every --eval_freq-th and the last
        marker = 'o' if len(log) == 1 else None  # a one-epoch run is a point, which a line alone does not draw
        ax_acc.plot([r['epoch'] for r in evaluated], [r['test_acc1'] for r in evaluated], label=label, marker=marker)
        ax_loss.plot([r['epoch'] for r in log], [r['train_loss'] for r in log], label=label, marker=marker)
    ax_acc.set(xlabel='epoch', ylabel='test acc@1 (%)')
    ax_loss.set(xlabel='epoch', ylabel='train loss')
    ax_acc.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def mean_points(points):
    """(x, mean y, std y) per x of (x, y) points, in x order: the seeds of one budget are one point, not a zigzag."""
    import statistics
    by_x = {}
    for x, y in points:
        by_x.setdefault(x, []).append(y)
    return [(x, statistics.mean(ys), statistics.stdev(ys) if len(ys) > 1 else 0.0) for x, ys in sorted(by_x.items())]


def plot_budget(runs, labels, out):
    """Final acc@1 against training epochs, per label: the mean over the runs (seeds) of each budget, their std
    as error bars."""
    plt = _plt()
    groups = {}
    for folder, label in zip(runs, labels):
        log, config = read_run(folder)
        if finished(folder, log, config):
            groups.setdefault(label or label_of(config, folder), []).append(
                (config.get('epochs', len(log)), log[-1].get('test_acc1')))
    fig, ax = plt.subplots(figsize=(5, 4))
    for label, points in groups.items():
        x, y, std = zip(*mean_points(points))
        ax.errorbar(x, y, yerr=std, marker='o', capsize=3, label=label)
    ax.set(xlabel='training epochs', ylabel='final test acc@1 (%)')
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def pretraining_epochs(config, folder):
    """The epochs of the main.py run whose checkpoint --initialize names (Figure 4b's pretraining), or None
    where it names none (a selection, or no --initialize). A relative --initialize is read from the folder the
    run started in (its run_info.json's cwd), not from where this script runs."""
    import yaml
    initialize = config.get('initialize')
    if not initialize:
        return None
    try:
        with open(os.path.join(folder, 'run_info.json')) as f:
            started_in = json.load(f).get('cwd', '')
    except (OSError, ValueError, AttributeError):
        started_in = ''
    source = os.path.join(os.path.dirname(os.path.join(started_in, initialize)), 'config.yaml')
    if not os.path.isfile(source):
        return None
    with open(source) as f:
        return (yaml.safe_load(f) or {}).get('epochs')


def plot_pretraining(runs, labels, out):
    """Final acc@1 of the runs initialized from a pretraining run's checkpoint, against that run's epochs; the
    other runs (random init, weight selection) as horizontal lines."""
    plt = _plt()
    points, lines = [], {}
    for folder, label in zip(runs, labels):
        log, config = read_run(folder)
        if not finished(folder, log, config):
            continue
        epochs, final = pretraining_epochs(config, folder), log[-1].get('test_acc1')
        if epochs is None:
            lines.setdefault(label or label_of(config, folder), []).append(final)
        else:
            points.append((epochs, final))
    fig, ax = plt.subplots(figsize=(5, 4))
    if points:
        x, y, std = zip(*mean_points(points))
        ax.errorbar(x, y, yerr=std, marker='o', capsize=3, label='pretraining + fine-tuning')
    styles = ('--', ':', '-.')
    for i, (label, finals) in enumerate(lines.items()):  # the mean over seeds; every line drawn, styles repeating
        ax.axhline(sum(finals) / len(finals), linestyle=styles[i % len(styles)], color=f'C{i + 1}', label=label)
    ax.set(xlabel='pretraining epochs', ylabel='final test acc@1 (%)')
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def vit_heads(model, what):
    """The attention heads of a timm ViT (fused qkv), the figure's subject; one line for another model."""
    from utils import UserError
    blocks = getattr(model, 'blocks', None)
    if not blocks or not hasattr(blocks[0], 'attn') or not hasattr(blocks[0].attn, 'qkv'):
        raise UserError(f'{what} is a {type(model).__name__}: the attention figure needs a timm ViT (blocks with a '
                        f'fused attn.qkv)')
    return blocks[0].attn.num_heads, len(blocks)


def attention_products(state, block, head, num_heads, what='the state'):
    """W_q,h^T W_k,h and (W_proj,h W_v,h)^T of one head: the bilinear forms of the attention logits
    and of the value path, both d x d."""
    from utils import UserError
    missing = [k for k in (f'blocks.{block}.attn.qkv.weight', f'blocks.{block}.attn.proj.weight') if k not in state]
    if missing:
        raise UserError(f'{what} has no {missing[0]}: the attention figure needs a timm ViT, and --block within '
                        f'its depth')
    w = state[f'blocks.{block}.attn.qkv.weight'].float()
    d = w.shape[1]
    k = d // num_heads
    q, kk, v = w.view(3, num_heads, k, d)[:, head]
    proj = state[f'blocks.{block}.attn.proj.weight'].float()[:, head * k:(head + 1) * k]
    return (q.T @ kk).numpy(), (proj @ v).T.numpy()


def plot_attention(args):
    import torch
    import models  # noqa: F401
    from models import io
    plt = _plt()
    teacher_kwargs = utils.parse_json_dict(args.teacher_kwargs, '--teacher_kwargs')
    teacher_state, _ = io.load_pretrained(args.teacher, args.teacher_checkpoint, teacher_kwargs,
                                          trust=args.trust_checkpoint)
    with torch.device('meta'):  # its structure only: the number of heads
        teacher_heads, _ = vit_heads(io.create_model(args.teacher, '--teacher', **teacher_kwargs),
                                     f'--teacher {args.teacher}')
    torch.manual_seed(0)
    student = io.create_model(args.student, '--student',
                              **utils.parse_json_dict(args.student_kwargs, '--student_kwargs'))
    student_heads, depth = vit_heads(student, f'--student {args.student}')
    if not 0 <= args.block < depth or not 0 <= args.head < student_heads:
        raise utils.UserError(f'--block {args.block} --head {args.head}: the student has blocks 0..{depth - 1} and '
                              f'heads 0..{student_heads - 1}')
    selected = io.read_state_dict(args.selection, trust=args.trust_checkpoint)
    panels = [('random init', student.state_dict(), student_heads, '--student'),
              ('teacher', teacher_state, teacher_heads, '--teacher'),
              ('weight selection', selected, student_heads, f'--selection {args.selection}')]
    fig, axes = plt.subplots(2, 3, figsize=(11, 7))
    for col, (name, state, heads, what) in enumerate(panels):
        qk, vo = attention_products(state, args.block, args.head, heads, what)
        for row, (mat, title) in enumerate([(qk, 'W_q W_k^T'), (vo, 'W_v W_proj')]):
            lim = abs(mat).max()
            axes[row, col].imshow(mat, cmap='RdBu_r', vmin=-lim, vmax=lim)
            axes[row, col].set_title(f'{name}: {title}')
            axes[row, col].axis('off')
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)


def main(argv=None):
    from utils import str2bool
    p = utils.ArgumentParser(description=__doc__.split('\n\n')[0])
    sub = p.add_subparsers(dest='figure', required=True)
    for name in ('curves', 'budget', 'pretraining'):
        s = sub.add_parser(name)
        s.add_argument('runs', nargs='+')
        s.add_argument('--labels', nargs='*', default=None)
        s.add_argument('--out', required=True)
    s = sub.add_parser('attention')
    s.add_argument('--teacher', required=True)
    s.add_argument('--teacher_checkpoint', default=None)
    s.add_argument('--teacher_kwargs', default='')
    s.add_argument('--selection', required=True, help="weight_selection.py's output")
    s.add_argument('--student', required=True)
    s.add_argument('--trust_checkpoint', type=str2bool, default=False,
                   help='fully unpickle --selection / --teacher_checkpoint files that hold Python objects besides '
                        'tensors (can run code: only for files you trust)')
    s.add_argument('--student_kwargs', default='')
    s.add_argument('--block', default=0, type=int)
    s.add_argument('--head', default=0, type=int)
    s.add_argument('--out', required=True)
    args = p.parse_args(argv)
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        print(f'error: --out {args.out}: folder {folder} does not exist; create it or write elsewhere', file=sys.stderr)
        sys.exit(1)
    check_format(args.out)
    if args.figure == 'attention':
        utils.run_cli(lambda _: plot_attention(args))
    else:
        labels = args.labels or [None] * len(args.runs)
        if len(labels) != len(args.runs):
            print('error: give one --labels entry per run folder', file=sys.stderr)
            sys.exit(1)
        plot = {'curves': plot_curves, 'budget': plot_budget, 'pretraining': plot_pretraining}[args.figure]
        plot(args.runs, labels, args.out)
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
