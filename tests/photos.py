"""Real photographs for image tests, made at test time from scikit-learn's two sample photographs (china.jpg,
flower.jpg; 427 x 640): random crops, and one image of each form users' folders hold (EXIF-rotated JPEG, 8- and
16-bit PNG, grayscale, palette with transparency, RGBA/LA, CMYK JPEG, tiny, very large, truncated, not an image)."""
import struct
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

BACKGROUND = (255, 255, 255)  # swinlab.data.folder.ALPHA_BACKGROUND, written out


def sample_photos() -> List[Image.Image]:
    from sklearn.datasets import load_sample_images
    return [Image.fromarray(a) for a in load_sample_images().images]


def photo_crops(n: int, low: int = 40, high: int = 96, seed: int = 0) -> List[Image.Image]:
    """``n`` square crops of the sample photographs, side ``low``..``high`` pixels, at random places."""
    photos = sample_photos()
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(n):
        p = photos[i % len(photos)]
        s = int(rng.integers(low, high + 1))
        x, y = int(rng.integers(0, p.width - s)), int(rng.integers(0, p.height - s))
        crops.append(p.crop((x, y, x + s, y + s)))
    return crops


def write_png16(path: Path, a: np.ndarray) -> None:
    """A 16-bit RGB (H, W, 3) or RGBA PNG, written by hand: PIL cannot write 16-bit colour PNGs."""
    h, w, c = a.shape
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", w, h, 16, {3: 2, 4: 6}[c], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def _over_background(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255.0
    return rgb.astype(np.float64) * a + np.array(BACKGROUND, dtype=np.float64) * (1 - a)


def write_wild_images(folder: Path, large: bool = True) -> Dict[str, Tuple[Path, Optional[np.ndarray], float]]:
    """One image per form into ``folder``: name -> (path, the RGB array a user sees, or None for a file that must be
    skipped, and the mean absolute difference allowed: lossy JPEG or 0.5 rounding)."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = sample_photos()
    crop = photos[0].crop((100, 60, 148, 124))  # 48 wide, 64 high: a rotation shows in the size
    rgb = np.asarray(crop)
    out: Dict[str, Tuple[Path, Optional[np.ndarray], float]] = {}

    for orientation, stored in ((6, crop.transpose(Image.Transpose.ROTATE_90)),
                                (8, crop.transpose(Image.Transpose.ROTATE_270)),
                                (3, crop.transpose(Image.Transpose.ROTATE_180))):
        exif = Image.Exif()
        exif[0x0112] = orientation
        path = folder / f"exif{orientation}.jpg"
        stored.save(path, quality=95, exif=exif)
        out[path.stem] = (path, rgb, 4.0)
    path = folder / "png8.png"
    crop.save(path)
    out["png8"] = (path, rgb, 0.0)
    path = folder / "png16_rgb.png"
    write_png16(path, rgb.astype(np.uint16) * 257 + 90)  # low bytes that must not matter
    out["png16_rgb"] = (path, rgb, 1.0)  # PIL keeps the high byte: within 1 of the rounded value
    gray = np.asarray(crop.convert("L"))
    path = folder / "png16_gray.png"
    Image.fromarray(gray.astype(np.uint16) * 257).save(path)  # mode I;16
    out["png16_gray"] = (path, np.repeat(gray[..., None], 3, 2), 0.0)
    path = folder / "gray.jpg"
    crop.convert("L").save(path, quality=95)
    out["gray"] = (path, np.repeat(gray[..., None], 3, 2), 4.0)
    pal = crop.quantize(32)
    index = np.asarray(pal)
    transparent = int(index[0, 0])
    path = folder / "palette.png"
    pal.save(path, transparency=transparent)
    colours = np.array(pal.getpalette()[:3 * 256], dtype=np.uint8).reshape(-1, 3)[index]
    colours[index == transparent] = BACKGROUND
    out["palette"] = (path, colours, 0.0)
    ramp = np.tile(np.linspace(0, 255, rgb.shape[1]).round().astype(np.uint8), (rgb.shape[0], 1))
    path = folder / "rgba.png"
    Image.fromarray(np.dstack([rgb, ramp])).save(path)
    out["rgba"] = (path, _over_background(rgb, ramp), 0.5)
    path = folder / "la.png"
    Image.fromarray(np.dstack([gray, ramp]), mode="LA").save(path)
    out["la"] = (path, _over_background(np.repeat(gray[..., None], 3, 2), ramp), 0.5)
    path = folder / "cmyk.jpg"
    crop.convert("CMYK").save(path, quality=95)
    out["cmyk"] = (path, rgb, 4.0)
    path = folder / "tiny1x1.png"
    crop.crop((0, 0, 1, 1)).save(path)
    out["tiny1x1"] = (path, rgb[:1, :1], 0.0)
    path = folder / "tiny3x5.png"
    crop.crop((0, 0, 3, 5)).save(path)
    out["tiny3x5"] = (path, rgb[:5, :3], 0.0)
    if large:
        path = folder / "large6000x4000.jpg"
        big = photos[1].resize((6000, 4000), Image.Resampling.BILINEAR)
        big.save(path, quality=85)
        out["large6000x4000"] = (path, np.asarray(big), 2.0)
    jpeg = (folder / "gray.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(jpeg[:len(jpeg) // 2])
    out["truncated"] = (folder / "truncated.jpg", None, 0.0)
    (folder / "not_an_image.png").write_bytes(b"<html>404 Not Found</html>")
    out["not_an_image"] = (folder / "not_an_image.png", None, 0.0)
    return out
