#!/usr/bin/env python3
"""Builds the corpus `./dev bench gateway` runs on: photos that look like phone uploads.

    corpus.py OUT_DIR

From the real photos Debian's wallpaper packages install (lomiri-wallpapers-20.04,
ukui-wallpapers, plasma-workspace-wallpapers), it writes 60 JPEGs of 8-48 MP: cropped to 4:3 or
16:9, resampled (lanczos3) to a phone sensor's size with sensor-like noise, quality 88-94, 4:2:0
except one in ten (4:4:4), one in seven progressive. A third are stored turned, as phones store
portraits, with EXIF orientation 6 or 8; a quarter carry a Display P3 profile (pixels converted to
P3, the profile embedded). Deterministic; rebuilt only when this script or the sources change
(OUT_DIR/stamp). Kept out of git (the bench puts it under target/).

Every fifth photo is also saved as an iPhone saves it, HEIC (pillow-heif: x265, quality 80, a
grid of 512-pixel tiles, the EXIF orientation kept and written as an `irot` transform too, the
same ICC profile), 12 HEIC files for the bench's HEIC section.
"""

import hashlib
import pathlib
import struct
import subprocess
import sys

ROOTS = ["/usr/share/backgrounds", "/usr/share/wallpapers"]
COUNT = 60
# Phone sensors: megapixels (4:3 sizes; 16:9 ones crop the same width).
SIZES = [(3264, 2448), (4032, 3024), (4032, 3024), (4000, 3000), (4624, 3468), (5712, 4284), (8000, 6000), (4032, 3024)]


def sources():
    import pyvips

    found = {}
    for root in ROOTS:
        for path in sorted(pathlib.Path(root).glob("**/*")):
            if path.suffix.lower() not in (".jpg", ".jpeg", ".png") or not path.is_file():
                continue
            real = path.resolve()
            if real in found.values():
                continue
            try:
                image = pyvips.Image.new_from_file(str(path))
            except pyvips.Error:
                continue
            if image.width * image.height >= 4_000_000:
                found[str(path)] = real
    return sorted(found)


def s15(value):
    return struct.pack(">i", round(value * 65536))


def display_p3_icc():
    """A Display P3 matrix/TRC profile (ICC v4): P3 primaries, D65 adapted to D50, sRGB curve."""

    def xyz(x, y, z):
        return b"XYZ \0\0\0\0" + s15(x) + s15(y) + s15(z)

    curve = b"para\0\0\0\0" + struct.pack(">HH", 3, 0) + b"".join(
        s15(v) for v in (2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045)
    )
    text = "Display P3 (follow bench corpus)".encode("utf-16-be")
    desc = b"mluc\0\0\0\0" + struct.pack(">II", 1, 12) + b"enUS" + struct.pack(">II", len(text), 28) + text
    tags = [
        (b"desc", desc),
        (b"cprt", b"mluc\0\0\0\0" + struct.pack(">II", 1, 12) + b"enUS" + struct.pack(">II", 4, 28) + "CC0".encode("utf-16-be")[:4]),
        (b"wtpt", xyz(0.964203, 1.0, 0.824905)),
        (b"rXYZ", xyz(0.515121, 0.241196, -0.001053)),
        (b"gXYZ", xyz(0.291977, 0.692245, 0.041885)),
        (b"bXYZ", xyz(0.157104, 0.066574, 0.784073)),
        (b"rTRC", curve),
        (b"gTRC", curve),
        (b"bTRC", curve),
    ]
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for signature, body in tags:
        body += b"\0" * (-len(body) % 4)
        table += signature + struct.pack(">II", offset + len(data), len(body))
        data += body
    size = offset + len(data)
    header = (
        struct.pack(">I", size)
        + b"\0\0\0\0"
        + bytes([4, 0x30, 0, 0])
        + b"mntrRGB XYZ "
        + struct.pack(">6H", 2026, 1, 1, 0, 0, 0)
        + b"acsp"
        + b"\0" * 24
        + struct.pack(">I", 0)
        + s15(0.9642) + s15(1.0) + s15(0.8249)
        + b"\0" * 48
    )
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + data


