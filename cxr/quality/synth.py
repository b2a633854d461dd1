"""Images that are not chest radiographs, for training and measuring the gate's "other" class:
photographs (the samples scikit-image and scikit-learn ship), rendered documents and screenshots,
noise of several kinds, gradients, blank frames, patterns, and CT slices from the phantom's CT.

Every generator takes a numpy Generator and returns float32 (H, W) in [0, 1] at a random size and
aspect, so that a seed fixes the image. Photographs are split by NAME (`PHOTOS_HELD_OUT` are used
only by the benchmark), the procedural kinds by seed.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

PHOTOS_HELD_OUT = ("coffee", "rocket", "flower")   # never seen in training


def _size(rng, lo=48, hi=640) -> tuple[int, int]:
    h = int(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    aspect = np.exp(rng.uniform(np.log(0.4), np.log(2.5)))
    return max(2, h), max(2, int(h * aspect))


def _grey(rgb: np.ndarray) -> np.ndarray:
    a = np.asarray(rgb, np.float32)
    if a.max() > 1.5:
        a = a / 255.0
    if a.ndim == 3:
        a = a[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.clip(a, 0, 1).astype(np.float32)


_PHOTOS: dict | None = None


def photographs() -> dict[str, np.ndarray]:
    """name -> grey photograph, from what scikit-image (bundled files only) and scikit-learn ship."""
    global _PHOTOS
    if _PHOTOS is None:
        out = {}
        try:
            from skimage import data
            for name in ("astronaut", "camera", "cat", "chelsea", "coffee", "rocket", "coins",
                         "horse", "moon", "page", "text", "clock", "grass", "gravel", "brick",
                         "hubble_deep_field", "immunohistochemistry", "logo", "motorcycle_left",
                         "retina", "microaneurysms", "cell", "lily", "colorwheel", "shepp_logan_phantom",
                         "binary_blobs", "checkerboard"):
                fn = getattr(data, name, None)
                if fn is None:
                    continue
                try:
                    img = fn()
                except Exception:  # an image that needs a download: skip it (offline)
                    continue
                out[name] = _grey(img[0] if isinstance(img, tuple) else img)
        except ImportError:
            pass
        from sklearn.datasets import load_sample_images
        ds = load_sample_images()
        for fname, img in zip(ds.filenames, ds.images):
            out["china" if "china" in fname else "flower"] = _grey(img)
        _PHOTOS = out
    return _PHOTOS


def photo(rng, names: list[str]) -> np.ndarray:
    img = photographs()[names[rng.integers(len(names))]]
    h, w = img.shape
    ch = int(h * rng.uniform(0.4, 1.0))
    cw = int(w * rng.uniform(0.4, 1.0))
    r, c = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    out = img[r:r + ch, c:c + cw]
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(np.rot90(out, rng.integers(4)))


_WORDS = ("the patient film chest report result normal lung heart view page total amount invoice "
          "click settings user file edit help open save login password error warning data table "
          "system name date value status cancel ok next back search home menu").split()


def document(rng) -> np.ndarray:
    """A page of text (letter, table or slide), dark on light or light on dark."""
    from PIL import Image, ImageDraw, ImageFont

    h, w = _size(rng, 200, 900)
    bg, fg = (rng.uniform(0.85, 1.0), rng.uniform(0.0, 0.3))
    if rng.random() < 0.25:
        bg, fg = 1 - bg, 1 - fg
    im = Image.new("L", (w, h), int(bg * 255))
    d = ImageDraw.Draw(im)
    try:
        font = ImageFont.load_default(size=int(rng.integers(8, 28)))
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    y = int(rng.integers(2, 30))
    step = int(rng.integers(10, 34))
    while y < h - 10:
        x = int(rng.integers(2, 40))
        line = " ".join(_WORDS[i] for i in rng.integers(len(_WORDS), size=int(rng.integers(2, 14))))
        d.text((x, y), line, fill=int(fg * 255), font=font)
        if rng.random() < 0.15:
            d.line((0, y + step - 3, w, y + step - 3), fill=int(fg * 255))
        y += step
    return np.asarray(im, np.float32) / 255.0


def screenshot(rng) -> np.ndarray:
    """A user interface: bars, panels, buttons, text, an embedded picture now and then."""
    from PIL import Image, ImageDraw

    h, w = _size(rng, 200, 900)
    im = Image.new("L", (w, h), int(rng.uniform(0.6, 1.0) * 255))
    d = ImageDraw.Draw(im)
    d.rectangle((0, 0, w, int(rng.integers(12, 50))), fill=int(rng.uniform(0, 0.6) * 255))
    for _ in range(int(rng.integers(3, 30))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(10, w // 2 + 11)), y0 + int(rng.integers(8, h // 3 + 9))
        shade = int(rng.uniform(0, 1) * 255)
        if rng.random() < 0.5:
            d.rectangle((x0, y0, x1, y1), fill=shade, outline=int(rng.uniform(0, 1) * 255))
        else:
            d.rounded_rectangle((x0, y0, x1, y1), radius=4, outline=shade)
        if rng.random() < 0.6:
            d.text((x0 + 3, y0 + 2), _WORDS[rng.integers(len(_WORDS))], fill=255 - shade)
    a = np.asarray(im, np.float32) / 255.0
    if rng.random() < 0.3:  # a picture inside the window (a photo, or a small radiograph-like blob)
        p = photo(rng, train_photo_names())
        ph, pw = min(p.shape[0], h // 2), min(p.shape[1], w // 2)
        r, c = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
        a[r:r + ph, c:c + pw] = p[:ph, :pw]
    return a


def noise(rng) -> np.ndarray:
    h, w = _size(rng)
    kind = rng.integers(5)
    if kind == 0:
        a = rng.random((h, w))
    elif kind == 1:
        a = rng.normal(rng.uniform(0.2, 0.8), rng.uniform(0.02, 0.3), (h, w))
    elif kind == 2:  # salt and pepper over a grey level
        a = np.full((h, w), rng.uniform(0, 1))
        m = rng.random((h, w))
        p = rng.uniform(0.01, 0.3)
        a[m < p / 2], a[m > 1 - p / 2] = 0, 1
    else:  # smooth (cloudy) noise at a random scale, or its multi-scale sum
        a = np.zeros((h, w))
        for s in (rng.uniform(1, 30),) if kind == 3 else (2, 6, 18, 50):
            a += ndimage.gaussian_filter(rng.standard_normal((h, w)), s) * s ** 0.5
        a = (a - a.min()) / (np.ptp(a) + 1e-9)
    return np.clip(a, 0, 1).astype(np.float32)


def gradient(rng) -> np.ndarray:
    h, w = _size(rng)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ang = rng.uniform(0, 2 * np.pi)
    if rng.random() < 0.6:
        g = np.cos(ang) * xx / w + np.sin(ang) * yy / h
    else:  # radial
        g = np.hypot(xx / w - rng.uniform(0, 1), yy / h - rng.uniform(0, 1))
    g = (g - g.min()) / (np.ptp(g) + 1e-9)
    lo, hi = sorted(rng.uniform(0, 1, 2))
    out = lo + (hi - lo) * g
    return (out + rng.normal(0, rng.uniform(0, 0.03), out.shape)).clip(0, 1).astype(np.float32)


def blank(rng) -> np.ndarray:
    h, w = _size(rng, 1, 640)
    level = rng.choice([0.0, 1.0, rng.uniform(0, 1)])
    a = np.full((h, w), level, np.float32)
    if rng.random() < 0.5:
        a += rng.normal(0, rng.uniform(0.001, 0.02), a.shape).astype(np.float32)
    return a.clip(0, 1)


def pattern(rng) -> np.ndarray:
    """Stripes, checkerboards, circles, random shapes."""
    from PIL import Image, ImageDraw

    h, w = _size(rng)
    kind = rng.integers(3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == 0:
        f = rng.uniform(2, 40)
        ang = rng.uniform(0, np.pi)
        a = 0.5 + 0.5 * np.sign(np.sin((np.cos(ang) * xx + np.sin(ang) * yy) / f * np.pi)) \
            if rng.random() < 0.5 else 0.5 + 0.5 * np.sin((np.cos(ang) * xx + np.sin(ang) * yy) / f)
    elif kind == 1:
        f = rng.uniform(3, 60)
        a = ((xx // f + yy // f) % 2).astype(np.float32)
    else:
        im = Image.new("L", (w, h), int(rng.uniform(0, 1) * 255))
        d = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(1, 25))):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            r = int(rng.integers(2, max(3, min(h, w) // 2)))
            box = (x0 - r, y0 - r, x0 + r, y0 + r)
            (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, fill=int(rng.uniform(0, 1) * 255))
        a = np.asarray(im, np.float32) / 255.0
    return np.asarray(a, np.float32).clip(0, 1)


class CtSlices:
    """Axial CT slices of the phantom's CT, in a few display windows (a CT slice is the
    commonest wrong image a chest reader gets sent)."""

    WINDOWS = ((-600, 1500), (40, 400), (400, 1800), (-160, 2000))   # lung, soft tissue, bone, wide

    def __init__(self, mu: np.ndarray):
        from ..phantom.ct import MU_WATER
        self.hu = (np.asarray(mu, np.float32) / MU_WATER - 1.0) * 1000.0   # coarse (x, y, z)

    def __call__(self, rng) -> np.ndarray:
        z = int(rng.integers(5, self.hu.shape[2] - 5))
        sl = self.hu[:, :, z].T[::-1]           # rows anterior -> posterior, columns patient left
        if rng.random() < 0.5:
            sl = sl[:, ::-1]                    # radiological convention (patient left on right)
        c, wdt = self.WINDOWS[rng.integers(len(self.WINDOWS))]
        img = np.clip((sl - (c - wdt / 2)) / wdt, 0, 1).astype(np.float32)
        if rng.random() < 0.3:  # a reformatted coronal/sagittal slice in a soft-tissue window
            x = int(rng.integers(20, self.hu.shape[1] - 20))
            img = np.clip((self.hu[:, x, :].T[::-1] - (40 - 200)) / 400, 0, 1).astype(np.float32)
        return img


def train_photo_names() -> list[str]:
    return [n for n in photographs() if n not in PHOTOS_HELD_OUT]


def held_out_photo_names() -> list[str]:
    return [n for n in photographs() if n in PHOTOS_HELD_OUT]


GENERATORS = ("photo", "document", "screenshot", "noise", "gradient", "blank", "pattern", "ct")
WEIGHTS = (0.3, 0.1, 0.1, 0.15, 0.08, 0.07, 0.08, 0.12)


def other_image(rng, ct: CtSlices | None, held_out: bool = False, kind: str | None = None):
    """One non-radiograph: (kind, image)."""
    kinds = [k for k in GENERATORS if ct is not None or k != "ct"]
    w = np.array([WEIGHTS[GENERATORS.index(k)] for k in kinds])
    kind = kind or kinds[rng.choice(len(kinds), p=w / w.sum())]
    if kind == "photo":
        img = photo(rng, held_out_photo_names() if held_out else train_photo_names())
    elif kind == "ct":
        img = ct(rng)
    else:
        img = globals()[kind](rng)
    return kind, np.ascontiguousarray(img, dtype=np.float32)
