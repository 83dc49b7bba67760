"""The GPU data path (--gpu_data): a dataset decoded once to uint8, held on the device, and augmented there
in batches by gpu_transforms.py with the recipe's transforms.

decode_to_uint8 stores a split; GpuLoader yields its batches (the CPU loader's per-epoch shuffle and
per-process share, seeded per batch so that mid-epoch resume is exact); fits / train_transform decide
whether --gpu_data auto can use it.
"""
import functools

import torch
from torchvision import datasets, transforms

from datasets import (EpochSampler, build_dataset, eval_crop_pct, eval_plan, load_image, mean_std,
                      rand_augment_policy, set_transform)
import utils
from utils import UserError

NATIVE_SIDE = {'CIFAR10': 32, 'CIFAR100': 32, 'svhn': 32, 'stl10': 96, 'eurosat': 64}  # one size per dataset
_RAW = {}


def raw_dataset(is_train, args):
    """The split as build_dataset returns it, without transforms (PIL images); built once per process
    (--gpu_data auto counts an image folder's files, then the GPU path decodes them)."""
    from types import SimpleNamespace
    key = (is_train, args.data_set, args.data_path)
    if key not in _RAW:
        no_transform = SimpleNamespace(**{**vars(args), 'input_size': 32, 'aa': None, 'reprob': 0})
        dataset, classes = build_dataset(is_train, no_transform)
        set_transform(dataset, None)
        _RAW[key] = dataset, classes
    return _RAW[key]


def gpu_side(args):
    """The short side to which --gpu_data resizes datasets of varied image sizes."""
    return args.gpu_data_size or int(args.input_size / eval_crop_pct(args))


def _array_of(dataset):
    """The uint8 (N, 3, H, W) array and labels torchvision already holds in memory, or None."""
    import numpy as np
    if isinstance(dataset, (datasets.CIFAR10, datasets.CIFAR100)):
        return torch.from_numpy(np.ascontiguousarray(dataset.data.transpose(0, 3, 1, 2))), torch.tensor(dataset.targets)
    if isinstance(dataset, (datasets.SVHN, datasets.STL10)):
        return torch.from_numpy(np.ascontiguousarray(dataset.data)), torch.as_tensor(dataset.labels).long()
    return None


def _image_sizes(dataset):
    """(width, height) of every image of an ImageFolder, read from the file headers (once per process: the
    choice of a pre-crop side and the decoding both ask, and a benchmark builds its loaders twice)."""
    return _sizes_of(tuple(path for path, _ in dataset.samples))


@functools.lru_cache(maxsize=8)  # each split's, and its first image's (least_bytes)
def _sizes_of(paths):
    from PIL import Image
    sizes = set()
    for path in paths:
        try:
            with Image.open(path) as im:
                sizes.add(im.size)
        except Exception:  # noqa: BLE001 - the loader's error names the file and the fix
            load_image(path)
            raise
    return frozenset(sizes)


class _ToFixedUint8:
    """PIL image -> uint8 (3, S, S): unchanged if already S x S, else the short side resized to S
    (bicubic, antialiased) and centre-cropped; with S None, the image at its own size."""

    def __init__(self, side):
        self.side = side

    def __call__(self, img):
        img = img.convert('RGB')
        if self.side is not None and img.size != (self.side, self.side):
            img = transforms.CenterCrop(self.side)(transforms.Resize(self.side, transforms.InterpolationMode.BICUBIC)(img))
        return transforms.functional.pil_to_tensor(img)


def decode_to_uint8(is_train, args):
    """(images uint8 (N, 3, H, W) on the CPU, labels (N,), number of classes, how they were stored).
    Datasets of one image size keep their native resolution; others are resized once to a short side of
    --gpu_data_size (default input_size / crop_pct) and centre-cropped to a square."""
    dataset, classes = raw_dataset(is_train, args)
    held = _array_of(dataset)
    if held is not None:
        return held[0], held[1], classes, 'native resolution'
    side = None
    if args.data_set not in NATIVE_SIDE:
        sizes = _image_sizes(dataset) if isinstance(dataset, datasets.ImageFolder) else {None, 'varied'}
        if len(sizes) > 1:
            side = gpu_side(args)
    decode = _ToFixedUint8(side)
    loader = torch.utils.data.DataLoader(_Mapped(dataset, decode), batch_size=256, shuffle=False,
                                         num_workers=args.num_workers)
    images, labels = [], []
    for x, y in loader:
        images.append(x)
        labels.append(y)
    how = 'native resolution' if side is None else f'short side resized to {side}, centre-cropped'
    return torch.cat(images), torch.cat(labels).long(), classes, how


