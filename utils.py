"""Small single-purpose helpers shared by every entry point.

Command-line helpers (one-line errors), atomic file writing, distributed set-up, random states.
Nothing here knows about models, weight selection or the recipe.
"""
import argparse
import datetime
import hashlib
import inspect
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


# ----------------------------------------------------------------------------------------------
# Expected mistakes: one line, non-zero exit, no traceback.

class UserError(Exception):
    """A mistake in the user's input. CLIs print its message as one line and exit with status 1."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is reported on one line (argparse prints the usage block too), and a flag
    must be spelled out: an abbreviation (--conf for --config) would pass the parser but not the code that
    scans the command line for a flag (configs, --eval's given flags)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault('allow_abbrev', False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f'{self.prog}: error: {message} (see --help)\n')


class Terminated(BaseException):
    """SIGTERM, raised where the process is (see run_cli): not an Exception, so only cleanups catch it."""


def _terminate(signum, frame):
    raise Terminated()


def run_cli(main_fn, argv=None, clean_on_sigterm=False):
    """Run main_fn(argv); report a UserError as one line on stderr and exit 1. clean_on_sigterm: SIGTERM (a
    scheduler's kill, `kill PID`) ends main_fn as Ctrl-C does, so that its cleanups remove what it had half
    written, and exits 143. Not for training: a process blocked in a collective would outlive the launcher's
    SIGTERM, since Python runs a signal handler only between bytecodes."""
    if clean_on_sigterm:
        signal.signal(signal.SIGTERM, _terminate)
    try:
        main_fn(argv)
    except UserError as e:
        _stderr_line(f'error: {e}')
        sys.exit(1)
    except KeyboardInterrupt:
        _stderr_line('interrupted')
        sys.exit(130)
    except Terminated:
        _stderr_line('terminated')
        sys.exit(128 + signal.SIGTERM)


def _stderr_line(text):
    """One line on stderr in one write: the processes of a torchrun share the pipe, and print's separate write
    of the newline (unbuffered stderr) let another rank's line land between (seen in CI: two errors on a line)."""
    sys.stderr.write(text + '\n')
    sys.stderr.flush()


def first_line(error, limit=200):
    """An exception's message in one line for a UserError: its first line, or its class name when it has none;
    a line over `limit` characters ends at its last whole sentence that fits (else is cut, with '...')."""
    text = str(error).strip()
    if not text:
        return type(error).__name__
    line = text.splitlines()[0]
    if len(line) <= limit:
        return line
    end = line.rfind('. ', 0, limit)
    return line[:end + 1] if end > 0 else line[:limit - 3] + '...'


def check_hub_reachable(name, hint):
    """Fail at once, in one line ending with `hint` (what to pass instead), where the Hugging Face hub cannot
    be reached: HF_HUB_OFFLINE set (read as huggingface_hub reads it) or no address for the endpoint. The hub
    client would otherwise retry for a minute and end in a traceback."""
    if os.environ.get('HF_HUB_OFFLINE', '').strip().lower() in ('1', 'true', 'yes', 'on'):
        raise UserError(f"offline (HF_HUB_OFFLINE is set): cannot fetch '{name}'; {hint}")
    import socket
    from urllib.parse import urlparse
    host = urlparse(os.environ.get('HF_ENDPOINT', 'https://huggingface.co')).hostname
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        raise UserError(f"cannot reach {host} to fetch '{name}' (offline?); {hint}") from None


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


def parse_json_dict(text, flag, example='{"depth": 6}'):
    """Parse a JSON object given on the command line, e.g. --student_kwargs '{"depth": 6}' (`example`: the one
    an error shows)."""
    if text is None or text == '':
        return {}
    if isinstance(text, dict):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{flag} is not valid JSON ({e.msg} at character {e.pos}): {text!r}; "
                        f"write e.g. {flag} '{example}'") from None
    if not isinstance(value, dict):
        raise UserError(f"{flag} must be a JSON object such as '{example}', got {text!r}")
    return value


# ----------------------------------------------------------------------------------------------
# Files.

