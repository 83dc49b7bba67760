"""The recipe's image transforms (datasets.build_transform) on batches of uint8 images that already live on
the GPU (or any torch device). Each sample draws its own crop, flip, RandAugment ops and magnitudes and
erasing box; a batch's draws come from one seed (a device generator for crops, flips and erasing, a host
generator for RandAugment's op choices, so that each op group runs on its own samples only, gathered by
indices the host already knows). No per-sample Python loop, no host synchronisation, and a batch's
augmentation depends only on its seed (exact resume).

Parity with the CPU path (PIL + timm), bounded in tests/test_gpu_data.py:
- resize, resized crop, crop with padding, flip: PIL's separable filters (bicubic a=-0.5, bilinear;
  antialiased when shrinking; the window clamped to the crop box, as after torchvision's crop) written as
  per-sample matrices, rounded to uint8 after the horizontal and the vertical pass as PIL does: within 1 level;
- RandAugment's colour ops (AutoContrast, Equalize, Invert, Posterize, Solarize, SolarizeAdd, Color,
  Contrast, Brightness, Sharpness): PIL's lookup tables and truncating blends: identical on the test images;
- its geometric ops (Rotate, ShearX/Y, TranslateX/YRel): PIL's affine maps and fill, sampled with
  grid_sample's bicubic (a=-0.75) instead of PIL's (a=-0.5): mean difference about 0.7 levels, at most 4;
- random erasing: timm's 'pixel' mode (same box distribution, per-pixel normal values).
Values stay integers in [0, 255] (held as float32) until normalization, as PIL's uint8 images are.
"""
import math

import torch
import torch.nn.functional as F

# timm's RandAugment op set for 'inc1' (_RAND_INCREASING_TRANSFORMS), in its order.
RAND_OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing', 'SolarizeIncreasing',
            'SolarizeAdd', 'ColorIncreasing', 'ContrastIncreasing', 'BrightnessIncreasing', 'SharpnessIncreasing',
            'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')
LUT_OPS = ('AutoContrast', 'Equalize', 'Invert', 'PosterizeIncreasing', 'SolarizeIncreasing', 'SolarizeAdd')
BLEND_OPS = ('ColorIncreasing', 'ContrastIncreasing', 'BrightnessIncreasing', 'SharpnessIncreasing')
GEOMETRIC_OPS = ('Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')


# ---------------------------------------------------------------------------------------------- resampling
def _bicubic(x, a=-0.5):  # PIL's cubic convolution kernel
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((x - 5) * x + 8) * x * a - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def _triangle(x):
    return (1 - x.abs()).clamp(min=0)


FILTERS = {'bicubic': (_bicubic, 2.0), 'bilinear': (_triangle, 1.0)}


def resample_matrix(start, length, in_size, out_size, interpolation='bicubic'):
    """Per sample (B,), the (out_size, in_size) matrix of PIL's resize of the pixels [start, start+length)
    of an axis to out_size pixels: pixel-centre mapping, the filter stretched by the scale when shrinking,
    each output's window clamped to the box, weights normalised."""
    kernel, support = FILTERS[interpolation]
    start = start.to(torch.float64)[:, None, None]
    length = length.to(torch.float64)[:, None, None]
    scale = length / out_size
    stretch = scale.clamp(min=1.0)
    device = start.device
    centre = (torch.arange(out_size, device=device, dtype=torch.float64)[None, :, None] + 0.5) * scale
    j = torch.arange(in_size, device=device, dtype=torch.float64)[None, None, :] - start  # within the box
    reach = support * stretch
    lo = torch.trunc(centre - reach + 0.5).clamp(min=0)
    hi = torch.minimum(torch.trunc(centre + reach + 0.5), length)
    weights = kernel((j - centre + 0.5) / stretch) * ((j >= lo) & (j < hi))
    total = weights.sum(-1, keepdim=True)
    return (weights / torch.where(total == 0, torch.ones_like(total), total)).to(torch.float32)


def to_uint8_range(x):
    """Round half up and clip, as PIL stores each 8-bit result."""
    return torch.floor(x + 0.5).clamp_(0, 255)


