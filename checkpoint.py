"""Checkpoints of a training run: what they hold, saving with retention, and resuming (--resume, or
--auto_resume from the newest one in --output_dir).

Files in --output_dir (written atomically by the main process):
  checkpoint-<epoch>.pth            after an epoch; the last --save_ckpt_num are kept
  checkpoint-<epoch>-step<k>.pth    inside an epoch, after k optimizer steps (--save_every_steps)
  checkpoint-best.pth, checkpoint-best-ema.pth    weights only, of the best test acc@1
  log.txt                           a JSON line per epoch; a resumed run drops the lines it will redo
  config.yaml, run_info.json        the flags (reusable as --config), code version, versions, derived values
"""
import json
import math
import os
import re
import sys
from dataclasses import dataclass

import torch

import utils
from models.io import MODEL_ALIASES, UntrustedCheckpoint, check_fits, torch_load
from utils import UserError

CHECKPOINT_NAME = re.compile(r'^checkpoint-(\d+)(?:-step(\d+))?\.pth$')


@dataclass
class TrainState:
    """Everything a checkpoint restores besides the random states."""
    model: torch.nn.Module            # the plain model (no DDP or compile wrapper)
    optimizer: torch.optim.Optimizer
    scaler: object = None             # fp16 GradScaler
    model_ema: object = None          # timm ModelEmaV3
    projector: torch.nn.Module = None  # feature distillation's projector
    schedule: object = None           # recipe.StepSchedule: its settings are saved, and compared on resume

    def state_dict(self, args, epoch, best):
        # each process's random states (drop path, mixup, ...); 'rng' is rank 0's, as in a single process
        rng = utils.gather_from_ranks(utils.rng_state())
        state = {'model': self.model.state_dict(), 'optimizer': self.optimizer.state_dict(), 'epoch': epoch,
                 'args': plain_values(saved_run_args(args)), 'best': best, 'rng': rng[0], 'model_name': args.model}
        if len(rng) > 1:
            state['rng_per_rank'] = rng
        if self.schedule is not None:
            state['schedule'] = self.schedule.settings()
        for name in ('scaler', 'projector'):
            if getattr(self, name) is not None:
                state[name] = getattr(self, name).state_dict()
        if self.model_ema is not None:
            state['model_ema'] = self.model_ema.module.state_dict()
        return state

    def follow_with_ema(self, ckpt):
        """The EMA a checkpoint saved, or for one without (trained without --model_ema, weights only) an EMA
        restarted from the resumed weights: built before resuming, it would otherwise go on averaging the
        initial ones."""
        if 'model_ema' in ckpt:
            self.model_ema.module.load_state_dict(ckpt['model_ema'])
        else:
            self.model_ema.set(self.model)

    def load_state_dict(self, ckpt):
        self.optimizer.load_state_dict(ckpt['optimizer'])
        if self.scaler is not None and 'scaler' in ckpt:
            self.scaler.load_state_dict(ckpt['scaler'])
        if self.projector is not None and 'projector' in ckpt:
            self.projector.load_state_dict(ckpt['projector'])
        rng = own_share(ckpt, 'rng')
        if rng is not None:
            utils.set_rng_state(rng)


def own_share(ckpt, key):
    """This process's value of a per-process entry (its `<key>_per_rank`) when the checkpoint was written by as
    many processes as run now, else `ckpt[key]` (rank 0's; with another process count the run is not exact)."""
    shares = ckpt.get(key + '_per_rank')
    if shares is not None and len(shares) == utils.world_size():
        return shares[utils.rank()]
    if shares is not None and key == 'rng':
        utils.print_main(f'note: the checkpoint was written by {len(shares)} processes, this run has '
                         f'{utils.world_size()}: each starts from rank 0\'s random state, so the resumed run is not '
                         f'bit-exact')
    return ckpt.get(key)


def plain_values(value):
    """Flag values as str/int/float/bool/None, lists and dicts of them: what torch.load's weights_only=True
    unpickles (any other object, e.g. a TorchVersion, would make the whole checkpoint need a full unpickle)."""
    if isinstance(value, dict):
        return {str(k): plain_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_values(v) for v in value]
    if value is None or type(value) in (str, int, float, bool):
        return value
    return str(value)


@dataclass
class Resumed:
    start_epoch: int = 0
    best: dict = None          # {'acc1', 'epoch', 'ema_acc1'} so far
    step_in_epoch: int = 0     # optimizer steps of start_epoch already done (a mid-epoch checkpoint)
    partial: dict = None       # the engine's running sums of that epoch
    path: str = None           # the checkpoint it resumed from


