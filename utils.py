"""Small single-purpose helpers shared by weight_selection.py and main.py.

Command-line helpers (one-line errors), checkpoint reading and atomic writing, distributed set-up,
logging and checkpoint bookkeeping. Nothing here knows about weight selection or the recipe.
"""
import argparse
import datetime
import hashlib
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile

import numpy as np
import torch
import torch.distributed as dist


# ----------------------------------------------------------------------------------------------
# Expected mistakes: one line, non-zero exit, no traceback.

class UserError(Exception):
    """A mistake in the user's input. CLIs print its message as one line and exit with status 1."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is reported on one line (argparse prints the usage block too)."""

    def error(self, message):
        self.exit(2, f'{self.prog}: error: {message} (see --help)\n')


def run_cli(main_fn, argv=None):
    """Run main_fn(argv); report a UserError as one line on stderr and exit 1."""
    try:
        main_fn(argv)
    except UserError as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        sys.exit(130)


def str2bool(value):
    """`--flag true|false`, as the official ConvNeXt-style scripts spell booleans."""
    if isinstance(value, bool):
        return value
    v = value.lower()
    if v in ('true', '1', 'yes', 'y'):
        return True
    if v in ('false', '0', 'no', 'n'):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{value}'")


def parse_json_dict(text, flag):
    """Parse a JSON object given on the command line, e.g. --student_kwargs '{"depth": 6}'."""
    if text is None or text == '':
        return {}
    if isinstance(text, dict):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{flag} is not valid JSON ({e.msg} at character {e.pos}): {text!r}; "
                        f"write e.g. {flag} '{{\"depth\": 6}}'") from None
    if not isinstance(value, dict):
        raise UserError(f"{flag} must be a JSON object such as '{{\"depth\": 6}}', got {text!r}")
    return value


# ----------------------------------------------------------------------------------------------
# Checkpoints.

WRAPPER_KEYS = ('model', 'state_dict', 'module', 'model_ema', 'state_dict_ema')


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def torch_load(path):
    """torch.load on the CPU with a clear error for missing, truncated or unreadable files."""
    if not os.path.isfile(path):
        raise UserError(f'checkpoint not found: {path}')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure to read is the user's file
        if 'Weights only load failed' in str(e):
            # Checkpoints of the official DeiT/MAE/ConvNeXt scripts also pickle their argparse
            # Namespace; these are the user's own files, so fall back to a full unpickle.
            try:
                return torch.load(path, map_location='cpu', weights_only=False)
            except Exception as e2:  # noqa: BLE001
                e = e2
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f'cannot read checkpoint {path} (truncated or not a torch file?): {first}') from None


def unwrap_state_dict(obj, path='checkpoint'):
    """A flat {name: tensor} dict from a raw state dict or one wrapped under model/state_dict/...

    `module.` prefixes left by DistributedDataParallel are removed."""
    if isinstance(obj, dict):
        for key in WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise UserError(f'{path} holds no state dict (expected a dict of tensors, possibly under '
                        f"one of the keys {', '.join(WRAPPER_KEYS)})")
    if all(k.startswith('module.') for k in obj):
        obj = {k[len('module.'):]: v for k, v in obj.items()}
    return dict(obj)


def read_state_dict(path):
    """Weights from .pth/.pt/.bin (flat or wrapped) or .safetensors, as a flat state dict (for .safetensors a
    read-only mapping that reads each tensor when it is looked up)."""
    if path.endswith('.safetensors'):
        if not os.path.isfile(path):
            raise UserError(f'checkpoint not found: {path}')
        # a lazy mapping: a tensor is read when selected, so a big teacher is never whole in memory
        from hf_selection import SafetensorsStateDict
        return SafetensorsStateDict(path)
    return unwrap_state_dict(torch_load(path), path)


def describe_mismatch(missing, unexpected, wrong):
    """'missing a, b, c (+N more); unexpected ...; shape k (x) vs (y)' for key lists of two state dicts."""
    def first(keys, n, sep=', '):
        return sep.join(keys[:n]) + (f' (+{len(keys) - n} more)' if len(keys) > n else '')
    parts = [f'missing {first(missing, 3)}' if missing else '',
             f'unexpected {first(unexpected, 3)}' if unexpected else '',
             f'shape {first(wrong, 2, "; ")}' if wrong else '']
    return '; '.join(p for p in parts if p)


def check_writable(path):
    """Fail early, before any heavy work, if the output file cannot be written."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UserError(f'output {path} is a folder; give a file name such as {os.path.join(path, "init.pth")}')
    if not os.path.isdir(folder):
        raise UserError(f'cannot write {path}: folder {folder} does not exist; create it first')
    if not os.access(folder, os.W_OK):
        raise UserError(f'cannot write {path}: folder {folder} is not writable')


def atomic_write(path, write, binary=True):
    """write(f) into a temporary file in the same folder, fsync, then rename: a reader (or a run killed
    half-way) never sees a half-written file, and remove_stale_temporaries finds the leftovers."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix='.tmp-', dir=folder)
    try:
        with os.fdopen(fd, 'wb' if binary else 'w') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_save(obj, path):
    """torch.save, atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def code_version():
    """The git commit of this code (with -dirty if modified), recorded by every run."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=here, capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (rev + ('-dirty' if dirty else '')) or 'unknown'
    except (OSError, subprocess.SubprocessError):
        return 'unknown'