def noise_sigma(i):
    return 2.0 + (i % 3)


def make(i, source, p3_path, out):
    import pyvips

    width, height = SIZES[i % len(SIZES)]
    if i % 5 == 4:
        height = width * 9 // 16
    image = pyvips.Image.new_from_file(source)
    if image.hasalpha():
        image = image.flatten(background=[255, 255, 255])
    image = image.colourspace("srgb").cast("uchar")
    if image.bands > 3:
        image = image.extract_band(0, n=3)
    # The source's largest crop of the target's aspect, moved a little per variant.
    scale = min(image.width / width, image.height / height)
    cw, ch = int(width * scale * 0.92), int(height * scale * 0.92)
    left = (image.width - cw) * ((i * 37) % 100) // 100
    top = (image.height - ch) * ((i * 61) % 100) // 100
    image = image.crop(left, top, cw, ch)
    image = image.resize(width / cw, vscale=height / ch, kernel="lanczos3")
    image = image.crop(0, 0, min(width, image.width), min(height, image.height))
    noise = pyvips.Image.gaussnoise(image.width, image.height, sigma=noise_sigma(i), mean=0)
    image = (image + noise).cast("uchar")
    image = image.copy(interpretation="srgb")
    options = {
        "Q": 88 + 2 * (i % 4),
        "subsample_mode": "off" if i % 10 == 9 else "on",
        "interlace": i % 7 == 3,
        "optimize_coding": True,
    }
    if i % 4 == 1:
        image = image.icc_transform(p3_path, input_profile="srgb", embedded=False)
    # Phones store portraits turned and say so in EXIF: 6 = turn 90° clockwise to show.
    if i % 3 == 0:
        orientation = 6 if i % 2 == 0 else 8
        image = image.rot270() if orientation == 6 else image.rot90()
        image = image.copy()
        image.set_type(pyvips.GValue.gint_type, "orientation", orientation)
        image.set_type(pyvips.GValue.gint_type, "exif-ifd0-Orientation", orientation)
    image.jpegsave(str(out), **options)


def heic(jpeg, out):
    """`jpeg` as a phone's HEIC, in a process of its own: pillow-heif brings its own libheif,
    which cannot share a process with the one libvips links (they crash)."""
    subprocess.run([sys.executable, __file__, "--heic", str(jpeg), str(out)], check=True)


def save_heic(jpeg, out):
    """`jpeg` as a phone's HEIC: the same pixels as stored, orientation and profile."""
    import pillow_heif
    from PIL import Image

    pillow_heif.options.GRID_TILE_SIZE = 512
    with Image.open(jpeg) as image:
        heif = pillow_heif.from_pillow(image)
        options = {"quality": 80, "exif": image.info.get("exif")}
        if image.info.get("icc_profile"):
            options["icc_profile"] = image.info["icc_profile"]
        heif.save(str(out), **options)


def main():
    if sys.argv[1] == "--heic":
        return save_heic(sys.argv[2], sys.argv[3])
    out = pathlib.Path(sys.argv[1])
    files = sources()
    if len(files) < 8:
        sys.exit(f"only {len(files)} source photos under {ROOTS}: install the wallpaper packages")
    stamp = hashlib.sha256(pathlib.Path(__file__).read_bytes() + "\n".join(files).encode()).hexdigest()
    if (out / "stamp").is_file() and (out / "stamp").read_text() == stamp:
        return
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("*.jpg"), *out.glob("*.heic")]:
        old.unlink()
    p3 = out / "display-p3.icc"
    p3.write_bytes(display_p3_icc())
    for i in range(COUNT):
        make(i, files[i % len(files)], str(p3), out / f"photo-{i:02}.jpg")
        if i % 5 == 0:
            heic(out / f"photo-{i:02}.jpg", out / f"photo-{i:02}.heic")
        print(f"\rcorpus: {i + 1}/{COUNT}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    (out / "stamp").write_text(stamp)


if __name__ == "__main__":
    main()