def sha256_file(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def check_writable(path, create_folder=False):
    """Fail early, before any heavy work, if the output file cannot be written. With create_folder, its
    folder may be missing (the caller creates it when writing) if the nearest existing parent is writable."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UserError(f'output {path} is a folder; give a file name such as {os.path.join(path, "init.pth")}')
    if create_folder:
        check_folder_writable(folder, f'cannot write {path}: folder')
        return
    if not os.path.isdir(folder):
        raise UserError(f'cannot write {path}: folder {folder} does not exist; create it first')
    if not os.access(folder, os.W_OK):
        raise UserError(f'cannot write {path}: folder {folder} is not writable')


def check_folder_writable(folder, flag, purpose=''):
    """An output folder that is there or can be made, checked before any work (os.makedirs would fail later,
    with a traceback, after the run's setup); `purpose` ends the message for a file given as the folder."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f'{flag} {folder} is a file; give a folder{purpose}')
    parent = os.path.abspath(folder)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f'{flag} {folder}: cannot make it, {parent} is a file')
    if not os.access(parent, os.W_OK):
        raise UserError(f'{flag} {folder}: cannot make or write it, {parent} is not writable')


def read_jsonl(path, fix):
    """The records (JSON objects, one per line) of a log.txt or runs.jsonl; a line that is not one is one line
    naming the file, the line and `fix`: skipping it would silently change what is read from the rest."""
    records = []
    try:
        with open(path) as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    record = json.loads(line)
                    if not isinstance(record, dict):
                        raise UserError(f'{path}, line {number}: not a JSON record; {fix}')
                    records.append(record)
    except UnicodeDecodeError:
        raise UserError(f'{path} is not a text file; {fix}') from None
    except json.JSONDecodeError as e:
        raise UserError(f'{path}, line {number}: not JSON ({e.msg}); {fix}') from None
    return records


def atomic_write(path, write, binary=True):
    """write(f) into a temporary file in the same folder, fsync, then rename: a reader (or a run killed
    half-way) never sees a half-written file, and remove_stale_temporaries finds the leftovers."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix='.tmp-', dir=folder)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
        with os.fdopen(fd, 'wb' if binary else 'w') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _umask():
    """The process umask (only readable by setting it, so set it back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_save(obj, path):
    """torch.save, atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def code_version():
    """The git commit of this code (with -dirty if modified), recorded by every run; where there is no git
    checkout (a copy of the working tree sent to another machine), WS_CODE_VERSION as the sender set it."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=here, capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ''
    if not rev:
        return os.environ.get('WS_CODE_VERSION') or 'unknown'
    return rev + ('-dirty' if dirty else '')


def versions(packages=('torchvision', 'timm')):
    """What a result file records to be reproduced: Python, torch (and the CUDA and cuDNN it was built
    with), each of `packages` (import names), and the code version. A package that does not import is
    recorded as such: a finding, not a reason to write nothing."""
    import importlib
    import platform
    # str(): torch's version is a str subclass that a weights-only torch.load refuses
    out = {'python': platform.python_version(), 'torch': str(torch.__version__)}
    for name in packages:
        try:
            out[name] = str(importlib.import_module(name).__version__)
        except Exception as e:  # noqa: BLE001
            out[name] = f'not importable: {first_line(e)}'
    out['cuda'] = torch.version.cuda
    out['cudnn'] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    out['code'] = code_version()
    return out


# ----------------------------------------------------------------------------------------------
# Distributed set-up: torchrun (RANK/WORLD_SIZE/LOCAL_RANK), SLURM, the legacy
# torch.distributed.launch (--local-rank), or a single process with no process group.

@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0          # the GPU of this process
    distributed: bool = False    # a process group is set up


def launched_world_size():
    """The number of processes the launcher (torchrun, SLURM) started, read before joining their group."""
    env = os.environ
    if 'RANK' in env and 'WORLD_SIZE' in env:
        return int(env['WORLD_SIZE'])
    # the tasks of this srun step: SLURM_NTASKS is the allocation's, also set for a plain `python main.py` in an
    # sbatch script, where it would wait for peers that never start
    return int(env.get('SLURM_STEP_NUM_TASKS', '1')) if 'SLURM_PROCID' in env else 1


def launched_rank():
    """This process's rank as the launcher (torchrun, SLURM) numbers it, read before joining the group."""
    env = os.environ
    if 'RANK' in env and 'WORLD_SIZE' in env:
        return int(env['RANK'])
    return int(env['SLURM_PROCID']) if launched_world_size() > 1 else 0


def init_distributed(args):
    """Join the process group the launcher describes; returns this process's place in it."""
    env, world, rank = os.environ, launched_world_size(), launched_rank()
    if 'RANK' in env and 'WORLD_SIZE' in env:
        local = int(env.get('LOCAL_RANK', max(args.local_rank, 0)))
    elif world > 1:  # SLURM
        # with --gpus-per-task each task sees its own GPU only, as device 0
        local = int(env.get('SLURM_LOCALID', rank)) % max(torch.cuda.device_count(), 1)
        if args.dist_url == 'env://':
            env.setdefault('MASTER_ADDR', _slurm_master())
            env.setdefault('MASTER_PORT', '29500')
    else:
        return Dist()
    if world == 1:
        return Dist(rank, world, local, False)
    join_process_group(args, rank, world, local)
    return Dist(rank, world, local, True)


def join_process_group(args, rank, world, local, timeout=datetime.timedelta(minutes=30)):
    """NCCL on this process's GPU (`local`), else gloo, through the launcher's store; returns the backend.
    With world 1 it makes a group of one (init_distributed does not; the CUDA tests do, to run NCCL)."""
    use_cuda = args.device.startswith('cuda') and torch.cuda.is_available()
    kwargs = {}
    if use_cuda:
        torch.cuda.set_device(local)
        if 'device_id' in inspect.signature(dist.init_process_group).parameters:  # torch >= 2.3
            kwargs['device_id'] = torch.device('cuda', local)  # barriers and collectives on this GPU, said once
    store = _restart_safe_store(args.dist_url, rank, world, timeout)
    backend = 'nccl' if use_cuda else 'gloo'
    if rank == 0:  # said before waiting: a process that never starts is otherwise a silent wait until the timeout
        print(f'joining a group of {world} processes ({backend}); waiting for all of them', flush=True)
    dist.init_process_group(backend=backend, init_method=None if store else args.dist_url, store=store,
                            world_size=world, rank=rank, timeout=timeout, **kwargs)
    dist.barrier()
    return backend


def close_distributed():
    """Destroy the process group, if any, before the process exits: left to the interpreter's exit, its threads
    can be torn down running ('terminate called without an active exception', SIGABRT, seen with gloo). Call it
    once the objects that hold the group (a DDP model) are freed, as main() does after train() returns: a
    DistributedDataParallel still alive here gives the same abort."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _restart_safe_store(dist_url, rank, world, timeout):
    """Under single-node torchrun, the rendezvous store with one key prefix per restart attempt.

    torchrun's default (static) rendezvous keeps one agent store across `--max_restarts` attempts, and the
    workers use it without a per-attempt prefix, so a restarted worker can read the previous attempt's keys
    (a dead peer's gloo address or NCCL id) and wait for it until the timeout. All workers of one node share
    the agent's restart count, so the prefix agrees across ranks; on several nodes the counts can differ
    (torch counts restarts per node), and torch's own store handling is kept."""
    env = os.environ
    if not (dist_url == 'env://' and env.get('TORCHELASTIC_USE_AGENT_STORE') == 'True'
            and env.get('GROUP_WORLD_SIZE') == '1' and 'TORCHELASTIC_RESTART_COUNT' in env):
        return None
    store, _, _ = next(dist.rendezvous(dist_url, rank, world, timeout=timeout))
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
    return rank() == 0


def print_main(*args, **kwargs):
    if is_main_process():
        print(*args, **kwargs, flush=True)


def rank():
    """This process's rank: in its group, or before joining it the launcher's (so that print_main speaks once)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return launched_rank()


def gather_from_ranks(obj):
    """[obj of rank 0, obj of rank 1, ...]: every process's own value (random states, running sums), which a
    checkpoint written by rank 0 alone must hold for each; [obj] in a single process. A collective: every
    process calls it."""
    if world_size() == 1:
        return [obj]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def cat_from_ranks(tensor):
    """torch.cat of every process's `tensor` along dim 0, in rank order, on `tensor`'s device; `tensor` itself in
    a single process. Shares may differ in length (they go through all_gather_object). A collective."""
    if world_size() == 1:
        return tensor
    return torch.cat([t.to(tensor.device) for t in gather_from_ranks(tensor.cpu())])


def on_every_rank(flag, device):
    """Whether `flag` holds on every process (a decision each takes from its own state, such as free memory,
    that all must take alike); `flag` in a single process."""
    if world_size() == 1:
        return bool(flag)
    value = torch.tensor(int(bool(flag)), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def broadcast_buffers(module, parameters=False):
    """Rank 0's buffers (BatchNorm's running statistics) on every process. DDP broadcasts them only at the start
    of each forward, so after an epoch each process holds those its own last batches updated: evaluated as they
    are, each rank's share of the test set would meet another model, none of them the one rank 0 saves.
    With `parameters`, its weights too: a model no DDP wraps, built from a seed that differs by rank."""
    if world_size() > 1:
        for tensor in (module.state_dict() if parameters else dict(module.named_buffers())).values():
            dist.broadcast(tensor, 0)  # state_dict's tensors share the parameters' storage


def all_reduce_mean(tensor):
    if world_size() > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        tensor /= world_size()
    return tensor


# ----------------------------------------------------------------------------------------------
# Random states.

def seed_everything(seed, cuda=True):
    """torch (its CUDA generators too unless cuda=False), numpy (timm's Mixup) and Python's random."""
    if cuda:
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)
    np.random.seed(seed % (2 ** 32))
    random.seed(seed)


def rng_state(cuda=True):
    """The random states of torch, numpy and Python (and CUDA: not in data-loading workers), as tensors and
    plain lists only, so that a checkpoint holding them loads with torch.load's weights_only=True (numpy
    arrays and Python's state tuples would need a full, code-running unpickle)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {'torch': torch.get_rng_state(),
             'numpy': [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             'python': _plain(random.getstate())}
    if cuda and torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore rng_state(); also the numpy array / tuple form of checkpoints written before it was plain."""
    torch.set_rng_state(state['torch'])
    kind, keys, pos, has_gauss, cached = state['numpy']
    keys = keys.numpy() if torch.is_tensor(keys) else np.asarray(keys)
    np.random.set_state((kind, keys.astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    random.setstate(_as_tuples(state['python']))
    if 'cuda' in state and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])


def _plain(value):
    """Tuples as lists, recursively (random.getstate() is (version, (625 ints), gauss_next))."""
    return [_plain(v) for v in value] if isinstance(value, (tuple, list)) else value


def _as_tuples(value):
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (tuple, list)) else value
