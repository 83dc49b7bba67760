"""The paper's datasets (Section 4.1) and transforms (ConvNeXt's recipe, Appendix A).

Splits (train -> evaluated on):
  CIFAR10, CIFAR100  train (50k) -> test (10k)
  flowers            Flowers102 train + val (2,040) -> test (6,149)
  pets               OxfordIIITPet trainval (3,680) -> test (3,669)
  stl10              STL10 train (5k labelled; no unlabelled) -> test (8k)
  food101            Food101 train (75,750) -> test (25,250)
  dtd                DTD partition 1, train + val (3,760) -> test (1,880)
  svhn               SVHN train (73,257; without `extra`) -> test (26,032)
  eurosat            EuroSAT (no official split): per class, a seeded (seed 0) 80% -> the other 20%
  IMNET              ImageFolder DATA_PATH/train -> DATA_PATH/val
  image_folder       ImageFolder DATA_PATH/train -> DATA_PATH/val (or DATA_PATH/test); classes from folders
"""
import os

import torch
from torch.utils.data import ConcatDataset, Subset
from torchvision import datasets, transforms
from timm.data import create_transform
from timm.data.constants import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN,
                                 IMAGENET_INCEPTION_STD)

import utils
from utils import UserError

DATASETS = ('CIFAR10', 'CIFAR100', 'flowers', 'pets', 'stl10', 'food101', 'dtd', 'svhn', 'eurosat',
            'IMNET', 'image_folder')
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')


def build_dataset(is_train, args):
    """(dataset, number of classes) for args.data_set under args.data_path."""
    name, root = args.data_set, args.data_path
    if name not in DATASETS:
        import difflib
        close = difflib.get_close_matches(name, DATASETS, n=2)
        raise UserError(f"unknown --data_set '{name}'" + (f"; did you mean {', '.join(close)}?" if close else '')
                        + f" (choose from {', '.join(DATASETS)})")
    transform = build_transform(is_train, args)
    if name in ('IMNET', 'image_folder'):
        return image_folder(root, is_train, transform, allow_test=name == 'image_folder')
    download = bool(getattr(args, 'download', False))
    try:
        return torchvision_dataset(name, root, is_train, transform, download)
    except (RuntimeError, FileNotFoundError, OSError) as e:
        if download:
            raise UserError(f'cannot download {name} into {root}: {str(e).splitlines()[0][:200]}') from None
        raise UserError(f'{name} not found under --data_path {root}; point --data_path at the folder that '
                        f'holds it, or pass --download true to let torchvision fetch it') from None


def torchvision_dataset(name, root, is_train, transform, download):
    split = 'train' if is_train else 'test'
    if name in ('CIFAR10', 'CIFAR100'):
        cls = datasets.CIFAR10 if name == 'CIFAR10' else datasets.CIFAR100
        return cls(root, train=is_train, transform=transform, download=download), 10 if name == 'CIFAR10' else 100
    if name == 'flowers':
        if is_train:
            parts = [datasets.Flowers102(root, split=s, transform=transform, download=download) for s in ('train', 'val')]
            return ConcatDataset(parts), 102
        return datasets.Flowers102(root, split='test', transform=transform, download=download), 102
    if name == 'pets':
        return datasets.OxfordIIITPet(root, split='trainval' if is_train else 'test', transform=transform,
                                      download=download), 37
    if name == 'stl10':
        return datasets.STL10(root, split=split, transform=transform, download=download), 10
    if name == 'food101':
        return datasets.Food101(root, split=split, transform=transform, download=download), 101
    if name == 'dtd':
        if is_train:
            parts = [datasets.DTD(root, split=s, partition=1, transform=transform, download=download) for s in ('train', 'val')]
            return ConcatDataset(parts), 47
        return datasets.DTD(root, split='test', partition=1, transform=transform, download=download), 47
    if name == 'svhn':
        return datasets.SVHN(root, split=split, transform=transform, download=download), 10
    if name == 'eurosat':
        full = datasets.EuroSAT(root, transform=transform, download=download)
        return Subset(full, eurosat_split(full.targets, is_train)), 10
    raise AssertionError(name)