def apply_resample(images, rows, cols):
    """images (B, C, H, W) -> (B, C, out_h, out_w) with per-sample row (B, out_h, H) and column
    (B, out_w, W) matrices; horizontal pass first, rounded in between, as PIL does."""
    x = to_uint8_range(torch.einsum('bchw,bow->bcho', images.float(), cols))
    return to_uint8_range(torch.einsum('bph,bcho->bcpo', rows, x))


def _uniform(g, shape, low, high, device):
    return torch.rand(shape, generator=g, device=device) * (high - low) + low


def _randint_inclusive(g, high, device):
    """Per element, an integer in [0, high] (high a tensor), like random.randint(0, high)."""
    return torch.floor(torch.rand(high.shape, generator=g, device=device) * (high + 1)).clamp(max=high)


def resized_crop_params(g, n, height, width, device, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """timm/torchvision RandomResizedCrop.get_params for n samples: (top, left, h, w) tensors. Ten attempts
    each; a sample with none valid takes the centre crop of the clamped aspect ratio."""
    area = height * width
    target = _uniform(g, (n, 10), *scale, device) * area
    aspect = torch.exp(_uniform(g, (n, 10), math.log(ratio[0]), math.log(ratio[1]), device))
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    valid = (w <= width) & (h <= height) & (w >= 1) & (h >= 1)
    first = torch.where(valid.any(1), valid.float().argmax(1), torch.full((n,), -1, device=device))
    pick = first.clamp(min=0)[:, None]
    w, h = w.gather(1, pick)[:, 0], h.gather(1, pick)[:, 0]
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fw, fh = round(height * max(ratio)), height
    else:
        fw, fh = width, height
    ok = first >= 0
    w = torch.where(ok, w, torch.full_like(w, fw))
    h = torch.where(ok, h, torch.full_like(h, fh))
    top = torch.where(ok, _randint_inclusive(g, height - h, device), torch.floor((height - h) / 2))
    left = torch.where(ok, _randint_inclusive(g, width - w, device), torch.floor((width - w) / 2))
    return top, left, h, w


def flip_columns(cols, flip):
    """Mirror the output columns of the samples where flip (B,) is true."""
    return torch.where(flip[:, None, None], cols.flip(1), cols)


def shift_matrix(offset, in_size, out_size):
    """out[o] = in[o + offset] where that is inside the axis, else 0 (a crop of a zero-padded image)."""
    o = torch.arange(out_size, device=offset.device)[None, :, None]
    i = torch.arange(in_size, device=offset.device)[None, None, :]
    return (i == o + offset.long()[:, None, None]).float()


# ------------------------------------------------------------------------------------------- RandAugment
def _gray(x):
    """PIL's convert('L'): (R*19595 + G*38470 + B*7471 + 2**15) >> 16, exact in float32."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return torch.floor((r * 19595 + g * 38470 + b * 7471 + 32768) / 65536)


def _blend(degenerate, x, factor):
    """PIL's Image.blend(degenerate, x, factor) on 8-bit images: clipped, then truncated."""
    return torch.trunc((degenerate + factor * (x - degenerate)).clamp(0, 255))


def _smooth(x):
    """PIL's ImageFilter.SMOOTH (3x3 kernel [1 1 1; 1 5 1; 1 1 1] / 13), border pixels unchanged."""
    # a sum of shifted views, not conv2d: exact in float32 for 8-bit values (13 x 255), and free of cuDNN's
    # TF32 and of its autotuning for every new number of samples that chose this op
    h, w = x.shape[-2:]
    total = sum(x[:, :, i:i + h - 2, j:j + w - 2] for i in range(3) for j in range(3)) + 4 * x[:, :, 1:-1, 1:-1]
    inner = to_uint8_range(total / 13)
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = inner
    return out


def _lookup_tables(x, op, level):
    """Per sample and channel, the 256-entry table of the LUT op `op` (names of LUT_OPS; identity for
    other ops), as PIL's ImageOps builds it."""
    b, c = x.shape[:2]
    device = x.device
    v = torch.arange(256, device=device, dtype=torch.float64).expand(b, c, 256)
    flat = x.reshape(b, c, -1)
    # AutoContrast (cutoff 0): stretch [lo, hi] to [0, 255]; int() truncation
    lo = flat.amin(-1, keepdim=True).double()
    hi = flat.amax(-1, keepdim=True).double()
    scale = 255.0 / torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    auto = torch.where(hi > lo, torch.trunc(v * scale - lo * scale).clamp(0, 255), v)
    # Equalize: PIL's cumulative-histogram table
    # one flat histogram: scatter_add_ into a 1-D tensor also has a deterministic CUDA kernel in older torch
    bins = (flat.long() + torch.arange(b * c, device=device).view(b, c, 1) * 256).flatten()
    hist = torch.zeros(b * c * 256, device=device, dtype=torch.float32)
    hist.scatter_add_(0, bins, torch.ones_like(bins, dtype=torch.float32))
    hist = hist.double().reshape(b, c, 256)
    last = 255 - (hist.flip(-1) > 0).double().argmax(-1, keepdim=True)
    step = torch.floor((hist.sum(-1, keepdim=True) - hist.gather(-1, last)) / 255)
    counts = hist.long()  # an integer cumsum: exact, and CUDA's float cumsum is refused under --deterministic
    before = (counts.cumsum(-1) - counts).double()
    eq_ok = ((hist > 0).sum(-1, keepdim=True) > 1) & (step > 0)
    equal = torch.where(eq_ok, torch.floor((torch.floor(step / 2) + before) / step.clamp(min=1)).clamp(max=255), v)
    lvl = level[:, None, None].double()
    bits_gone = 8 - (4 - torch.trunc(lvl / 10 * 4))  # PosterizeIncreasing keeps 4 - int(m/10*4) bits
    poster = v - torch.remainder(v, 2 ** bits_gone)
    threshold = 256 - torch.trunc(lvl / 10 * 256).clamp(max=256)
    solar = torch.where(v < threshold, v, 255 - v)
    add = torch.trunc(lvl / 10 * 110).clamp(max=128)
    solar_add = torch.where(v < 128, (v + add).clamp(max=255), v)
    tables = {'AutoContrast': auto, 'Equalize': equal, 'Invert': 255 - v, 'PosterizeIncreasing': poster,
              'SolarizeIncreasing': solar, 'SolarizeAdd': solar_add}
    out = v
    for name, table in tables.items():
        out = torch.where((op == RAND_OPS.index(name))[:, None, None], table, out)
    return out.float()


def _apply_luts(x, tables):
    b, c, h, w = x.shape
    return tables.gather(2, x.reshape(b, c, -1).long()).reshape(b, c, h, w)


def _blend_ops(x, op, factor):
    """Color, Contrast, Brightness, Sharpness: PIL's ImageEnhance with per-sample factor."""
    gray = _gray(x)
    mean_gray = torch.floor(gray.mean(dim=(1, 2, 3), keepdim=True, dtype=torch.float64) + 0.5).float()
    is_op = {name: (op == RAND_OPS.index(name))[:, None, None, None] for name in BLEND_OPS}
    degenerate = torch.where(is_op['ColorIncreasing'], gray.expand_as(x), torch.zeros_like(x))
    degenerate = torch.where(is_op['ContrastIncreasing'], mean_gray.expand_as(x), degenerate)
    degenerate = torch.where(is_op['SharpnessIncreasing'], _smooth(x), degenerate)
    return _blend(degenerate, x, factor[:, None, None, None])


def _affine_matrices(op, level, sign, height, width):
    """Per sample, PIL's inverse affine map (output pixel centre -> input point, in pixel units) of the
    geometric op: img.rotate(deg) about the centre, or img.transform(AFFINE, (a, b, c, d, e, f))."""
    n, device = op.shape[0], op.device
    m = torch.zeros(n, 2, 3, device=device, dtype=torch.float64)
    m[:, 0, 0] = m[:, 1, 1] = 1
    lvl = level.double() / 10 * sign.double()
    deg = lvl * 30
    angle = -torch.deg2rad(deg)
    cos, sin = torch.cos(angle), torch.sin(angle)
    cx, cy = width / 2, height / 2
    rot = torch.stack([torch.stack([cos, sin, cx - cos * cx - sin * cy], -1),
                       torch.stack([-sin, cos, cy + sin * cx - cos * cy], -1)], 1)
    m = torch.where((op == RAND_OPS.index('Rotate'))[:, None, None], rot, m)
    shear = lvl * 0.3
    is_sx = (op == RAND_OPS.index('ShearX'))
    is_sy = (op == RAND_OPS.index('ShearY'))
    m[:, 0, 1] = torch.where(is_sx, shear, m[:, 0, 1])
    m[:, 1, 0] = torch.where(is_sy, shear, m[:, 1, 0])
    pct = lvl * 0.45
    m[:, 0, 2] = torch.where(op == RAND_OPS.index('TranslateXRel'), pct * width, m[:, 0, 2])
    m[:, 1, 2] = torch.where(op == RAND_OPS.index('TranslateYRel'), pct * height, m[:, 1, 2])
    return m


def _geometric_ops(x, op, level, sign, fill):
    b, c, h, w = x.shape
    m = _affine_matrices(op, level, sign, h, w).float()
    ys, xs = torch.meshgrid(torch.arange(h, device=x.device, dtype=torch.float32) + 0.5,
                            torch.arange(w, device=x.device, dtype=torch.float32) + 0.5, indexing='ij')
    points = torch.stack([xs, ys, torch.ones_like(xs)], -1)  # (h, w, 3)
    src = torch.einsum('bij,hwj->bhwi', m, points)  # input points, pixel units
    grid = torch.stack([src[..., 0] * (2 / w) - 1, src[..., 1] * (2 / h) - 1], -1)
    out = F.grid_sample(x, grid, mode='bicubic', padding_mode='border', align_corners=False)
    outside = (src[..., 0] < 0) | (src[..., 0] >= w) | (src[..., 1] < 0) | (src[..., 1] >= h)
    return torch.where(outside[:, None], fill.view(1, c, 1, 1), to_uint8_range(out))


def sample_layer(g, n, device, magnitude=9.0, magnitude_std=0.5, prob=0.5):
    """One layer of timm's RandAugment for n samples: each picks an op (uniformly, with replacement across
    layers), is applied with probability `prob` (timm skips when random() > prob), at magnitude
    N(magnitude, magnitude_std) clipped to [0, 10], with a random sign where the op has one."""
    op = torch.randint(len(RAND_OPS), (n,), generator=g, device=device)
    apply = torch.rand(n, generator=g, device=device) <= prob
    noise = torch.randn(n, generator=g, device=device)
    level = (magnitude + magnitude_std * noise).clamp(0, 10) if magnitude_std > 0 \
        else torch.full((n,), float(magnitude), device=device).clamp(0, 10)
    sign = torch.where(torch.rand(n, generator=g, device=device) > 0.5, -1.0, 1.0)
    return op, apply, level, sign


def rand_augment_layer(x, host_gen, fill, magnitude=9.0, magnitude_std=0.5, prob=0.5):
    """One RandAugment layer; its choices are drawn on the host (host_gen, a CPU generator), so the
    samples of each op group are known without waiting for the device."""
    op, apply, level, sign = sample_layer(host_gen, x.shape[0], torch.device('cpu'), magnitude, magnitude_std, prob)
    return apply_ops(x, op, level, sign, apply, fill)


OP_GROUP = torch.tensor([0] + [1 if k in LUT_OPS else 2 if k in BLEND_OPS else 3 for k in RAND_OPS])


def apply_ops(x, op, level, sign, apply, fill):
    """RandAugment ops with per-sample op index, magnitude (0..10), sign and on/off, given on the host.
    Each group of ops (lookup tables, blends, affine) runs on its own samples only, gathered by host-known
    indices: no work on samples whose op is off or of another group, and no host synchronisation."""
    op = torch.where(apply, op, torch.full_like(op, -1))
    group = OP_GROUP[op + 1]
    out = x.clone()
    for gid, run in ((1, _lut_group), (2, _blend_group), (3, _geometric_group)):
        chosen = (group == gid).nonzero().flatten()
        if len(chosen) == 0:
            continue
        to_dev = lambda t: (t.pin_memory() if x.is_cuda else t).to(x.device, non_blocking=True)
        idx = to_dev(chosen)
        out.index_copy_(0, idx, run(x.index_select(0, idx), to_dev(op[chosen]), to_dev(level[chosen]),
                                    to_dev(sign[chosen]), fill))
    return out


def _lut_group(x, op, level, sign, fill):
    return _apply_luts(x, _lookup_tables(x, op, level))


def _blend_group(x, op, level, sign, fill):
    return _blend_ops(x, op, (1.0 + sign * level / 10 * 0.9).clamp(min=0.1))


def _geometric_group(x, op, level, sign, fill):
    return _geometric_ops(x, op, level, sign, fill)


def parse_rand_augment(config):
    """timm's 'rand-m9-mstd0.5-inc1' string -> keyword arguments of rand_augment_layer and the layer count.
    Only the increasing op set (inc1) with uniform op choice is implemented on the GPU."""
    import re
    parts = config.split('-')
    if parts[0] != 'rand':
        raise ValueError(f"--aa {config}: the GPU data path implements timm's RandAugment ('rand-...') only; "
                         f'pass --gpu_data false for other policies')
    out = {'magnitude': 10.0, 'magnitude_std': 0.0, 'prob': 0.5, 'layers': 2, 'increasing': False}
    for part in parts[1:]:
        key, value = (re.split(r'(\d.*)', part) + [''])[:2]
        if key == 'm':
            out['magnitude'] = float(int(value))
        elif key == 'mstd':
            out['magnitude_std'] = float(value)
        elif key == 'n':
            out['layers'] = int(value)
        elif key == 'p':
            out['prob'] = float(value)
        elif key == 'inc':
            out['increasing'] = bool(int(value))
        else:
            raise ValueError(f"--aa {config}: option '{part}' is not implemented on the GPU data path; "
                             f'pass --gpu_data false')
    if not out.pop('increasing'):
        raise ValueError(f'--aa {config}: the GPU data path implements the increasing op set (inc1) only; '
                         f'pass --gpu_data false')
    if out['magnitude_std'] > 100 or math.isinf(out['magnitude_std']):
        raise ValueError(f'--aa {config}: uniform magnitude sampling is not implemented on the GPU data path')
    return out


# ----------------------------------------------------------------------------------------- random erasing
def random_erasing(x, g, prob=0.25, min_area=0.02, max_area=1 / 3, min_aspect=0.3):
    """timm's RandomErasing(mode='pixel', count 1) on a normalized batch: with probability `prob` a box of
    area U(min_area, max_area) and log-uniform aspect (ten attempts) gets per-pixel N(0, 1) values."""
    n, c, h, w = x.shape
    device = x.device
    erase = torch.rand(n, generator=g, device=device) <= prob
    target = _uniform(g, (n, 10), min_area, max_area, device) * (h * w)
    aspect = torch.exp(_uniform(g, (n, 10), math.log(min_aspect), math.log(1 / min_aspect), device))
    bh = torch.round(torch.sqrt(target * aspect))
    bw = torch.round(torch.sqrt(target / aspect))
    valid = (bw < w) & (bh < h)
    erase &= valid.any(1)
    pick = valid.float().argmax(1, keepdim=True)
    bh, bw = bh.gather(1, pick)[:, 0], bw.gather(1, pick)[:, 0]
    top = _randint_inclusive(g, (h - bh).clamp(min=0), device)
    left = _randint_inclusive(g, (w - bw).clamp(min=0), device)
    rows = torch.arange(h, device=device)[None, :]
    cols = torch.arange(w, device=device)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < (top + bh)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + bw)[:, None])
    box = (in_rows[:, :, None] & in_cols[:, None, :] & erase[:, None, None])[:, None]
    noise = torch.randn(x.shape, generator=g, device=device, dtype=x.dtype)
    return torch.where(box, noise, x)


