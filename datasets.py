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
import re
from dataclasses import dataclass

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
FOLDER_DATASETS = ('IMNET', 'image_folder')  # read from folders of image files (ImageFolder), not by torchvision
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')


def check_name(name):
    """UserError for a --data_set that is not one of DATASETS, with the closest names."""
    if name not in DATASETS:
        import difflib
        by_lower = {d.lower(): d for d in DATASETS}  # 'cifar10' is closest to CIFAR10, whatever the case
        close = [by_lower[d] for d in difflib.get_close_matches(name.lower(), by_lower, n=2)]
        raise UserError(f"unknown --data_set '{name}'" + (f"; did you mean {', '.join(close)}?" if close else '')
                        + f" (choose from {', '.join(DATASETS)})")


def rand_augment_policy(args):
    """--aa as timm's policy string, or None where it is off ('none', '' or none)."""
    return args.aa if args.aa not in (None, '', 'none') else None


def check_augment_policy(args):
    """--aa as timm's create_transform will read it (RandAugment 'rand-...', AugMix 'augmix-...', else an
    AutoAugment policy name), parsed now: timm asserts on a bad one, with no message, when the loader is made."""
    policy = rand_augment_policy(args)
    if policy is None:
        return
    from timm.data import auto_augment as aug
    # timm skips a RandAugment section with no digit in it ('incl' for 'inc1': increasing magnitudes silently off)
    sections = policy.split('-')[1:] if policy.split('-')[0] == 'rand' else []
    bad = [s for s in sections if not re.fullmatch(r'(mstd|mmax|inc|m|n|p)\d.*|t.+', s)]
    if bad:
        raise UserError(f"--aa {policy}: '{bad[0]}' is not a RandAugment setting (m<magnitude>, n<layers>, "
                        f"mstd<std>, mmax<max>, inc<0|1>, p<prob>, t<ops>), e.g. rand-m9-mstd0.5-inc1")
    hparams = {'translate_const': 100, 'img_mean': (124, 116, 104)}
    make = (aug.rand_augment_transform if policy.startswith('rand') else
            aug.augment_and_mix_transform if policy.startswith('augmix') else aug.auto_augment_transform)
    try:
        make(policy, hparams)
    except (AssertionError, ValueError, KeyError, IndexError):
        raise UserError(f"--aa {policy}: not a timm augmentation policy (e.g. rand-m9-mstd0.5-inc1, or none for no "
                        f"RandAugment)") from None


def eval_crop_pct(args):
    """The evaluation centre crop's fraction of the resized image: --crop_pct, else ConvNeXt's 224/256 (also for
    checkpoints whose flags hold none)."""
    return args.crop_pct or 224 / 256


def build_dataset(is_train, args):
    """(dataset, number of classes) for args.data_set under args.data_path."""
    name, root = args.data_set, args.data_path
    check_name(name)
    transform = build_transform(is_train, args)
    if name in FOLDER_DATASETS:
        return image_folder(root, is_train, transform, allow_test=name == 'image_folder')
    download, made = bool(args.download), None
    folder = os.path.abspath(root)
    while download and not os.path.exists(folder):  # the outermost folder a download would create
        made, folder = folder, os.path.dirname(folder)
    try:
        return torchvision_dataset(name, root, is_train, transform, download)
    except (RuntimeError, FileNotFoundError, OSError) as e:
        offline = (f"offline, place {name}'s files (torchvision's layout) under --data_path {root} by hand, or "
                   f'train on any local ImageFolder with --data_set image_folder')
        if download:
            if made:  # the folders the failed download made, where it left nothing in them
                for folder, _, _ in sorted(os.walk(made), reverse=True):
                    if not os.listdir(folder):
                        os.rmdir(folder)
            raise UserError(f'cannot download {name} into {root} ({utils.first_line(e)}); {offline}') from None
        raise UserError(f'{name} not found under --data_path {root}; point --data_path at the folder that '
                        f'holds it, pass --download true to let torchvision fetch it, or {offline}') from None


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
        dataset = datasets.ImageFolder(folder, transform=transform, loader=load_image)
    except (FileNotFoundError, RuntimeError) as e:
        raise UserError(f'{folder} holds no images in class folders ({utils.first_line(e, 120)}); '
                        f'expected {folder}/<class>/*.jpg') from None
    if not is_train:
        check_same_classes(os.path.join(root, 'train'), folder, dataset.classes)
    return dataset, len(dataset.classes)