def eurosat_split(targets, is_train, train_fraction=0.8, seed=0):
    """Per class, a fixed random 80% for training and the rest for testing."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.as_tensor(targets)
    chosen = []
    for c in targets.unique().tolist():
        idx = (targets == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        cut = int(round(train_fraction * len(idx)))
        chosen += (idx[:cut] if is_train else idx[cut:]).tolist()
    return sorted(chosen)


def image_folder(root, is_train, transform, allow_test):
    if not root or not os.path.isdir(root):
        raise UserError(f'--data_path {root!r} is not a folder; expected DATA_PATH/train/<class>/*.jpg and '
                        f'DATA_PATH/val/<class>/*.jpg' + (' (or test/)' if allow_test else ''))
    candidates = ['train'] if is_train else (['val', 'test'] if allow_test else ['val'])
    folder = next((os.path.join(root, c) for c in candidates if os.path.isdir(os.path.join(root, c))), None)
    if folder is None:
        raise UserError(f"--data_path {root} has no {' or '.join(c + '/' for c in candidates)} folder; expected "
                        f"DATA_PATH/{candidates[0]}/<class>/*.jpg")
    try:
        dataset = datasets.ImageFolder(folder, transform=transform)
    except (FileNotFoundError, RuntimeError) as e:
        raise UserError(f'{folder} holds no images in class folders ({str(e).splitlines()[0][:120]}); '
                        f'expected {folder}/<class>/*.jpg') from None
    return dataset, len(dataset.classes)


def _posterize_keeping_zero_bits():
    """timm's RandAugment 'PosterizeIncreasing' at full magnitude keeps 0 bits; Pillow < 13 turned that
    into a black image, Pillow 13 raises "bits must be between or equal to 1 and 8". Keep the old
    meaning so the recipe runs with either Pillow."""
    from timm.data import auto_augment

    original = auto_augment.posterize
    if getattr(original, 'keeps_zero_bits', False):
        return

    def posterize(img, bits_to_keep, **kwargs):
        if bits_to_keep <= 0:
            return img.point([0] * 256 * len(img.getbands()))
        return original(img, bits_to_keep, **kwargs)

    posterize.keeps_zero_bits = True
    auto_augment.posterize = posterize
    for name, fn in list(auto_augment.NAME_TO_OP.items()):
        if fn is original:
            auto_augment.NAME_TO_OP[name] = posterize


_posterize_keeping_zero_bits()


def _mean_std(args):
    return ((IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD) if args.imagenet_default_mean_and_std
            else (IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD))


def build_transform(is_train, args):
    """timm's create_transform at input_size (RandAugment, random erasing; bicubic), or, for inputs of
    32 px or less, the CIFAR path: random crop with padding 4 instead of a random resized crop."""
    size = args.input_size
    mean, std = _mean_std(args)
    if is_train:
        t = create_transform(input_size=size, is_training=True, color_jitter=args.color_jitter,
                             auto_augment=args.aa if args.aa not in (None, '', 'none') else None,
                             interpolation=args.train_interpolation, re_prob=args.reprob, re_mode=args.remode,
                             re_count=args.recount, mean=mean, std=std)
        if size <= 32:  # small images: no resized crop, but resize any dataset to input_size first
            t.transforms[0] = transforms.Compose([transforms.Resize((size, size)),
                                                  transforms.RandomCrop(size, padding=4)])
        return t
    steps = []
    if size > 32:
        crop_pct = args.crop_pct if args.crop_pct else 224 / 256
        if size >= 384:
            steps.append(transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BICUBIC))
        else:
            steps += [transforms.Resize(int(size / crop_pct), interpolation=transforms.InterpolationMode.BICUBIC),
                      transforms.CenterCrop(size)]
    else:
        steps.append(transforms.Resize((size, size)))
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    return transforms.Compose(steps)


class PerSampleSeed(torch.utils.data.Dataset):
    """Each sample's augmentation draws its randomness from (seed, epoch, index) alone, never from the
    order in which workers happen to load samples. A run resumed in the middle of an epoch, with any
    number of workers or processes, then sees exactly the images an uninterrupted run sees.

    Keys are `epoch * len(dataset) + index`, as EpochSampler yields them, so persistent workers need no
    message about the epoch. The caller's random states are restored after each sample."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = divmod(int(key), len(self.dataset))
        saved = utils.rng_state(cuda=False)
        utils.seed_everything(((self.seed * 1_000_003 + epoch) * 10_000_019 + index) % (2 ** 63))
        try:
            return self.dataset[index]
        finally:
            utils.set_rng_state(saved)


class EpochSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler (a seeded shuffle per epoch, this process's share) that yields PerSampleSeed
    keys and can skip the samples of optimizer steps already done (mid-epoch resume)."""

    def __init__(self, dataset, num_replicas, rank, seed):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def set_epoch(self, epoch, skip=0):
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        n = len(self.dataset)
        return iter([self.epoch * n + i for i in list(super().__iter__())[self.skip:]])

    def __len__(self):
        return self.num_samples - self.skip


# ------------------------------------------------------------------------------------ the GPU data path
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
    return args.gpu_data_size or int(args.input_size / (args.crop_pct or 224 / 256))


def set_transform(dataset, transform):
    """Replace the transform of a dataset build_dataset returned (through its Subset/ConcatDataset)."""
    if isinstance(dataset, ConcatDataset):
        for part in dataset.datasets:
            set_transform(part, transform)
    elif isinstance(dataset, Subset):
        set_transform(dataset.dataset, transform)
    else:
        dataset.transform = transform


def _array_of(dataset):
    """The uint8 (N, 3, H, W) array and labels torchvision already holds in memory, or None."""
    import numpy as np
    if isinstance(dataset, (datasets.CIFAR10, datasets.CIFAR100)):
        return torch.from_numpy(np.ascontiguousarray(dataset.data.transpose(0, 3, 1, 2))), torch.tensor(dataset.targets)
    if isinstance(dataset, (datasets.SVHN, datasets.STL10)):
        return torch.from_numpy(np.ascontiguousarray(dataset.data)), torch.as_tensor(dataset.labels).long()
    return None


def _image_sizes(dataset):
    """(width, height) of every image of an ImageFolder, read from the file headers."""
    from PIL import Image
    sizes = set()
    for path, _ in dataset.samples:
        with Image.open(path) as im:
            sizes.add(im.size)
    return sizes


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
        self.dataset = labels  # len(loader.dataset): the number of images
        self.sharded = world_size > 1
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
            seed = ((self.seed * 1_000_003 + epoch) * 1_009 + self.rank) * 10_000_019 + first + k
            yield self._layout(self.transform(self.images[idx], seed)), self.labels[idx]

    def _layout(self, x):
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


# train + test images per dataset (the table above); image folders are counted
IMAGES = {'CIFAR10': 60_000, 'CIFAR100': 60_000, 'flowers': 8_189, 'pets': 7_349, 'stl10': 13_000,
          'food101': 101_000, 'dtd': 5_640, 'svhn': 99_289, 'eurosat': 27_000, 'IMNET': 1_331_167}


def gpu_data_fits(args, device):
    """Whether both splits, as uint8 squares of their native side (or gpu_side), take at most half of the
    device's free memory: the default of --gpu_data auto."""
    if device.type != 'cuda':
        return False
    side = NATIVE_SIDE.get(args.data_set) or gpu_side(args)
    count = IMAGES.get(args.data_set) or sum(len(raw_dataset(is_train, args)[0]) for is_train in (True, False))
    free, _ = torch.cuda.mem_get_info(device)
    return count * 3 * side * side <= free // 2


def gpu_train_transform(args):
    """The GPU path's training transform; ValueError names a setting it does not implement."""
    import gpu_transforms
    return gpu_transforms.GpuTrainTransform(args.input_size, *_mean_std(args), aa=args.aa,
                                            interpolation=args.train_interpolation, reprob=args.reprob,
                                            remode=args.remode, recount=args.recount)


def build_gpu_loaders(args, device):
    """(train loader, eval loader or None, a line saying how the data is held) for --gpu_data."""
    import gpu_transforms
    mean, std = _mean_std(args)
    try:
        train_tf = gpu_train_transform(args)
    except ValueError as e:
        raise UserError(str(e)) from None
    images, labels, args.nb_classes, how = decode_to_uint8(True, args)
    total = images.numel()
    train = GpuLoader(images.to(device), labels.to(device), args.batch_size, train_tf, train=True, seed=args.seed,
                      rank=args.rank, world_size=args.world_size, channels_last=args.channels_last)
    val = None
    if not (args.disable_eval and not args.eval):
        v_images, v_labels, _, _ = decode_to_uint8(False, args)
        total += v_images.numel()
        sharded = args.dist_eval and args.world_size > 1
        val = GpuLoader(v_images.to(device), v_labels.to(device), max(args.batch_size, 64),
                        gpu_transforms.GpuEvalTransform(args.input_size, mean, std, args.crop_pct), train=False,
                        rank=args.rank if sharded else 0, world_size=args.world_size if sharded else 1,
                        channels_last=args.channels_last)
    return train, val, f'GPU data path: {total / 2 ** 30:.2f} GiB of uint8 images on {device} ({how})'
