"""The weak and strong views of FixMatch, per image, on a batch of uint8 images on the training device.

Weak (FixMatch's code: RandomHorizontalFlip, then RandomCrop(32, padding=4, padding_mode='reflect')): flip
with p = 0.5 where the data set flips, then a 32x32 window of the reflect-padded image, offsets uniform in 0..8.

Strong: the weak view, then RandAugment as FixMatch's PyTorch code draws it (kekmodel/FixMatch-pytorch
dataset/randaugment.py RandAugmentMC(2, 10), which DASO, ACR and SimPro also use): 2 ops drawn with
replacement from 14, each applied with p = 0.5 at a level v uniform in 1..9, then CutoutAbs(16): a grey
(127) square whose top-left corner is max(0, u - 8) for u uniform in [0, 32) (row and column), 16 wide,
clipped at the border, and inclusive of its far edge as PIL's rectangle is (17 x 17 unless clipped).

    op            magnitude at level v (their _float_parameter / _int_parameter)
    AutoContrast  -
    Brightness    factor v * 0.9 / 10 + 0.05          (0.14 .. 0.86: only darker, as theirs)
    Color         the same factor
    Contrast      the same factor
    Equalize      -
    Identity      -
    Posterize     int(v * 4 / 10) + 4 bits
    Rotate        +-int(v * 30 / 10) degrees           (sign drawn with p = 0.5)
    Sharpness     the same factor as Brightness
    ShearX/Y      +-v * 0.3 / 10
    Solarize      threshold 256 - int(v * 256 / 10)
    TranslateX/Y  int(+-v * 0.3 / 10 * 32) pixels

Every op equals PIL's (Pillow's C code, read in src/libImaging) at the same parameters: the geometric
ops use Pillow's 16.16 fixed-point nearest-neighbour affine map (Geometry.c affine_fixed; translations
take its scaling path, which agrees for whole pixels), with the matrices of Image.rotate / Image.transform
computed as its Python code does; the colour ops are Pillow's look-up tables (ImageOps) and its blend
`(UINT8)(in1 + alpha * (in2 - in1))` in single precision (Blend.c) against the degenerate image of
ImageEnhance: black, the L conversion (R*19595 + G*38470 + B*7471 + 0x8000) >> 16, the L mean rounded,
or the SMOOTH-filtered image. `dataset.randaugment_pil` applies PIL itself at the same parameters;
tests/test_randaugment.py holds the two equal (Sharpness within one grey level: Pillow filters in its
own float order).

The parameters are drawn per image from a generator seeded by the caller (SSLBatches: the run seed,
the step and the rank), so a resumed run draws the same views, and nothing waits for the device: every
op is computed for the whole batch and selected per image, no image is looked up by index on the host.
"""
import math
from dataclasses import dataclass, fields

import torch

PAD = 4
NUM_OPS = 2
LEVELS = 10          # their m: levels are drawn by np.random.randint(1, 10), i.e. 1..9
CUTOUT = 16
CUTOUT_FILL = 127
OPS = ('AutoContrast', 'Brightness', 'Color', 'Contrast', 'Equalize', 'Identity', 'Posterize', 'Rotate',
       'Sharpness', 'ShearX', 'ShearY', 'Solarize', 'TranslateX', 'TranslateY')
OP = {name: i for i, name in enumerate(OPS)}
GEOMETRIC = ('Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY')
BLENDS = ('Brightness', 'Color', 'Contrast', 'Sharpness')


@dataclass
class Views:
    """Per-image parameters of B views. Weak views fill the first two fields only."""
    flip: torch.Tensor              # (B,) bool: mirrored before the crop
    offset: torch.Tensor            # (B, 2) int64: the crop window's (top, left) in the padded image, 0..8
    op: torch.Tensor = None         # (B, 2) int64: index into OPS, per slot
    apply: torch.Tensor = None      # (B, 2) bool: whether the slot's op is applied
    level: torch.Tensor = None      # (B, 2) int64: 1..9
    negate: torch.Tensor = None     # (B, 2) bool: the sign of Rotate, Shear and Translate
    cutout: torch.Tensor = None     # (B, 2) int64: floor of the (row, column) drawn in [0, 32)

    def row(self, i):
        """Image i's parameters as plain Python values (the host reference's input)."""
        return {f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[i].tolist()
                for f in fields(self)}