class UnreadableImage(UserError):
    """An image file that cannot be decoded. A DataLoader worker's exception comes back to the main process
    re-created from its whole traceback text (torch's ExceptionWrapper.reraise): keep only our own line."""

    def __init__(self, message):
        if 'Original Traceback' in message:
            message = message.strip().splitlines()[-1].split(': ', 1)[-1]
        super().__init__(message)


def load_image(path):
    """ImageFolder's loader, but a truncated or non-image file is one error line naming the file and the fix."""
    from PIL import Image
    try:
        with open(path, 'rb') as f:
            return Image.open(f).convert('RGB')
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError... for broken files
        detail = type(e).__name__ if path in str(e) else f'{type(e).__name__}: {utils.first_line(e, 120)}'
        raise UnreadableImage(f'cannot read image {path} ({detail}): truncated or not an image; remove or replace '
                              f'it (--check_data true lists every bad one)') from None


def check_images(args):
    """--check_data: decode every image of both splits once, before training; one line listing the bad ones."""
    if args.data_set not in FOLDER_DATASETS:
        utils.print_main(f'--check_data: {args.data_set} is read by torchvision from its own files; nothing to check')
        return
    bad, total = [], 0
    for is_train in (True, False):
        dataset = image_folder(args.data_path, is_train, None, allow_test=args.data_set == 'image_folder')[0]
        for path, _ in dataset.samples:
            total += 1
            try:
                load_image(path).close()
            except UnreadableImage:
                bad.append(path)
    if bad:
        raise UserError(f'--check_data: {len(bad)} of {total} images are unreadable (truncated or not images): '
                        f'{", ".join(bad[:5])}' + (f' (+{len(bad) - 5} more)' if len(bad) > 5 else '')
                        + '; remove or replace them')
    utils.print_main(f'--check_data: all {total} images are readable')


def check_same_classes(train_folder, eval_folder, eval_classes):
    """ImageFolder numbers the classes of each split by their sorted folder names: an evaluation split with a
    class missing or extra would shift every later label and report a wrong accuracy without any error."""
    if not os.path.isdir(train_folder):
        return
    train_classes = datasets.folder.find_classes(train_folder)[0]
    if list(train_classes) == list(eval_classes):
        return
    missing = sorted(set(train_classes) - set(eval_classes))
    extra = sorted(set(eval_classes) - set(train_classes))
    parts = ([f'missing {", ".join(missing[:5])}' + (' ...' if len(missing) > 5 else '')] if missing else []) + \
            ([f'extra {", ".join(extra[:5])}' + (' ...' if len(extra) > 5 else '')] if extra else [])
    raise UserError(f'{eval_folder} has other classes than {train_folder} ({"; ".join(parts)}): labels are numbered '
                    f'by class folder, so they would not match; give both splits the same class folders')


def install_posterize_shim():
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


def mean_std(args):
    return ((IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD) if args.imagenet_default_mean_and_std
            else (IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD))


def build_transform(is_train, args):
    """timm's create_transform at input_size (RandAugment, random erasing; bicubic), or, for inputs of
    32 px or less, the CIFAR path: random crop with padding 4 instead of a random resized crop."""
    install_posterize_shim()
    size = args.input_size
    mean, std = mean_std(args)
    if is_train:
        t = create_transform(input_size=size, is_training=True, color_jitter=args.color_jitter,
                             auto_augment=rand_augment_policy(args),
                             interpolation=args.train_interpolation, re_prob=args.reprob, re_mode=args.remode,
                             re_count=args.recount, mean=mean, std=std)
        if size <= 32:  # small images: no resized crop, but resize any dataset to input_size first
            t.transforms[0] = transforms.Compose([transforms.Resize((size, size)),
                                                  transforms.RandomCrop(size, padding=4)])
        return t
    steps = []
    if size > 32:
        crop_pct = eval_crop_pct(args)
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
        # the CPU generators only: with --num_workers 0 this runs in the training process, whose CUDA generator
        # (drop path) must not be re-seeded by every sample
        utils.seed_everything(((self.seed * 1_000_003 + epoch) * 10_000_019 + index) % (2 ** 63), cuda=False)
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


def set_transform(dataset, transform):
    """Replace the transform of a dataset build_dataset returned (through its Subset/ConcatDataset)."""
    if isinstance(dataset, ConcatDataset):
        for part in dataset.datasets:
            set_transform(part, transform)
    elif isinstance(dataset, Subset):
        set_transform(dataset.dataset, transform)
    else:
        dataset.transform = transform


