"""Model I/O, shared by the selector and the trainer: create models by name, read checkpoints, check that
a state dict fits a model, and what a state dict alone does not say (position grid, classifier names).

Nothing here knows about weight selection or the training recipe.
"""
import argparse
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

import utils
from utils import UserError

# Names of the official release that are not timm names (it registered them over timm's).
MODEL_ALIASES = {'vit_tiny': 'vit_tiny_patch16_224', 'vit_small': 'vit_small_patch16_224'}
# Keys under which checkpoints wrap their weights (ours, DeiT/MAE/ConvNeXt's, timm's EMA), in this order.
WRAPPER_KEYS = ('model', 'state_dict', 'module', 'model_ema', 'state_dict_ema')


# ----------------------------------------------------------------------------------------------
# Creating models.

def check_model_name(name, flag):
    import timm
    import models  # noqa: F401 - registers the project's students with timm
    if not timm.is_model(name):
        import difflib
        base, known = name.split('.')[0], timm.list_models()
        # a misspelled start of a long name (vit_tinyy) matches the start of the name, not the whole of a short one
        ratio = {m: difflib.SequenceMatcher(None, base, m[:len(base)]).ratio() for m in known}
        starts = sorted((m for m in known if ratio[m] >= 0.85), key=lambda m: (-ratio[m], len(m), m))
        close = list(dict.fromkeys(starts[:3] + difflib.get_close_matches(base, known, n=3)))[:3]
        hint = f"; did you mean {', '.join(close)}?" if close else ''
        raise UserError(f"{flag}: unknown model '{name}' (neither a timm model nor one registered in models/){hint}")


def create_model(name, flag, pretrained=False, default_img_size=None, **kwargs):
    """timm.create_model with our students registered; a keyword the model does not take, or a value it cannot be
    built with (num_heads that does not divide the width, a patch size of 0, ConvNeXt depths of 3 stages), is one
    error line. `default_img_size` is passed as img_size only to models that take it (ViTs do, ConvNeXt does not)."""
    import timm
    check_model_name(name, flag)
    # what a model's constructor raises on values it cannot take; for a plain timm name (no keyword arguments, no
    # image size) any error is not the caller's (a traceback, then)
    rejected = (TypeError, AssertionError, ValueError, IndexError, ZeroDivisionError, RuntimeError) \
        if kwargs or default_img_size is not None else TypeError
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='Mapping deprecated model name')
        if default_img_size is not None:
            try:
                return timm.create_model(name, pretrained=pretrained, img_size=default_img_size, **kwargs)
            except rejected as e:
                if not (isinstance(e, TypeError) and 'img_size' in str(e)):
                    raise UserError(f'{flag} {name}: {type(e).__name__}: {e}; check the keyword arguments '
                                    f'{kwargs} and the image size {default_img_size}') from None
        try:
            return timm.create_model(name, pretrained=pretrained, **kwargs)
        except rejected as e:
            raise UserError(f'{flag} {name}: {type(e).__name__}: {e}; check the keyword arguments {kwargs}') from None


# ----------------------------------------------------------------------------------------------
# Reading checkpoints.

# Classes that official checkpoints pickle and that run no code when unpickled: the DeiT/MAE/ConvNeXt
# scripts save their argparse.Namespace. Anything else beyond tensors and plain types needs --trust_checkpoint.
SAFE_GLOBALS = [argparse.Namespace]
TRUST_FLAG = '--trust_checkpoint true'


class UntrustedCheckpoint(UserError):
    """A file that only a full unpickle (which can run any code) would read; the user must opt in."""


def torch_load(path, trust=False, mmap=False):
    """torch.load on the CPU, weights_only (tensors, plain types, SAFE_GLOBALS) unless `trust`: a file that
    needs a full unpickle is refused with one line naming what it holds and the flag; missing, truncated or
    unreadable files are one line too. With `mmap`, the tensors of a zip-format file (torch.save's since 1.6)
    stay in the file's pages, read when used (a legacy-format file is read whole)."""
    if os.path.isdir(path):
        raise UserError(f'checkpoint {path} is a folder; give the checkpoint file in it (e.g. checkpoint-best.pth)')
    if not os.path.isfile(path):
        raise UserError(f'checkpoint not found: {path}')
    if not written_by_torch_save(path):  # an image, a text, random bytes: not a file to trust or refuse
        raise UserError(f'cannot read checkpoint {path}: it is not a file torch.save writes (neither a zip archive '
                        f'nor a pickle); check the path')
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS), warnings.catch_warnings():
            # torch warns of pickle protocols its safe unpickler may not read before it reads (or refuses) the file
            warnings.filterwarnings('ignore', message='Detected pickle protocol')
            try:
                return torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
            except RuntimeError as e:
                if not mmap or 'mmap can only be used' not in str(e):
                    raise
                return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure to read is the user's file
        if 'Weights only load failed' not in str(e):
            raise UserError(f'cannot read checkpoint {path} (truncated or not a torch file?): '
                            f'{type(e).__name__}: {utils.first_line(e)}') from None
        if not trust:
            raise UntrustedCheckpoint(
                f'refused to load {path}: it holds {_blocked_global(e)}, a Python object that only a full unpickle '
                f'reads, and unpickling can run any code; if you trust this file (e.g. a checkpoint written '
                f'before this version), pass {TRUST_FLAG}') from None
    utils.print_main(f'warning: fully unpickling {path} ({TRUST_FLAG}): this runs any code the file holds')
    try:
        return torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise UserError(f'cannot read checkpoint {path} (truncated or not a torch file?): {type(e).__name__}: '
                        f'{utils.first_line(e)}') from None