def draw(n, generator, strong, flip=True, size=32):
    """Views for `n` images from `generator` (on the images' device)."""
    device = generator.device
    offset = torch.randint(0, 2 * PAD + 1, (n, 2), generator=generator, device=device)
    flipped = torch.rand(n, generator=generator, device=device) < 0.5
    views = Views(flipped & flip, offset)
    if strong:
        views.op = torch.randint(0, len(OPS), (n, NUM_OPS), generator=generator, device=device)
        views.apply = torch.rand(n, NUM_OPS, generator=generator, device=device) < 0.5
        views.level = torch.randint(1, LEVELS, (n, NUM_OPS), generator=generator, device=device)
        views.negate = torch.rand(n, NUM_OPS, generator=generator, device=device) < 0.5
        views.cutout = torch.randint(0, size, (n, 2), generator=generator, device=device)
    return views


# ------------------------------------------------------------------ magnitudes, as their code computes them

def enhance_factor(v):
    return float(v) * 0.9 / 10 + 0.05


def posterize_bits(v):
    return int(v * 4 / 10) + 4


def rotate_degrees(v, negate):
    return -int(v * 30 / 10) if negate else int(v * 30 / 10)


def shear(v, negate):
    s = float(v) * 0.3 / 10
    return -s if negate else s


def solarize_threshold(v):
    return 256 - int(v * 256 / 10)


def translate_pixels(v, negate, size):
    t = float(v) * 0.3 / 10
    return int((-t if negate else t) * size)


def pil_affine(op, v, negate, size):
    """The 6 coefficients PIL's transform gets for a geometric op: input (x, y) = (a x + b y + c, d x + e y + f)
    (Image.rotate's matrix about the centre, rounded to 15 digits as it rounds them)."""
    if op == 'Rotate':
        angle = -math.radians(rotate_degrees(v, negate) % 360.0)
        a, b = round(math.cos(angle), 15), round(math.sin(angle), 15)
        d, e = round(-math.sin(angle), 15), round(math.cos(angle), 15)
        cx = cy = size / 2
        c, f = a * -cx + b * -cy + 0.0, d * -cx + e * -cy + 0.0
        return a, b, c + cx, d, e, f + cy
    if op == 'ShearX':
        return 1, shear(v, negate), 0, 0, 1, 0
    if op == 'ShearY':
        return 1, 0, 0, shear(v, negate), 1, 0
    if op == 'TranslateX':
        return 1, 0, translate_pixels(v, negate, size), 0, 1, 0
    return 1, 0, 0, 0, 1, translate_pixels(v, negate, size)


def _fix(value):
    return math.floor(value * 65536.0 + 0.5)


def fixed_point(coefficients):
    """Pillow's affine_fixed: (a0, a1, a2, a3, a4, a5) in 16.16 fixed point, the pixel centres folded into
    a2 and a5; input pixel of output (x, y) = ((a2 + y a1 + x a0) >> 16, (a5 + y a4 + x a3) >> 16)."""
    a, b, c, d, e, f = coefficients
    return _fix(a), _fix(b), _fix(c + a * 0.5 + b * 0.5), _fix(d), _fix(e), _fix(f + d * 0.5 + e * 0.5)


IDENTITY_FIXED = fixed_point((1, 0, 0, 0, 1, 0))


def _tables(size, device):
    """Per (op, level, sign): the fixed-point map (14 x 10 x 2 x 6, identity for non-geometric ops), and per
    (op, level): the blend factor in single precision (1 for the other ops), the LUT-op parameter."""
    geometry = torch.tensor(IDENTITY_FIXED, dtype=torch.int64).repeat(len(OPS), LEVELS, 2, 1)
    factor = torch.ones(len(OPS), LEVELS, dtype=torch.float32)
    for v in range(1, LEVELS):
        for name in GEOMETRIC:
            for negate in (0, 1):
                geometry[OP[name], v, negate] = torch.tensor(fixed_point(pil_affine(name, v, negate, size)))
        for name in BLENDS:
            factor[OP[name], v] = enhance_factor(v)  # float32, as Pillow's C float alpha
    return geometry.to(device), factor.to(device)


