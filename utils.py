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
import subprocess
import sys
import tempfile
import time

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
    """Weights from .pth/.pt/.bin (flat or wrapped) or .safetensors, as a flat state dict."""
    if path.endswith('.safetensors'):
        if not os.path.isfile(path):
            raise UserError(f'checkpoint not found: {path}')
        from safetensors.torch import load_file
        try:
            return load_file(path, device='cpu')
        except Exception as e:  # noqa: BLE001
            raise UserError(f'cannot read safetensors file {path} (truncated?): {e}') from None
    return unwrap_state_dict(torch_load(path), path)


def check_writable(path):
    """Fail early, before any heavy work, if the output file cannot be written."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UserError(f'output {path} is a folder; give a file name such as {os.path.join(path, "init.pth")}')
    if not os.path.isdir(folder):
        raise UserError(f'cannot write {path}: folder {folder} does not exist; create it first')
    if not os.access(folder, os.W_OK):
        raise UserError(f'cannot write {path}: folder {folder} is not writable')


def atomic_save(obj, path):
    """torch.save to a temporary file in the same folder, fsync, then rename: a reader (or a run
    killed half-way) never sees a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix='.tmp-', suffix='.pth', dir=folder)
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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