def written_by_torch_save(path):
    """Whether the file starts as torch.save's files do: a zip archive (since torch 1.6), or a legacy pickle, whose
    first object is torch's magic number (a PROTO opcode first from protocol 2 on; protocols 0 and 1 start with
    the number as a LONG, 'L')."""
    with open(path, 'rb') as f:
        head = f.read(4)
    return head == b'PK\x03\x04' or head[:1] in (b'\x80', b'L')


def _blocked_global(error):
    """The class or function named in torch's weights_only error, e.g. 'posix.system'."""
    found = re.search(r'GLOBAL ([\w.]+)', str(error))
    return found[1] if found else 'objects other than tensors'


def unwrap_state_dict(obj, path='checkpoint', keys=WRAPPER_KEYS, prefix=''):
    """A flat {name: tensor} dict from a raw state dict or one wrapped under one of `keys`; `module.`
    prefixes left by DistributedDataParallel and the given `prefix` are removed."""
    if isinstance(obj, dict):
        for key in keys:
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise UserError(f'{path} holds no state dict (expected a dict of tensors, possibly under '
                        f"one of the keys {', '.join(keys)})")
    if all(k.startswith('module.') for k in obj):
        obj = {k[len('module.'):]: v for k, v in obj.items()}
    if prefix:
        obj = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in obj.items()}
    return dict(obj)


def read_state_dict(path, keys=WRAPPER_KEYS, prefix='', trust=False):
    """Weights from .pth/.pt/.bin (flat or wrapped) or .safetensors, as a flat state dict whose tensors are read
    when used: .safetensors gives a read-only mapping that reads each tensor when it is looked up, a zip-format
    torch file memory-mapped tensors."""
    if path.endswith('.safetensors'):
        if not os.path.isfile(path):
            raise UserError(f'checkpoint not found: {path}')
        # a lazy mapping: a tensor is read when selected, so a big teacher is never whole in memory
        from safetensors_io import SafetensorsStateDict
        lazy = SafetensorsStateDict(path)
        if prefix or (len(lazy) and all(k.startswith('module.') for k in lazy)):  # renamed keys: read it whole
            return unwrap_state_dict(dict(lazy), path, keys, prefix)
        return lazy
    return unwrap_state_dict(torch_load(path, trust, mmap=True), path, keys, prefix)


# ----------------------------------------------------------------------------------------------
# Does a state dict fit a model? One check for the selector, --initialize, --resume and --eval.

def mismatch(state, expected, ignore=lambda key: False):
    """(missing, unexpected, wrong shape) keys of `state` against the model's state dict `expected`;
    keys for which ignore(key) is true may be missing or of another shape."""
    missing = [k for k in expected if k not in state and not ignore(k)]
    unexpected = [k for k in state if k not in expected]
    wrong = [f'{k} {tuple(state[k].shape)} vs {tuple(v.shape)}' for k, v in expected.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape) and not ignore(k)]
    return missing, unexpected, wrong


def describe_mismatch(missing, unexpected, wrong):
    """'missing a, b, c (+N more); unexpected ...; shape k (x) vs (y)' for key lists of two state dicts."""
    def first(keys, n, sep=', '):
        return sep.join(keys[:n]) + (f' (+{len(keys) - n} more)' if len(keys) > n else '')
    parts = [f'missing {first(missing, 3)}' if missing else '',
             f'unexpected {first(unexpected, 3)}' if unexpected else '',
             f'shape {first(wrong, 2, "; ")}' if wrong else '']
    return '; '.join(p for p in parts if p)


def check_fits(state, expected, context, hint='', ignore=lambda key: False):
    """Raise '<context>: missing ...; unexpected ...; shape ...<hint>' unless `state` fits `expected`."""
    found = mismatch(state, expected, ignore)
    if any(found):
        raise UserError(f'{context}: {describe_mismatch(*found)}{hint}')