# ------------------------------------------------------------------ the ops on (B, S, S, 3) uint8 batches

def weak_pixels(images, index, views):
    """(B, S, S, 3) uint8: flip, then the window of the reflect-padded image. `images` (N, S, S, 3) uint8,
    `index` (B,) int64 into it. Reflection: padded row r < 0 is image row -r, r >= S is row 2S - 2 - r
    (numpy's and torchvision's 'reflect')."""
    size = images.shape[1]
    arange = torch.arange(size, device=images.device)

    def reflect(i):
        return torch.where(i < 0, -i, torch.where(i >= size, 2 * size - 2 - i, i))

    rows = reflect(views.offset[:, :1] - PAD + arange)
    cols = reflect(views.offset[:, 1:] - PAD + arange)
    cols = torch.where(views.flip[:, None], size - 1 - cols, cols)  # a column of the mirrored image
    return images[index[:, None, None], rows[:, :, None], cols[:, None, :]]


class RandAugment:
    """FixMatch's strong augmentation on a device (module docstring); `size` is the images' side."""

    def __init__(self, size, device):
        self.size = size
        self.geometry, self.factor = _tables(size, device)
        self.arange = torch.arange(size, device=device)
        self.values = torch.arange(256, device=device)
        levels = range(LEVELS)  # level 0 is never drawn
        self.bits = torch.tensor([posterize_bits(v) if v else 8 for v in levels], device=device)
        self.threshold = torch.tensor([solarize_threshold(v) for v in levels], device=device)

    def __call__(self, pixels, views):
        """(B, S, S, 3) uint8 weak pixels -> the strong view's pixels (B, S, S, 3) uint8."""
        for slot in range(NUM_OPS):
            op = torch.where(views.apply[:, slot], views.op[:, slot], OP['Identity'])
            level, negate = views.level[:, slot], views.negate[:, slot]
            pixels = self._geometric(pixels, self.geometry[op, level, negate.long()])
            pixels = self._lookup(pixels, op, level)
            pixels = self._blend(pixels, op, self.factor[op, level])
        return self._cutout(pixels, views.cutout)

    def _geometric(self, pixels, fixed):
        """Pillow's nearest-neighbour affine_fixed, per image; pixels mapped from outside the image are 0."""
        a0, a1, a2, a3, a4, a5 = (fixed[:, k, None, None] for k in range(6))
        y, x = self.arange[None, :, None], self.arange[None, None, :]
        xin = (a2 + y * a1 + x * a0) >> 16
        yin = (a5 + y * a4 + x * a3) >> 16
        inside = (xin >= 0) & (xin < self.size) & (yin >= 0) & (yin < self.size)
        batch = torch.arange(pixels.shape[0], device=pixels.device)[:, None, None]
        out = pixels[batch, yin.clamp(0, self.size - 1), xin.clamp(0, self.size - 1)]
        return out * inside[..., None]

    def _lookup(self, pixels, op, level):
        """AutoContrast, Equalize, Posterize, Solarize as per-image, per-channel tables (ImageOps)."""
        b = pixels.shape[0]
        flat = pixels.long() + 256 * torch.arange(b * 3, device=pixels.device).view(b, 1, 1, 3)
        hist = torch.zeros(b * 3 * 256, dtype=torch.int64, device=pixels.device)
        hist = hist.index_add_(0, flat.reshape(-1), torch.ones_like(flat.reshape(-1))).view(b, 3, 256)
        values = self.values.expand(b, 3, 256)
        lut = values
        lut = torch.where((op == OP['AutoContrast']).view(b, 1, 1), _autocontrast(hist, values), lut)
        lut = torch.where((op == OP['Equalize']).view(b, 1, 1), _equalize(hist, values), lut)
        bits = self.bits[level]
        posterized = values & (~((1 << (8 - bits)) - 1)).view(b, 1, 1)
        lut = torch.where((op == OP['Posterize']).view(b, 1, 1), posterized, lut)
        threshold = self.threshold[level]
        solarized = torch.where(values < threshold.view(b, 1, 1), values, 255 - values)
        lut = torch.where((op == OP['Solarize']).view(b, 1, 1), solarized, lut)
        return lut.reshape(-1)[flat].to(torch.uint8)

    def _blend(self, pixels, op, factor):
        """ImageEnhance's Image.blend(degenerate, image, factor), truncated to uint8 as Blend.c does."""
        b = pixels.shape[0]
        x = pixels.to(torch.int64)
        gray = (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000) >> 16  # (B, S, S): PIL's L
        mean = torch.floor(gray.sum(dim=(1, 2)).double() / (self.size * self.size) + 0.5).long()
        degenerate = torch.zeros_like(x)  # Brightness: black
        choose = (op == OP['Color']).view(b, 1, 1, 1)
        degenerate = torch.where(choose, gray[..., None].expand_as(x), degenerate)
        choose = (op == OP['Contrast']).view(b, 1, 1, 1)
        degenerate = torch.where(choose, mean.view(b, 1, 1, 1).expand_as(x), degenerate)
        choose = (op == OP['Sharpness']).view(b, 1, 1, 1)
        degenerate = torch.where(choose, _smooth(x), degenerate)
        d = degenerate.float()
        out = d + factor.view(b, 1, 1, 1) * (x.float() - d)  # two single-precision roundings, as Blend.c's
        return out.to(torch.uint8)

    def _cutout(self, pixels, centres):
        """CutoutAbs(16): rows y0..min(y0 + 16, S) and columns likewise, inclusive, clipped; grey."""
        start = (centres - CUTOUT // 2).clamp(min=0)          # their int(max(0, u - 8))
        stop = (start + CUTOUT).clamp(max=self.size)            # their min(w, x0 + v), drawn inclusive
        rows = (self.arange >= start[:, :1]) & (self.arange <= stop[:, :1])
        cols = (self.arange >= start[:, 1:]) & (self.arange <= stop[:, 1:])
        box = rows[:, :, None] & cols[:, None, :]
        return pixels.masked_fill(box[..., None], CUTOUT_FILL)


def _autocontrast(hist, values):
    """ImageOps.autocontrast (cutoff 0): lo, hi = the lowest and highest used values; if hi > lo,
    int(i * scale + offset) clipped, scale = 255 / (hi - lo), offset = -lo * scale, in double precision."""
    used = hist > 0
    lo = torch.where(used, values, 256).amin(dim=2, keepdim=True)
    hi = torch.where(used, values, -1).amax(dim=2, keepdim=True)
    scale = 255.0 / (hi - lo).clamp(min=1).double()
    offset = -lo.double() * scale
    stretched = (values.double() * scale + offset).long().clamp(0, 255)  # .long() truncates, as int()
    return torch.where(hi > lo, stretched, values)


def _equalize(hist, values):
    """ImageOps.equalize: with step = (pixels - count of the highest used value) // 255, the value i maps to
    (step // 2 + pixels below i) // step; unchanged where fewer than two values are used or step is 0.
    Values above 255 (no pixel takes them: they lie above the highest used value) are clipped."""
    used = hist > 0
    top = torch.where(used, values, -1).amax(dim=2, keepdim=True)
    last = hist.gather(2, top.clamp(min=0))
    step = (hist.sum(dim=2, keepdim=True) - last) // 255
    below = hist.cumsum(dim=2) - hist
    mapped = ((step // 2 + below) // step.clamp(min=1)).clamp(max=255)
    keep = (used.sum(dim=2, keepdim=True) <= 1) | (step == 0)
    return torch.where(keep, values, mapped)


def _smooth(x):
    """ImageFilter.SMOOTH (kernel 1 1 1 / 1 5 1 / 1 1 1, divisor 13) on int64 (B, S, S, 3); the border rows
    and columns keep their values, as Pillow's 3x3 filter does. Rounded half up."""
    f = x.float()
    inner = (f[:, :-2, :-2] + f[:, :-2, 1:-1] + f[:, :-2, 2:] + f[:, 1:-1, :-2] + 5 * f[:, 1:-1, 1:-1]
             + f[:, 1:-1, 2:] + f[:, 2:, :-2] + f[:, 2:, 1:-1] + f[:, 2:, 2:]) / 13
    out = x.clone()
    out[:, 1:-1, 1:-1] = torch.floor(inner + 0.5).long().clamp(0, 255)
    return out