# ----------------------------------------------------------------------------------------------
# Saving.

def save_epoch(args, epoch, record, best, train_state):
    """Checkpoints after an epoch: the last K epochs, plus the best (and best EMA) by test acc@1.
    Returns the updated best-so-far record."""
    if not (args.output_dir and args.save_ckpt):
        return best
    acc = record.get('test_acc1')
    best = dict(best)
    improved = acc is not None and acc > best.get('acc1', -1.0)
    if improved:
        best.update(acc1=acc, epoch=epoch)
    if (epoch + 1) % args.save_ckpt_freq == 0 or epoch + 1 == args.epochs:
        save_checkpoint(args.output_dir, f'checkpoint-{epoch}.pth', train_state.state_dict(args, epoch, best),
                        keep_last=args.save_ckpt_num)
    if improved:
        save_checkpoint(args.output_dir, 'checkpoint-best.pth', {'model': train_state.model.state_dict(),
                                                                 'epoch': epoch, 'acc1': acc, 'model_name': args.model,
                                                                 'args': plain_values(vars(args))})
    ema_acc = record.get('test_acc1_ema')
    if ema_acc is not None and ema_acc > best.get('ema_acc1', -1.0):
        best['ema_acc1'] = ema_acc
        save_checkpoint(args.output_dir, 'checkpoint-best-ema.pth',
                        {'model': train_state.model_ema.module.state_dict(), 'epoch': epoch, 'acc1': ema_acc,
                         'model_name': args.model, 'args': plain_values(vars(args))})
    return best


def save_mid_epoch(args, epoch, step_in_epoch, partial, best, train_state, layout=None):
    """checkpoint-<epoch>-step<k>.pth: enough to finish the epoch exactly as an uninterrupted run would.
    `layout`: {'world_size', 'batch_size', 'update_freq'} of this run, in which `partial` counts its batches."""
    state = train_state.state_dict(args, epoch, best)
    partials = utils.gather_from_ranks(partial)  # each process's running loss sum (all-reduced at the epoch's end)
    state.update(step_in_epoch=step_in_epoch, partial=partials[0], layout=layout)
    if len(partials) > 1:
        state['partial_per_rank'] = partials
    save_checkpoint(args.output_dir, f'checkpoint-{epoch}-step{step_in_epoch}.pth', state,
                    keep_last=args.save_ckpt_num)


def list_checkpoints(output_dir):
    """Resumable checkpoints in output_dir, oldest first: checkpoint-<epoch>.pth (the epoch complete) and
    checkpoint-<epoch>-step<k>.pth (k optimizer steps of that epoch done)."""
    if not output_dir or not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = CHECKPOINT_NAME.match(name)
        if m:
            progress = (int(m[1]), int(m[2]) if m[2] else math.inf)
            found.append((progress, os.path.join(output_dir, name)))
    return [path for _, path in sorted(found)]


def save_checkpoint(output_dir, name, state, keep_last=None):
    """Write output_dir/name atomically (main process only); keep the newest `keep_last` resumable ones."""
    if not utils.is_main_process():
        return
    utils.atomic_save(state, os.path.join(output_dir, name))
    if keep_last:
        for path in list_checkpoints(output_dir)[:-keep_last]:
            os.remove(path)


def remove_stale_temporaries(output_dir):
    """Half-written files of a run killed while saving (atomic_save's temporaries)."""
    if output_dir and os.path.isdir(output_dir) and utils.is_main_process():
        for name in os.listdir(output_dir):
            if name.startswith('.tmp-'):
                os.remove(os.path.join(output_dir, name))


def append_log(output_dir, record):
    if output_dir and utils.is_main_process():
        with open(os.path.join(output_dir, 'log.txt'), 'a') as f:
            f.write(json.dumps(record) + '\n')


def truncate_log(output_dir, first_epoch):
    """Drop log.txt lines of epochs >= first_epoch (a resumed run writes them again)."""
    path = os.path.join(output_dir or '', 'log.txt')
    if not output_dir or not os.path.isfile(path) or not utils.is_main_process():
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line).get('epoch', -1) < first_epoch]
    utils.atomic_write(path, lambda f: f.writelines(lines), binary=False)


