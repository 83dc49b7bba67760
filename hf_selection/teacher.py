"""Reading the teacher: a local folder or a hub id; its shards' headers parsed up front (shapes, dtypes,
completeness), tensors read on demand, a range of rows at a time; MXFP4 experts dequantized as they are read."""
import itertools
import json
import os
import re

import torch

import utils
from safetensors_io import byte_span, read_header, read_rows, rows_of
from utils import UserError


# Kept rows further apart than this are read apart (the unkept experts of a stack are skipped); closer ones in one
# read (a weight's kept rows: one read beats thousands of small ones)
SKIP_GAP_BYTES = 1 << 20


class TeacherShards:
    """The teacher's tensors across its shards; reads a tensor (or a range of its rows) only when asked."""

    def __init__(self, folder):
        self.folder = folder
        self.files = shard_files(folder)
        self.where, self.header = {}, {}
        for name in self.files:
            for key, info in read_header(os.path.join(folder, name)).items():
                self.where[key], self.header[key] = name, info
        self.packed = self.find_mxfp4()
        self.fds, self.bytes_read, self.keys_read = {}, 0, []

    def find_mxfp4(self):
        """MXFP4 pairs W_blocks, W_scales: each listed as the weight W, [experts, in, out] in bfloat16, which read()
        dequantizes; returns {W: ((blocks key, header entry, shard), (scales key, header entry, shard))}."""
        packed = {}
        for key in sorted({k[:-7] for k in self.header if k.endswith(('_blocks', '_scales'))}):
            blocks, scales = key + '_blocks', key + '_scales'
            if blocks not in self.header or scales not in self.header:
                have, lack = (blocks, scales) if blocks in self.header else (scales, blocks)
                raise UserError(f"teacher tensor '{have}' has no '{lack}': an MXFP4 weight is stored as both; the "
                                f'checkpoint is incomplete')
            (b_dtype, b_shape, offsets), (s_dtype, s_shape, _) = self.header[blocks], self.header[scales]
            if (b_dtype, s_dtype) != ('U8', 'U8') or len(b_shape) != 4 or b_shape[3] != 16 or s_shape != b_shape[:3]:
                raise UserError(f"teacher tensors '{blocks}' {b_dtype} {list(b_shape)} and '{scales}' {s_dtype} "
                                f'{list(s_shape)} are not MXFP4 experts ([experts, out, in/32, 16] and [experts, out, '
                                f'in/32], uint8)')
            packed[key] = tuple((k, self.header.pop(k), self.where.pop(k)) for k in (blocks, scales))
            self.header[key], self.where[key] = ('BF16', (b_shape[0], b_shape[2] * 32, b_shape[1]), offsets), \
                packed[key][0][2]
        return packed

    def in_file_order(self):
        """Every key, shard by shard and by offset inside each: reads then go forward through the files."""
        return sorted(self.header, key=lambda k: (self.where[k], self.header[k][2][0]))

    def file(self, name):
        if name not in self.fds:
            self.fds[name] = open(os.path.join(self.folder, name), 'rb', buffering=0)
        return self.fds[name]

    def row_runs(self, key, indices):
        """[(lo, hi)]: the spans of rows read for `indices`: from the first kept row to the last (all rows when
        indices[0] is None), cut where the rows between two kept ones would hold more than SKIP_GAP_BYTES: a stack
        of experts keeps its kept experts' bytes only, while a weight's kept rows are read in one go."""
        rows = indices[0] if indices else None
        if rows is None or not len(rows):
            return [(0, rows_of(self.header[key]))]
        kept = rows.unique()  # sorted
        row_bytes = byte_span(self.header[key], 0, 1)[1]
        cuts = ((kept.diff() - 1) * row_bytes > SKIP_GAP_BYTES).nonzero().flatten().add(1).tolist()
        return [(int(kept[a]), int(kept[b - 1]) + 1) for a, b in zip([0, *cuts], [*cuts, len(kept)])]

    def will_need(self, p):
        """Ask the kernel to start reading the rows plan p will want (its readahead, in the background).
        Its own descriptor: the reading thread owns the open files."""
        if p.source is None:
            return
        if p.source in self.packed:  # each kept expert's blocks and scales
            spans = [(name, info, e, e + 1) for _, info, name in self.packed[p.source]
                     for e in self.kept_experts(p.source, p.indices)]
        else:
            spans = [(self.where[p.source], self.header[p.source], lo, hi) for lo, hi in self.row_runs(p.source,
                                                                                                     p.indices)]
        for name, info, lo, hi in spans:
            fd = os.open(os.path.join(self.folder, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, *byte_span(info, lo, hi), os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)

    def read(self, key, indices=()):
        """The tensor `key` with only `indices[d]` kept along dimension d (None, or no `indices`: all). Only the
        rows of row_runs are read from the file; the kept elements are then taken, by a strided slice where they
        are evenly spaced (Algorithm 1 when the sizes divide), else by index. Rows read in several runs are cut
        to their kept elements run by run, then joined."""
        if key in self.packed:
            return self.read_mxfp4(key, indices)
        name, info = self.where[key], self.header[key]
        runs, rows, pieces = self.row_runs(key, indices), indices[0] if indices else None, []
        for lo, hi in runs:
            piece = read_rows(self.file(name), os.path.join(self.folder, name), key, info, lo, hi)
            self.bytes_read += byte_span(info, lo, hi)[1]
            pieces.append(take_rest(piece, indices) if len(runs) > 1 else piece)
        self.keys_read.append(key)
        tensor = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        if rows is not None:  # each kept row's place among the rows read
            starts = torch.tensor([lo for lo, _ in runs])
            run = torch.searchsorted(starts, rows, right=True) - 1
            before = torch.tensor([0, *itertools.accumulate(hi - lo for lo, hi in runs)])[:-1]
            tensor = take(tensor, 0, rows - starts[run] + before[run])
        # one run: its rows first, then the other dimensions, as views where they can be
        return take_rest(tensor, indices) if len(runs) == 1 else tensor

    def read_mxfp4(self, key, indices):
        """An MXFP4 weight, dequantized one kept expert at a time, each cut to its kept elements at once."""
        (blocks, b_info, b_file), (scales, s_info, s_file) = self.packed[key]
        out, experts = None, self.kept_experts(key, indices)
        for k, e in enumerate(experts):
            weight = dequantize_mxfp4(
                read_rows(self.file(b_file), os.path.join(self.folder, b_file), blocks, b_info, e, e + 1)[0],
                read_rows(self.file(s_file), os.path.join(self.folder, s_file), scales, s_info, e, e + 1)[0])
            self.bytes_read += byte_span(b_info, e, e + 1)[1] + byte_span(s_info, e, e + 1)[1]
            weight = take_rest(weight[None], indices)[0]  # one expert: the stack's dimensions after the first
            if out is None:
                out = torch.empty((len(experts), *weight.shape), dtype=weight.dtype)
            out[k] = weight
        self.keys_read.append(key)
        return out

    def kept_experts(self, key, indices):
        """The experts (rows) of `key` that `indices` keeps: indices[0], or all."""
        return (indices[0] if indices and indices[0] is not None else torch.arange(self.header[key][1][0])).tolist()

    def close(self):
        for f in self.fds.values():
            f.close()
        self.fds = {}


# MXFP4 (OCP microscaling): 4-bit e2m1 values, two a byte (low nibble first), each block of 32 scaled by 2^(s - 127)
FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks, scales):
    """One expert's blocks [out, in/32, 16] and scales [out, in/32] (uint8) -> its weight [in, out] in bfloat16,
    exact: an e2m1 value times a power of two, computed in float32, within bfloat16's precision."""
    lut = torch.tensor(FP4_E2M1)
    values = torch.stack([lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]], -1).flatten(-2)  # [out, G, 32]
    values = torch.ldexp(values, scales.to(torch.int32)[..., None] - 127)
    return values.flatten(-2).t().to(torch.bfloat16)


