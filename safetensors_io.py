"""Reading .safetensors files lazily: the header parsed and checked up front (dtypes, sizes, truncation),
tensors (or a range of their rows) read only when asked, each with one plain read of its bytes. Used by
hf_selection (sharded Hugging Face teachers) and by models/io.read_state_dict (a timm teacher in one
.safetensors file). Writing is left to the safetensors package."""
import json
import math
import os
import struct
from collections.abc import Mapping

import torch

from utils import UserError

ST_DTYPES = {'F64': torch.float64, 'F32': torch.float32, 'F16': torch.float16, 'BF16': torch.bfloat16,
             'I64': torch.int64, 'I32': torch.int32, 'I16': torch.int16, 'I8': torch.int8,
             'U8': torch.uint8, 'BOOL': torch.bool}
ST_DTYPES.update({name: getattr(torch, attr) for name, attr in [  # where this torch has them
    ('F8_E4M3', 'float8_e4m3fn'), ('F8_E5M2', 'float8_e5m2'), ('U16', 'uint16'), ('U32', 'uint32'), ('U64', 'uint64')]
    if hasattr(torch, attr)})


def read_header(path):
    """{key: (dtype, shape, (begin, end))} of a safetensors file, begin and end as offsets in the file;
    a clear error when it is truncated."""
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
        raw = f.read(8)
        n = struct.unpack('<Q', raw)[0] if len(raw) == 8 else None
        if n is None or 8 + n > size:
            raise UserError(f'{path}: truncated or not a safetensors file (header cut off)')
        try:
            header = json.loads(f.read(n))
            header.pop('__metadata__', None)
            tensors = {k: (v['dtype'], tuple(v['shape']), (8 + n + v['data_offsets'][0], 8 + n + v['data_offsets'][1]))
                       for k, v in header.items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UserError(f'{path}: not a safetensors file (unreadable header)') from None
    for key, (dtype, shape, (begin, end)) in tensors.items():
        if dtype not in ST_DTYPES:
            raise UserError(f"{path}: tensor '{key}' has dtype {dtype}; supported: {', '.join(ST_DTYPES)}")
        if end - begin != math.prod(shape) * ST_DTYPES[dtype].itemsize:
            raise UserError(f"{path}: the header's size of '{key}' does not match its shape {list(shape)}; "
                            f'corrupt file')
    end = max((offsets[1] for _, _, offsets in tensors.values()), default=8 + n)
    if end > size:
        raise UserError(f'{path}: truncated ({size} bytes, its header describes {end}); download it again')
    return tensors


def rows_of(info):
    """How many rows a tensor has (its first dimension; a scalar counts as one row)."""
    shape = info[1]
    return shape[0] if shape else 1


def byte_span(info, lo, hi):
    """(byte offset in the file, byte count) of rows lo..hi-1 of the tensor whose header entry is info."""
    _, shape, (begin, end) = info
    row = (end - begin) // max(rows_of(info), 1)
    return begin + lo * row, (hi - lo) * row


def read_rows(f, path, key, info, lo, hi):
    """Rows lo..hi-1 of tensor `key` from the open file f (raw, unbuffered), read with one plain read of
    their bytes, which the header locates: several times faster than faulting a memory map in page by page."""
    dtype, shape, _ = info
    offset, nbytes = byte_span(info, lo, hi)
    buf = torch.empty(nbytes, dtype=torch.uint8)
    f.seek(offset)
    view, got = memoryview(buf.numpy()), 0
    while got < nbytes:  # one read returns at most ~2 GB
        n = f.readinto(view[got:])
        if not n:
            raise UserError(f'{path}: truncated while reading {key}')
        got += n
    values = buf.view(ST_DTYPES[dtype])
    return values.reshape(hi - lo, *shape[1:]) if shape else values[0]


class SafetensorsStateDict(Mapping):
    """A read-only {key: tensor} over a .safetensors file. Keys and completeness come from the header;
    a tensor is read only when looked up, so weight_selection.select_weights holds one teacher tensor at a
    time instead of the whole teacher. Every lookup reads again: nothing is cached."""

    def __init__(self, path):
        self.path, self.header = path, read_header(path)

    def __getitem__(self, key):
        info = self.header[key]
        with open(self.path, 'rb', buffering=0) as f:
            return read_rows(f, self.path, key, info, 0, rows_of(info))

    def __iter__(self):
        return iter(self.header)

    def __len__(self):
        return len(self.header)