# ------------------------------------------------------------------------------------ loaders of a run
@dataclass
class EvalPlan:
    """Whether a run evaluates, whether each process evaluates its own shard (summed), and at what batch."""
    wanted: bool
    sharded: bool
    batch_size: int


def eval_plan(args, world_size):
    return EvalPlan(wanted=args.eval or not args.disable_eval, sharded=args.dist_eval and world_size > 1,
                    batch_size=max(args.batch_size, 64))


@dataclass
class Loaders:
    train: object          # a DataLoader over EpochSampler, or gpu_data.GpuLoader
    val: object            # the same kind, or None without evaluation
    num_classes: int
    num_train: int         # training images of the whole dataset
    eval_sharded: bool     # each process evaluates its shard: the engine sums over processes
    how: str               # one line saying where the data is held


def build_loaders(args, device, rank=0, world_size=1):
    """The training and evaluation loaders of a run: the GPU data path where gpu_data.choose takes it,
    else workers decoding and augmenting on the CPU."""
    import gpu_data
    plan = eval_plan(args, world_size)
    step = args.batch_size * world_size
    if gpu_data.choose(args, device):
        train, val, classes, how = gpu_data.build_loaders(args, device, rank, world_size, plan)
        num_train = len(train.labels)
    else:
        train, val, classes, num_train = cpu_loaders(args, device, rank, world_size, plan)
        how = f'CPU loader, {args.num_workers} workers per process'
    if num_train < step:
        raise UserError(f'{num_train} training images are fewer than one global step of {step}; lower --batch_size')
    return Loaders(train, val, classes, num_train, plan.sharded, how)


def cpu_loaders(args, device, rank, world_size, plan):
    train_set, classes = build_dataset(True, args)
    val_set = build_dataset(False, args)[0] if plan.wanted else None
    # One code path for 1 and N processes: a seeded shuffle per epoch, each sample's augmentation
    # seeded by (seed, epoch, index), so that a resumed run sees exactly the same batches.
    num_train = len(train_set)
    train_set = PerSampleSeed(train_set, args.seed)
    sampler = EpochSampler(train_set, num_replicas=world_size, rank=rank, seed=args.seed)
    train = torch.utils.data.DataLoader(train_set, sampler=sampler, batch_size=args.batch_size, drop_last=True,
                                        generator=torch.Generator().manual_seed(args.seed),
                                        num_workers=args.num_workers, pin_memory=args.pin_mem and device.type == 'cuda',
                                        persistent_workers=args.num_workers > 0)
    val = None if val_set is None else \
        eval_dataloader(val_set, args, device, rank, world_size, plan, persistent_workers=args.num_workers > 0)
    return train, val, classes, num_train


def eval_dataloader(val_set, args, device, rank, world_size, plan, persistent_workers=False):
    """The evaluation split's loader: in order, an exact shard per process where the plan shards it (no
    padding duplicates, so the engine's sums over processes count each image once)."""
    if plan.sharded:
        val_set = rank_share(val_set, rank, world_size)
    return torch.utils.data.DataLoader(val_set, batch_size=plan.batch_size, shuffle=False,
                                       num_workers=args.num_workers, pin_memory=args.pin_mem and device.type == 'cuda',
                                       persistent_workers=persistent_workers)


def eval_loader(args, device, rank=0, world_size=1):
    """(loader, number of classes, sharded) of the evaluation split alone (--eval: no training data needed)."""
    plan = eval_plan(args, world_size)
    val_set, classes = build_dataset(False, args)
    return eval_dataloader(val_set, args, device, rank, world_size, plan), classes, plan.sharded


def knn_sets(args):
    """(training split, test split, number of classes) for --knn_probe, both with the evaluation transform."""
    train_set, classes = build_dataset(True, args)
    set_transform(train_set, build_transform(False, args))
    return train_set, build_dataset(False, args)[0], classes


def rank_share(dataset, rank, world_size):
    """This process's share of `dataset` for evaluation, in order: every world_size-th image from the rank's
    own (as gpu_data's evaluation loader takes them). No padding, unlike DistributedSampler: the shares of all
    processes hold each image once."""
    return dataset if world_size == 1 else Subset(dataset, range(rank, len(dataset), world_size))