def save_run_config(args, device, derived):
    """config.yaml (the flags, reusable as --config) and run_info.json (code version, versions, the device the
    run trained on)."""
    import yaml
    values = {k: v for k, v in vars(args).items() if k != 'config'}
    with open(os.path.join(args.output_dir, 'config.yaml'), 'w') as f:
        yaml.safe_dump(values, f, sort_keys=True)
    info = {'versions': utils.versions(), 'command': sys.argv, 'cwd': os.getcwd(), **derived,
            'device': torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}
    with open(os.path.join(args.output_dir, 'run_info.json'), 'w') as f:
        json.dump(info, f, indent=1)


def run_summary(args, record, best, seconds):
    """The one line a finished run ends with: how long, how good (final and best test acc@1), where saved."""
    if 'test_acc1' in record:
        acc = f"final test acc@1 {record['test_acc1']:.2f}"
        if best and 'acc1' in best:
            acc += f", best {best['acc1']:.2f} (epoch {best['epoch']})"
    else:
        acc = 'no evaluation' if args.disable_eval else 'no epoch left to train'
    where = (f'checkpoints in {args.output_dir}' if args.save_ckpt else f'logs in {args.output_dir} (--save_ckpt false)') \
        if args.output_dir else 'nothing saved (no --output_dir)'
    return f'done in {format_seconds(seconds)}: {acc}; {where}'


def format_seconds(seconds):
    hours, rest = divmod(int(round(seconds)), 3600)
    return f'{hours}h{rest // 60:02d}m{rest % 60:02d}s' if hours else f'{rest // 60}m{rest % 60:02d}s'


# ----------------------------------------------------------------------------------------------
# Resuming.

def find_checkpoint(args):
    """(checkpoint, path) to resume from, or (None, None): with --auto_resume the newest readable one in
    --output_dir (it takes precedence over --resume and --initialize; an unreadable newest one is skipped
    with a warning), else --resume."""
    if args.auto_resume and args.output_dir:
        for path in reversed(list_checkpoints(args.output_dir)):
            try:
                ckpt = torch_load(path, args.trust_checkpoint)
            except UntrustedCheckpoint:
                raise  # a planted or old file: the user decides (--trust_checkpoint), not a silent skip
            except UserError as e:
                utils.print_main(f'warning: skipping unreadable checkpoint ({e}); trying the previous one')
                continue
            utils.print_main(f'auto-resume from {path}' + (' (it takes precedence over --initialize)'
                                                            if args.initialize else ''))
            return ckpt, path
    if args.resume:
        return torch_load(args.resume, args.trust_checkpoint), args.resume
    return None, None


def load_model_weights(ckpt, path, model, model_name):
    """The checkpoint's model weights into `model`, which must be the same architecture."""
    if not isinstance(ckpt, dict) or 'model' not in ckpt:
        raise UserError(f'--resume {path} is not a checkpoint of main.py (no "model" entry)')
    own, theirs = model.state_dict(), ckpt['model']
    saved = ckpt.get('model_name')
    same = saved is not None and MODEL_ALIASES.get(saved, saved) == MODEL_ALIASES.get(model_name, model_name)
    check_fits(theirs, own, f'--resume {path} holds a {saved} of another shape (other --model_kwargs, or another '
               f'number of classes?)' if same else
               f"--resume {path} holds a checkpoint of {saved or 'another model'}, not of --model {model_name}")
    model.load_state_dict(theirs)


def warn_schedule_changes(saved, now):
    """A resumed run whose learning-rate schedule (lr, total and warmup steps, ...; derived from the flags, the
    number of processes and the data) is not the one its checkpoint was trained on continues on the new one."""
    changed = [f'{k} {now[k]:g} (was {saved[k]:g})' for k in now
               if k in saved and now[k] is not None and saved[k] is not None and now[k] != saved[k]]
    if changed:
        utils.print_main(f"warning: resumed on another learning-rate schedule than the checkpoint's run: "
                         f"{', '.join(changed)}; the remaining steps follow the new one")


def saved_run_args(args):
    """The run's flags as a checkpoint keeps them: --data_path made absolute, so that a later --eval or --resume
    from another folder can tell whether it reads the same data."""
    saved = dict(vars(args))
    if saved.get('data_path'):
        saved['data_path'] = os.path.abspath(saved['data_path'])
    return saved


def args_of(ckpt):
    """A checkpoint's run flags as a dict: ours hold a dict, official DeiT/MAE/ConvNeXt ones an argparse.Namespace."""
    saved = ckpt.get('args') if isinstance(ckpt, dict) else None
    return dict(vars(saved) if hasattr(saved, '__dict__') else saved or {})