class _Mapped(torch.utils.data.Dataset):
    def __init__(self, dataset, fn):
        self.dataset, self.fn = dataset, fn

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        img, label = self.dataset[i]
        return self.fn(img), label


class GpuLoader:
    """Batches of a uint8 image tensor resident on the device, transformed on the device.

    Training: the same per-epoch shuffle and per-process share as EpochSampler (drop_last), and batch k of
    an epoch augmented with a generator seeded by (seed, epoch, rank, k): a run resumed mid-epoch sees the
    batches an uninterrupted one sees. Evaluation: this process's shard in order, every image once."""

    def __init__(self, images, labels, batch_size, transform, *, train, seed=0, rank=0, world_size=1,
                 channels_last=False):
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.transform, self.train, self.seed, self.rank = transform, train, seed, rank
        self.channels_last = channels_last
        if train:
            self.sampler = EpochSampler(range(len(labels)), num_replicas=world_size, rank=rank, seed=seed)
        else:
            self.order = torch.arange(rank, len(labels), world_size, device=labels.device)

    def __len__(self):
        if self.train:
            return len(self.sampler) // self.batch_size
        return (len(self.order) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        device = self.images.device
        if not self.train:
            for start in range(0, len(self.order), self.batch_size):
                idx = self.order[start:start + self.batch_size]
                yield self._layout(self.transform(self.images[idx])), self.labels[idx]
            return
        n = len(self.labels)
        order = torch.tensor(list(iter(self.sampler)), dtype=torch.long).remainder_(n).to(device)  # once per epoch
        epoch, first = self.sampler.epoch, self.sampler.skip // self.batch_size
        for k in range(len(order) // self.batch_size):
            idx = order[k * self.batch_size:(k + 1) * self.batch_size]
            seed = (((self.seed * 1_000_003 + epoch) * 1_009 + self.rank) * 10_000_019 + first + k) % (2 ** 64)
            yield self._layout(self.transform(self.images[idx], seed)), self.labels[idx]

    def _layout(self, x):
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


# (training, evaluation) images per dataset, as datasets.py splits them; image folders are counted. IMNET is
# ImageNet-1K by the table: counting its folders would scan 1.33M files on every rank of every run only to
# decline the GPU path (a subset in the same layout is --data_set image_folder, which is counted)
IMAGES = {'CIFAR10': (50_000, 10_000), 'CIFAR100': (50_000, 10_000), 'flowers': (2_040, 6_149),
          'pets': (3_680, 3_669), 'stl10': (5_000, 8_000), 'food101': (75_750, 25_250), 'dtd': (3_760, 1_880),
          'svhn': (73_257, 26_032), 'eurosat': (21_600, 5_400), 'IMNET': (1_281_167, 50_000)}
# Datasets whose images differ in size: the GPU path stores them pre-cropped to a square of gpu_side, so
# its random resized crops see less of each image than the CPU path's do.
VARIED_SIZES = ('flowers', 'pets', 'food101', 'dtd', 'IMNET')


def stored_bytes(args):
    """The bytes of the splits build_loaders stores (the training split, and the evaluation split unless
    evaluation is off), as decode_to_uint8 stores them: uint8 RGB. A named dataset: its IMAGES counts at its
    native side, or at gpu_side where its sizes vary (read from the table, not the files). An image folder, split
    by split: at its images' one size (kept as it is, however large), else at gpu_side."""
    if args.data_set != 'image_folder':
        side = NATIVE_SIDE.get(args.data_set) or gpu_side(args)
        return sum(IMAGES[args.data_set][0 if is_train else 1] for is_train in _splits(args)) * 3 * side * side
    total = 0
    for is_train in _splits(args):
        dataset = raw_dataset(is_train, args)[0]
        sizes = _image_sizes(dataset)
        width, height = next(iter(sizes)) if len(sizes) == 1 else (gpu_side(args),) * 2
        total += len(dataset) * 3 * width * height
    return total


def _splits(args):
    """The splits build_loaders stores, as is_train values: the evaluation split only when evaluation is on."""
    return (True, False) if eval_plan(args, 1).wanted else (True,)


def least_bytes(args):
    """A lower bound of stored_bytes that reads one image header per split, not all of them: a folder far too
    large is declined at once (stored_bytes reads every header, minutes for an ImageNet-sized folder)."""
    if args.data_set != 'image_folder':
        return stored_bytes(args)
    total = 0
    for is_train in _splits(args):
        dataset = raw_dataset(is_train, args)[0]
        (width, height), = _sizes_of((dataset.samples[0][0],))  # the first image's header
        # stored at its one size, or at gpu_side squares: at least the smaller of the two per image
        total += len(dataset) * 3 * min(width * height, gpu_side(args) ** 2)
    return total


def fits(args, device):
    """Whether the splits, as stored (stored_bytes), take at most half of the device's free memory, on every
    process's device (so that all take the same path): the default of --gpu_data auto."""
    if device.type != 'cuda':
        return False
    room = torch.cuda.mem_get_info(device)[0] // 2
    return utils.on_every_rank(bytes_to_store(args, room) <= room, device)


def bytes_to_store(args, room):
    """least_bytes where that is already more than `room` (a folder far too large is declined without reading
    every header), else stored_bytes."""
    least = least_bytes(args)
    return least if least > room else stored_bytes(args)


def varied_sizes(args):
    """Whether the dataset's images differ in size (then the GPU path changes the recipe's crops)."""
    if args.data_set == 'image_folder':
        return len(_image_sizes(raw_dataset(True, args)[0])) > 1
    return args.data_set in VARIED_SIZES


def train_transform(args):
    """The GPU path's training transform; ValueError names a setting it does not implement."""
    import gpu_transforms
    if rand_augment_policy(args) is None and args.color_jitter:
        # timm applies colour jitter only without RandAugment; the GPU path has no colour jitter
        raise ValueError(f'--color_jitter {args.color_jitter} with --aa none is not implemented on the GPU '
                         f'data path; pass --color_jitter 0 or --gpu_data false')
    return gpu_transforms.GpuTrainTransform(args.input_size, *mean_std(args), aa=rand_augment_policy(args),
                                            interpolation=args.train_interpolation, reprob=args.reprob,
                                            remode=args.remode, recount=args.recount)


def choose(args, device):
    """Whether to use the GPU path, printing why not where --gpu_data auto declines it. auto takes it only
    on CUDA, when the data fits, when the recipe's transforms are implemented, and when it reproduces the
    CPU path's crops; --gpu_data true takes it where it runs at all, and says what differs."""
    if args.gpu_data == 'false':
        return False
    if args.gpu_data == 'true' and device.type == 'cuda' and not fits(args, device):
        room = torch.cuda.mem_get_info(device)[0] // 2
        need = bytes_to_store(args, room)
        bound = args.data_set == 'image_folder' and need == least_bytes(args)  # a named dataset's count is exact
        size = ('at least ' if bound else '') + f'{need / 2 ** 20:,.1f} MiB'
        subset = '; IMNET is sized as all of ImageNet-1K: for a subset pass --data_set image_folder' \
            if args.data_set == 'IMNET' else ''
        raise UserError(f'--gpu_data true: {args.data_set} ({size} as uint8) does '
                        f'not fit in half of the free GPU memory; pass --gpu_data false (or, where its image sizes '
                        f'vary, a smaller --gpu_data_size){subset}')
    if args.gpu_data == 'auto' and not fits(args, device):
        return False
    try:
        train_transform(args)
    except ValueError as e:
        if args.gpu_data == 'true':
            raise UserError(str(e)) from None
        utils.print_main(f'--gpu_data auto: using the CPU loader ({e})')
        return False
    if varied_sizes(args):
        if args.gpu_data == 'auto':
            utils.print_main(f'--gpu_data auto: using the CPU loader ({args.data_set} has images of varied sizes, '
                             f'which the GPU path pre-crops to {gpu_side(args)} px squares; --gpu_data true to use '
                             f'it anyway)')
            return False
        utils.print_main(f'--gpu_data true: {args.data_set} images are pre-cropped to {gpu_side(args)} px squares '
                         f'before the random resized crop, which the CPU path takes from the whole image')
    return True


def build_loaders(args, device, rank, world_size, plan):
    """(train loader, eval loader or None, number of classes, a line saying how the data is held).
    `plan` is datasets.EvalPlan: whether to evaluate, sharded or not, at which batch size."""
    import gpu_transforms
    try:
        train_tf = train_transform(args)
    except ValueError as e:
        raise UserError(str(e)) from None
    images, labels, classes, how = decode_to_uint8(True, args)
    total = images.numel()
    train = GpuLoader(images.to(device), labels.to(device), args.batch_size, train_tf, train=True, seed=args.seed,
                      rank=rank, world_size=world_size, channels_last=args.channels_last)
    val = None
    if plan.wanted:
        v_images, v_labels, _, _ = decode_to_uint8(False, args)
        total += v_images.numel()
        eval_tf = gpu_transforms.GpuEvalTransform(args.input_size, *mean_std(args), eval_crop_pct(args))
        val = GpuLoader(v_images.to(device), v_labels.to(device), plan.batch_size, eval_tf, train=False,
                        rank=rank if plan.sharded else 0, world_size=world_size if plan.sharded else 1,
                        channels_last=args.channels_last)
    return train, val, classes, f'GPU data path: {total / 2 ** 30:.2f} GiB of uint8 images on {device} ({how})'
