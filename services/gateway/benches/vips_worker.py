#!/usr/bin/env python3
"""libvips' side of `./dev bench gateway`: one long-lived process doing the gateway's work.

    VIPS_CONCURRENCY=1 vips_worker.py CORE FILE...

Pins itself to CPU core CORE, reads every FILE into memory, then answers one line per request on stdin:
`INDEX OUT_PREFIX` (OUT_PREFIX `-` to keep nothing) -> `CPU_SECONDS`, this process's CPU time
(all threads) for the image; with a prefix the outputs are written to OUT_PREFIX.main.jpg,
.preview.jpg, .main.webp and .preview.webp for scoring.

The work, as the gateway does it: `thumbnail` to a long edge of 2048 (never up; lanczos3,
after boxes where the reduction is 4x or more: the default gap of 2; libvips' shrink-on-load
rule; EXIF orientation applied; an embedded ICC profile converted to sRGB), saved as JPEG
quality 85, 4:2:0, optimized Huffman tables (as the gateway does), metadata stripped; then the
320 preview made from the 2048 pixels in memory (no second decode) and saved the same way; each
also saved as WebP (libwebp, quality FOLLOW_WEBP_QUALITY or 90, effort 4 = libwebp's method 4,
as the gateway's, metadata stripped). The operation cache is off.

    VIPS_CONCURRENCY=1 vips_worker.py --avif CORE OUT_DIR PNG...

pinned to CPU core CORE, encodes each PNG (the gateway's 2048 px pixels) as AVIF (libheif with libaom) at every quality
and effort of AVIF_GRID, one core, and prints `PNG Q EFFORT CPU_SECONDS BYTES DECODED_PNG` per
encode, the AVIF decoded back to DECODED_PNG for scoring.

    VIPS_CONCURRENCY=1 vips_worker.py --memory FILE

prints how far the resident set grows at its peak while doing that work for FILE (already in
memory, after a warm-up on a tiny image so that libvips' one-time set-up is not counted), as the
bench measures its own side.
"""

import os
import sys
import time

import pyvips

MAIN_EDGE = 2048
PREVIEW_EDGE = 320
SAVE = {"Q": 85, "strip": True, "subsample_mode": "on", "optimize_coding": True}
SAVE_WEBP = {"Q": int(os.environ.get("FOLLOW_WEBP_QUALITY", "90")), "strip": True, "effort": 4}
AVIF_GRID = [(q, 0) for q in (60, 70, 80, 85, 90)] + [(80, 2), (80, 4)]
OUTPUTS = ["main.jpg", "preview.jpg", "main.webp", "preview.webp"]


def run(buffer):
    header = pyvips.Image.new_from_buffer(buffer, "")
    colour = {"export_profile": "srgb"} if header.get_typeof("icc-profile-data") else {}
    main = pyvips.Image.thumbnail_buffer(buffer, MAIN_EDGE, size="down", **colour).copy_memory()
    preview = main.thumbnail_image(PREVIEW_EDGE, size="down").copy_memory()
    return [
        main.jpegsave_buffer(**SAVE),
        preview.jpegsave_buffer(**SAVE),
        main.webpsave_buffer(**SAVE_WEBP),
        preview.webpsave_buffer(**SAVE_WEBP),
    ]


def avif(core, out_dir, paths):
    os.sched_setaffinity(0, {core})
    for path in paths:
        image = pyvips.Image.new_from_file(path).copy_memory()
        for q, effort in AVIF_GRID:
            start = time.process_time()
            encoded = image.heifsave_buffer(compression="av1", Q=q, effort=effort, strip=True)
            cpu = time.process_time() - start
            decoded = os.path.join(out_dir, f"{os.path.basename(path)}.{q}.{effort}.png")
            pyvips.Image.new_from_buffer(encoded, "").pngsave(decoded, compression=1)
            print(f"{path} {q} {effort} {cpu:.6f} {len(encoded)} {decoded}", flush=True)


def resident_kib(field):
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field))
    return int(line.split()[1])


def memory(path):
    buffer = open(path, "rb").read()
    run(pyvips.Image.black(64, 48).jpegsave_buffer())
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    before = resident_kib("VmRSS:")
    run(buffer)
    print((resident_kib("VmHWM:") - before) * 1024)


def main():
    pyvips.cache_set_max(0)
    pyvips.cache_set_max_mem(0)
    pyvips.cache_set_max_files(0)
    if sys.argv[1] == "--memory":
        return memory(sys.argv[2])
    if sys.argv[1] == "--avif":
        return avif(int(sys.argv[2]), sys.argv[3], sys.argv[4:])
    os.sched_setaffinity(0, {int(sys.argv[1])})
    files = [open(path, "rb").read() for path in sys.argv[2:]]
    print(f"ready libvips {pyvips.version(0)}.{pyvips.version(1)}.{pyvips.version(2)}", flush=True)
    for line in sys.stdin:
        index, prefix = line.split()
        start = time.process_time()
        outputs = run(files[int(index)])
        cpu = time.process_time() - start
        if prefix != "-":
            for name, output in zip(OUTPUTS, outputs):
                with open(f"{prefix}.{name}", "wb") as out:
                    out.write(output)
        print(f"{cpu:.6f}", flush=True)


if __name__ == "__main__":
    main()