def note_other_data(saved_args, args, doing):
    """A line when the checkpoint's run read another dataset or folder: its accuracy, or the run that goes on,
    is then on this one (the class count alone matched). A relative saved path (an official checkpoint's) names
    no folder for sure: it is not compared."""
    changed = [f'--data_set {args.data_set} (the checkpoint\'s: {saved_args["data_set"]})'] \
        if saved_args.get('data_set') not in (None, args.data_set) else []
    saved_path = saved_args.get('data_path')
    if saved_path and os.path.isabs(saved_path) and args.data_path \
            and os.path.realpath(saved_path) != os.path.realpath(args.data_path):
        changed.append(f'--data_path {args.data_path} (the checkpoint\'s: {saved_path})')
    if changed:
        utils.print_main(f'note: {doing} other data than the checkpoint was trained on: {", ".join(changed)}')


def check_same_checkpoint(path):
    """Every process resumes from the same file (or none): each lists --output_dir itself, and a process that
    saw another file (a folder local to each node) would train other weights, then hang at a collective."""
    paths = utils.gather_from_ranks(os.path.abspath(path) if path else None)
    if len(set(paths)) > 1:
        found = ', '.join(f'rank {r}: {p or "none"}' for r, p in enumerate(paths))
        raise UserError(f'the processes found different checkpoints to resume from ({found}); give --output_dir '
                        f'a folder every process sees (a shared file system)')


def check_same_layout(ckpt, path, layout):
    """A checkpoint taken inside an epoch counts the epoch's batches done per process: another number of
    processes, --batch_size or update_freq cannot finish that epoch as the uninterrupted run would (its data
    and optimizer steps would shift)."""
    saved = ckpt.get('layout') or {'world_size': len(ckpt.get('partial_per_rank') or [None])}
    differs = {k: (v, layout[k]) for k, v in saved.items() if layout and k in layout and layout[k] != v}
    if differs:
        what = ', '.join(f'{k} {was} (now {now})' for k, (was, now) in differs.items())
        raise UserError(f'{path} was saved inside epoch {ckpt["epoch"]} with {what}; resume it with the same, or '
                        f'move {os.path.dirname(path) or "."}/checkpoint-{ckpt["epoch"]}-step*.pth away to redo that '
                        f'epoch from the last complete one')


def resume(args, train_state, layout=None):
    """Restore a run from its checkpoint (find_checkpoint); returns where to continue. `layout`: as in
    save_mid_epoch, this run's, which a checkpoint taken inside an epoch must share."""
    ckpt, path = find_checkpoint(args)
    check_same_checkpoint(path)
    if ckpt is not None and 'step_in_epoch' in ckpt and 'optimizer' in ckpt:
        check_same_layout(ckpt, path, layout)
    if ckpt is not None:
        load_model_weights(ckpt, path, train_state.model, args.model)
        note_other_data(args_of(ckpt), args, 'resuming on')
        if train_state.model_ema is not None:
            train_state.follow_with_ema(ckpt)
    if ckpt is None or 'optimizer' not in ckpt:  # none, or weights only (checkpoint-best.pth): a fresh start
        if ckpt is not None:
            utils.print_main(f'note: {path} holds weights but no training state (optimizer, epoch): training starts '
                             f'at epoch {args.start_epoch} from these weights')
        # from epoch --start_epoch: the log lines a killed earlier start left (e.g. with --save_ckpt false) go
        truncate_log(args.output_dir, args.start_epoch)
        return Resumed(start_epoch=args.start_epoch, best={})
    train_state.load_state_dict(ckpt)
    if train_state.schedule is not None and 'schedule' in ckpt:
        warn_schedule_changes(ckpt['schedule'], train_state.schedule.settings())
    if 'step_in_epoch' in ckpt:  # taken inside an epoch: finish that epoch
        resumed = Resumed(ckpt['epoch'], ckpt.get('best', {}), ckpt['step_in_epoch'], own_share(ckpt, 'partial'), path)
    else:
        resumed = Resumed(ckpt['epoch'] + 1, ckpt.get('best', {}), path=path)
    truncate_log(args.output_dir, resumed.start_epoch)
    where = f', step {resumed.step_in_epoch} of the epoch' if resumed.step_in_epoch else ''
    utils.print_main(f'resumed from {path}: continuing at epoch {resumed.start_epoch}{where}')
    return resumed
