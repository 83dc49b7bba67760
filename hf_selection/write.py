"""Writing the student: safetensors shards whose headers are known from the plan, so tensors stream straight to
disk, in a folder that appears whole or not at all."""
import json
import os
import re
import shutil
import struct
import tempfile

import torch

from safetensors_io import ST_DTYPES
from utils import UserError

from .plan import ReadAhead


def parse_size(text):
    """'5GB' -> 5e9 bytes, as transformers' max_shard_size ('500MB', '2GiB' or a number of bytes)."""
    m = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*', str(text), re.IGNORECASE)
    if m is None:
        raise UserError(f"--max_shard_size {text}: write a size such as 5GB, 500MB or 2GiB")
    unit = (m[2] or 'B').upper()
    base = 1024 if 'I' in unit else 1000
    return int(float(m[1]) * base ** 'BKMGT'.index(unit[0]))


def split_shards(planned, max_bytes):
    shards, size = [[]], 0
    for p in planned:
        if shards[-1] and size + p.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += p.nbytes
    return shards


def write_shard(path, shard, make):
    """One safetensors file: header (dtypes, shapes, offsets, all known from the plan), then each tensor's
    bytes as soon as make(p) produces it."""
    header, offset = {'__metadata__': {'format': 'pt'}}, 0
    for p in shard:
        header[p.key] = {'dtype': p.dtype, 'shape': list(p.shape), 'data_offsets': [offset, offset + p.nbytes]}
        offset += p.nbytes
    raw = json.dumps(header, separators=(',', ':')).encode()
    raw += b' ' * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, 'wb') as f:
        f.write(struct.pack('<Q', len(raw)))
        f.write(raw)
        for p in shard:
            value = make(p)
            if tuple(value.shape) != p.shape or value.dtype != ST_DTYPES[p.dtype]:
                raise AssertionError(f'{p.key}: made {tuple(value.shape)} {value.dtype}, planned {p.shape} {p.dtype}')
            f.write(value.reshape(-1).view(torch.uint8).numpy())
        f.flush()
        os.fsync(f.fileno())


def write_student(folder, planned, max_bytes, make):
    """model.safetensors, or model-0000i-of-0000n.safetensors with model.safetensors.index.json."""
    shards = split_shards(planned, max_bytes)
    n = len(shards)
    names = ['model.safetensors'] if n == 1 else [f'model-{i + 1:05d}-of-{n:05d}.safetensors' for i in range(n)]
    for name, shard in zip(names, shards):
        write_shard(os.path.join(folder, name), shard, make)
    if n > 1:
        index = {'metadata': {'total_size': sum(p.nbytes for p in planned)},
                 'weight_map': {p.key: name for name, shard in zip(names, shards) for p in shard}}
        write_json(os.path.join(folder, 'model.safetensors.index.json'), index)
    return names


def write_json(path, obj):
    with open(path, 'w') as f:
        json.dump(obj, f, indent=2)
        f.write('\n')


def check_output(path):
    """The output folder must be new (or empty), in an existing folder: nothing is overwritten."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UserError(f'cannot write {path}: folder {parent} does not exist; create it first')
    if os.path.isfile(path):
        raise UserError(f'--output {path} is a file; a Hugging Face student is written to a folder')
    if os.path.isdir(path) and os.listdir(path):
        raise UserError(f'--output {path} exists and is not empty; choose a new folder')


def write_output(output, s_cfg, planned, make, shards, max_bytes, report):
    """The student folder, written under a temporary name beside `output` and renamed when complete."""
    tmp = tempfile.mkdtemp(prefix='.tmp-' + os.path.basename(os.path.abspath(output)) + '-',
                           dir=os.path.dirname(os.path.abspath(output)))
    try:
        write_json(os.path.join(tmp, 'config.json'), s_cfg)
        std = s_cfg.get('initializer_range', 0.02)
        ahead = ReadAhead(planned, lambda p: make(p, std), shards.will_need)
        try:
            report['meta']['files'] = write_student(tmp, planned, max_bytes, ahead)
        finally:
            ahead.close()
        report['meta']['teacher_bytes_read'] = shards.bytes_read
        report['meta']['teacher_bytes'] = sum(os.path.getsize(os.path.join(shards.folder, n)) for n in shards.files)
        write_json(os.path.join(tmp, 'selection.json'), report)
        if os.path.isdir(output):
            os.rmdir(output)  # empty (checked before)
        os.rename(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