# ----------------------------------------------------------------------------------------------
# Distributed set-up: torchrun (RANK/WORLD_SIZE/LOCAL_RANK), SLURM, the legacy
# torch.distributed.launch (--local-rank), or a single process with no process group.

def init_distributed(args):
    env = os.environ
    if 'RANK' in env and 'WORLD_SIZE' in env:
        args.rank, args.world_size = int(env['RANK']), int(env['WORLD_SIZE'])
        args.gpu = int(env.get('LOCAL_RANK', max(args.local_rank, 0)))
    elif 'SLURM_PROCID' in env and int(env.get('SLURM_NTASKS', '1')) > 1:
        args.rank, args.world_size = int(env['SLURM_PROCID']), int(env['SLURM_NTASKS'])
        args.gpu = int(env.get('SLURM_LOCALID', args.rank % max(torch.cuda.device_count(), 1)))
        if args.dist_url == 'env://':
            env.setdefault('MASTER_ADDR', _slurm_master())
            env.setdefault('MASTER_PORT', '29500')
    else:
        args.rank, args.world_size, args.gpu, args.distributed = 0, 1, 0, False
        return
    args.distributed = args.world_size > 1
    if not args.distributed:
        return
    use_cuda = args.device.startswith('cuda') and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(args.gpu)
    timeout = datetime.timedelta(minutes=30)
    store = _restart_safe_store(args, timeout)
    dist.init_process_group(backend='nccl' if use_cuda else 'gloo', init_method=None if store else args.dist_url,
                            store=store, world_size=args.world_size, rank=args.rank, timeout=timeout)
    dist.barrier()


def _restart_safe_store(args, timeout):
    """Under single-node torchrun, the rendezvous store with one key prefix per restart attempt.

    torchrun's default (static) rendezvous keeps one agent store across `--max_restarts` attempts, and the
    workers use it without a per-attempt prefix, so a restarted worker can read the previous attempt's keys
    (a dead peer's gloo address or NCCL id) and wait for it until the timeout. All workers of one node share
    the agent's restart count, so the prefix agrees across ranks; on several nodes the counts can differ
    (torch counts restarts per node), and torch's own store handling is kept."""
    env = os.environ
    if not (args.dist_url == 'env://' and env.get('TORCHELASTIC_USE_AGENT_STORE') == 'True'
            and env.get('GROUP_WORLD_SIZE') == '1' and 'TORCHELASTIC_RESTART_COUNT' in env):
        return None
    store, _, _ = next(dist.rendezvous(args.dist_url, args.rank, args.world_size, timeout=timeout))
    return dist.PrefixStore(f'weight_selection/attempt_{env["TORCHELASTIC_RESTART_COUNT"]}', store)


def _slurm_master():
    nodes = os.environ.get('SLURM_JOB_NODELIST', '127.0.0.1')
    try:
        return subprocess.run(['scontrol', 'show', 'hostnames', nodes], capture_output=True, text=True,
                              timeout=10).stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return nodes.split(',')[0]


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process():
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def print_main(*args, **kwargs):
    if is_main_process():
        print(*args, **kwargs, flush=True)


def unwrap_model(model):
    """The plain module inside DistributedDataParallel and torch.compile wrappers."""
    while True:
        if hasattr(model, '_orig_mod'):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def all_reduce_mean(tensor):
    if world_size() > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        tensor /= world_size()
    return tensor


# ----------------------------------------------------------------------------------------------
# Run outputs: log.txt (a JSON line per epoch), checkpoints (atomic, the last K kept).

def append_log(output_dir, record):
    if output_dir and is_main_process():
        with open(os.path.join(output_dir, 'log.txt'), 'a') as f:
            f.write(json.dumps(record) + '\n')


CHECKPOINT_NAME = re.compile(r'^checkpoint-(\d+)(?:-step(\d+))?\.pth$')


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
    if not is_main_process():
        return
    atomic_save(state, os.path.join(output_dir, name))
    if keep_last:
        for path in list_checkpoints(output_dir)[:-keep_last]:
            os.remove(path)


def remove_stale_temporaries(output_dir):
    """Half-written files of a run killed while saving (atomic_save's temporaries)."""
    if output_dir and os.path.isdir(output_dir) and is_main_process():
        for name in os.listdir(output_dir):
            if name.startswith('.tmp-'):
                os.remove(os.path.join(output_dir, name))


def truncate_log(output_dir, first_epoch):
    """Drop log.txt lines of epochs >= first_epoch (a resumed run writes them again)."""
    path = os.path.join(output_dir or '', 'log.txt')
    if not output_dir or not os.path.isfile(path) or not is_main_process():
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line).get('epoch', -1) < first_epoch]
    atomic_write(path, lambda f: f.writelines(lines), binary=False)


def seed_everything(seed):
    """torch, numpy (timm's Mixup) and Python's random."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2 ** 32))
    random.seed(seed)


def rng_state(cuda=True):
    """The random states of torch, numpy and Python (and CUDA: not in data-loading workers)."""
    state = {'torch': torch.get_rng_state(), 'numpy': np.random.get_state(), 'python': random.getstate()}
    if cuda and torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    np.random.set_state(state['numpy'])
    random.setstate(state['python'])
    if 'cuda' in state and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])