# ------------------------------------------------------------------------------------------- the recipe
class GpuTrainTransform:
    """The training transform of datasets.build_transform for uint8 batches (B, 3, H, W) on a device:
    for input_size > 32, RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) + flip; for input_size <= 32,
    resize to input_size (bilinear) + random crop with 4 px zero padding + flip; then RandAugment, scaling
    to [0, 1], normalization and random erasing. Returns float32 (B, 3, input_size, input_size)."""

    def __init__(self, input_size, mean, std, aa='rand-m9-mstd0.5-inc1', interpolation='bicubic', reprob=0.25,
                 remode='pixel', recount=1, hflip=0.5):
        if interpolation not in FILTERS:
            raise ValueError(f"--train_interpolation {interpolation}: the GPU data path implements "
                             f"{' and '.join(FILTERS)}; pass --gpu_data false")
        if reprob > 0 and (remode != 'pixel' or recount != 1):
            raise ValueError(f"--remode {remode} --recount {recount}: the GPU data path implements random "
                             f"erasing in 'pixel' mode with one box; pass --gpu_data false")
        self.size, self.interpolation, self.reprob, self.hflip = input_size, interpolation, reprob, hflip
        self.rand_augment = parse_rand_augment(aa) if aa else None  # None: off
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255
        # timm fills the geometric ops' empty area with the mean colour, as 8-bit values
        self.fill = torch.tensor([min(255, round(255 * m)) for m in mean], dtype=torch.float32)

        self.device_gen, self.host_gen = None, torch.Generator()

    def _on(self, device):
        if self.device_gen is None or self.mean.device != device:  # once: no host-to-device copies per batch
            self.mean, self.std, self.fill = self.mean.to(device), self.std.to(device), self.fill.to(device)
            self.device_gen = torch.Generator(device=device)

    def __call__(self, images, seed):
        """Transform one batch; every random draw comes from `seed` (one device and one host generator)."""
        n, _, height, width = images.shape
        device = images.device
        self._on(device)
        g, host_gen = self.device_gen.manual_seed(seed), self.host_gen.manual_seed(seed)
        size = self.size
        if size > 32:
            top, left, h, w = resized_crop_params(g, n, height, width, device)
            rows = resample_matrix(top, h, height, size, self.interpolation)
            cols = resample_matrix(left, w, width, size, self.interpolation)
        else:
            full = lambda k: torch.full((n,), float(k), device=device)
            rows = resample_matrix(full(0), full(height), height, size, 'bilinear')
            cols = resample_matrix(full(0), full(width), width, size, 'bilinear')
            dy = torch.randint(0, 9, (n,), generator=g, device=device)
            dx = torch.randint(0, 9, (n,), generator=g, device=device)
            rows = shift_matrix(dy - 4, size, size) @ rows
            cols = shift_matrix(dx - 4, size, size) @ cols
        flip = torch.rand(n, generator=g, device=device) < self.hflip
        x = apply_resample(images, rows, flip_columns(cols, flip))
        if self.rand_augment is not None:
            ra = dict(self.rand_augment)
            for _ in range(ra.pop('layers')):
                x = rand_augment_layer(x, host_gen, self.fill, **ra)
        x = (x - self.mean) / self.std
        if self.reprob > 0:
            x = random_erasing(x, g, prob=self.reprob)
        return x