def take(tensor, dim, idx):
    """tensor's slices idx along dim (a view when idx is evenly spaced)."""
    if len(idx) == tensor.shape[dim] and torch.equal(idx, torch.arange(len(idx))):
        return tensor
    if len(idx) > 1 and idx[1] > idx[0] and bool((idx.diff() == idx[1] - idx[0]).all()):
        return tensor.narrow(dim, int(idx[0]), int(idx[-1] - idx[0]) + 1)[
            (slice(None),) * dim + (slice(None, None, int(idx[1] - idx[0])),)]
    return tensor.index_select(dim, idx)


def take_rest(tensor, indices):
    """tensor's kept elements along every dimension but the first (indices[d] for dimension d; None: all)."""
    for dim, idx in enumerate(indices[1:], 1):
        if idx is not None:
            tensor = take(tensor, dim, idx)
    return tensor


def shard_files(folder):
    """Shard file names: model.safetensors, or those of model.safetensors.index.json; checked to exist."""
    index = os.path.join(folder, 'model.safetensors.index.json')
    if os.path.isfile(os.path.join(folder, 'model.safetensors')):  # first, as from_pretrained looks: an index
        files = ['model.safetensors']                                 # beside it (stale) is read by neither
    elif os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)['weight_map']
        except (ValueError, KeyError, TypeError):
            raise UserError(f'{index}: not a safetensors index (no weight_map)') from None
        if not isinstance(weight_map, dict) or not all(isinstance(n, str) and n and os.path.basename(n) == n
                                                       for n in weight_map.values()):
            raise UserError(f'{index}: its weight_map is not a mapping of tensor names to shard file names in '
                            f'the folder, e.g. {{"lm_head.weight": "model-00001-of-00002.safetensors"}}')
        files = sorted(set(weight_map.values()))
    else:
        other = [n for n in os.listdir(folder) if n.endswith(('.bin', '.pt', '.pth'))]
        hint = f' (found {other[0]}: convert it to safetensors first)' if other else ''
        raise UserError(f'{folder} holds no model.safetensors nor model.safetensors.index.json{hint}')
    missing = [n for n in files if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise UserError(f'{folder}: shard {missing[0]} named in model.safetensors.index.json is missing'
                        + (f' (+{len(missing) - 1} more)' if len(missing) > 1 else ''))
    return files


def is_hf_teacher(name):
    return bool(name) and os.path.isfile(os.path.join(name, 'config.json'))


def resolve_teacher(name):
    """A local folder holding config.json; a hub id is downloaded when online."""
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, 'config.json')):
            raise UserError(f'--teacher {name} has no config.json; a Hugging Face teacher is a folder with config.json '
                            f'and model.safetensors (or shards and model.safetensors.index.json)')
        return name
    # a hub id is [org/]name, each part starting and ending with a letter or digit (huggingface_hub's rule), so
    # ./x and ../x are paths
    part = r'\w(?:[\w.-]*\w)?'
    if os.path.exists(name) or not re.fullmatch(f'{part}(/{part})?', name) or '..' in name:
        raise UserError(f'--teacher {name}: not a folder holding config.json and safetensors, nor a hub id')
    return download(name)


def download(repo_id):
    hint = 'pass a local folder holding config.json and the *.safetensors files as --teacher'
    utils.check_hub_reachable(repo_id, hint)
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(f"'{repo_id}' is not a local folder and huggingface_hub is not installed; {hint}") from None
    try:
        # the transformers weights only: '*' would also match a folder's files (gpt-oss's original/*.safetensors)
        return snapshot_download(repo_id, allow_patterns=['config.json', 'model.safetensors', 'model-*.safetensors',
                                                          'model.safetensors.index.json'])
    except Exception as e:  # noqa: BLE001 - any download failure is reported in one line
        raise UserError(f"cannot fetch '{repo_id}' ({type(e).__name__}: {utils.first_line(e)}); {hint}") from None


def read_config(folder):
    path = os.path.join(folder, 'config.json')
    try:
        with open(path) as f:
            config = json.load(f)
    except ValueError as e:
        raise UserError(f'{path} is not valid JSON ({e})') from None
    if not isinstance(config, dict):
        raise UserError(f'{path} is not a JSON object')
    return config