def linear_as_conv(tensor, shape):
    """A Linear weight [out, in] as a 1x1 conv [out, in, 1, 1] or the reverse, to match `shape` (ConvNeXt's
    MLP with conv_mlp False/True); any other tensor unchanged."""
    if tensor.ndim == 2 and len(shape) == 4 and tuple(shape[2:]) == (1, 1):
        return tensor[:, :, None, None]
    if tensor.ndim == 4 and tuple(tensor.shape[2:]) == (1, 1) and len(shape) == 2:
        return tensor[:, :, 0, 0]
    return tensor


# ----------------------------------------------------------------------------------------------
# What a model's state dict alone does not say.

@dataclass
class Layout:
    pos_prefix_tokens: int = 0   # tokens (cls, registers) that carry their own pos_embed entries
    grid: tuple = None           # patch grid of pos_embed
    classifier: tuple = ()       # names of classifier modules (not selected unless keep_head)


def layout_of(model_or_state):
    """Layout of a timm model; for a bare state dict, a square grid and a classifier named head/head.fc/fc."""
    if isinstance(model_or_state, nn.Module):
        m = model_or_state
        prefix = 0 if getattr(m, 'no_embed_class', False) else getattr(m, 'num_prefix_tokens', 0)
        grid = getattr(getattr(m, 'patch_embed', None), 'grid_size', None)
        classifier = (getattr(m, 'pretrained_cfg', None) or {}).get('classifier', 'head')
        classifier = tuple(classifier) if isinstance(classifier, (list, tuple)) else (classifier,)
        return Layout(prefix, tuple(grid) if grid is not None else None, classifier)
    pos = model_or_state.get('pos_embed')
    layout = Layout(classifier=('head', 'head.fc', 'fc'))
    if pos is not None:
        n = pos.shape[1]
        for prefix in range(0, 9):  # the fewest prefix tokens that leave a square grid
            side = math.isqrt(n - prefix)
            if side * side == n - prefix:
                layout.pos_prefix_tokens, layout.grid = prefix, (side, side)
                break
    return layout


def is_classifier(key, layout):
    return any(key.startswith(c + '.') for c in layout.classifier)


# ----------------------------------------------------------------------------------------------
# Pretrained models: timm's hub weights, or a local file checked against the model.

def load_pretrained(name, checkpoint=None, kwargs=None, flag='--teacher', trust=False):
    """(state_dict, Layout) of a pretrained timm model: from `checkpoint` if given, else timm's pretrained
    weights from the hub. A checkpoint is checked key by key and shape by shape against the model."""
    kwargs = dict(kwargs or {})
    check_model_name(name, flag)
    if checkpoint is None:
        hint = f'pass {flag}_checkpoint FILE'
        utils.check_hub_reachable(name, hint)
        try:
            model = create_model(name, flag, pretrained=True, **kwargs)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - any download failure
            raise UserError(f"cannot fetch pretrained weights for '{name}' ({type(e).__name__}: "
                            f'{utils.first_line(e)}); offline, {hint}') from None
        return model.state_dict(), layout_of(model)
    if checkpoint.endswith('.npz'):  # the augreg ViTs' original JAX checkpoints
        model = create_model(name, flag, **kwargs)
        if not hasattr(model, 'load_pretrained'):
            raise UserError(f'{checkpoint}: .npz checkpoints are supported for timm ViTs only')
        if not os.path.isfile(checkpoint):
            raise UserError(f'checkpoint not found: {checkpoint}')
        try:
            model.load_pretrained(checkpoint)
        except Exception as e:  # noqa: BLE001
            raise UserError(f'cannot load {checkpoint} into {name}: {utils.first_line(e)}') from None
        return model.state_dict(), layout_of(model)
    state = read_state_dict(checkpoint, trust=trust)
    with torch.device('meta'):  # structure only: no memory, no random init
        model = create_model(name, flag, **kwargs)
    return fit_checkpoint(state, model, name, checkpoint, flag), layout_of(model)


def fit_checkpoint(state, model, name, path, flag='--teacher'):
    """The checkpoint as the model's own state dict, converting foreign layouts with timm's
    checkpoint_filter_fn; a different classifier size is accepted (it is not selected by default)."""
    expected = model.state_dict()
    if set(state) != set(expected):
        filter_fn = getattr(sys.modules.get(type(model).__module__), 'checkpoint_filter_fn', None)
        if filter_fn is not None:
            try:
                converted = filter_fn(dict(state), model)
                if set(converted) == set(expected):
                    state = converted
            except Exception:  # noqa: BLE001 - not convertible: report the raw mismatch below
                pass
    layout = layout_of(model)
    # a checkpoint without classifier (a backbone) is fine: the classifier is not selected by default
    check_fits(state, expected, f'checkpoint {path} does not fit {flag} {name}',
               f'; check the {flag[2:]} name or {flag}_kwargs', ignore=lambda k: is_classifier(k, layout))
    return state