class GpuEvalTransform:
    """The evaluation transform of datasets.build_transform: for input_size > 32, resize the short side to
    input_size / crop_pct (bicubic; straight to input_size from 384 px) and centre-crop; else resize to
    input_size (bilinear). Then scaling and normalization."""

    def __init__(self, input_size, mean, std, crop_pct=224 / 256):
        self.size, self.crop_pct = input_size, crop_pct
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255

    def matrices(self, n, height, width, device):
        size = self.size
        full = lambda k: torch.full((n,), float(k), device=device)
        if size <= 32 or size >= 384:
            mode = 'bilinear' if size <= 32 else 'bicubic'
            return (resample_matrix(full(0), full(height), height, size, mode),
                    resample_matrix(full(0), full(width), width, size, mode))
        short = int(size / self.crop_pct)  # torchvision Resize(int): the short side, aspect kept
        out_h, out_w = (short, int(short * width / height)) if height <= width else (int(short * height / width), short)
        rows = resample_matrix(full(0), full(height), height, out_h)
        cols = resample_matrix(full(0), full(width), width, out_w)
        top, left = int(round((out_h - size) / 2.0)), int(round((out_w - size) / 2.0))
        return rows[:, top:top + size], cols[:, left:left + size]

    def __call__(self, images):
        rows, cols = self.matrices(images.shape[0], images.shape[2], images.shape[3], images.device)
        x = apply_resample(images, rows, cols)
        if self.mean.device != images.device:
            self.mean, self.std = self.mean.to(images.device), self.std.to(images.device)
        return (x - self.mean) / self.std
