//! `./dev bench gateway`: the gateway's pipeline against libvips doing exactly the same work,
//! compared fairly.
//!
//! - Same work: both make a 2048 px and a 320 px JPEG (quality 85, 4:2:0, optimized Huffman
//!   tables, metadata stripped, Lanczos3 — after boxes where the reduction is 4× or more, as
//!   libvips' `resize` with its default gap —, libvips' shrink-on-load rule, EXIF orientation
//!   applied, an ICC profile converted to sRGB), the preview from the 2048 pixels in memory;
//!   each also as WebP (libwebp, the gateway's quality and method, metadata stripped).
//!   libvips runs `thumbnail_buffer` in one long-lived pyvips process (`vips_worker.py`,
//!   `VIPS_CONCURRENCY=1`, operation cache off), ours in this process; every image is in
//!   memory on both sides before timing starts.
//! - Same conditions: both processes pinned to the same core; CPU time of the whole process
//!   (all threads) per image; a warm-up pass, then `FOLLOW_BENCH_RUNS` (default 10) timed passes
//!   with the two sides interleaved per image and taking turns going first.
//! - Same quality, measured: each output's SSIMULACRA2 score against a reference made from the
//!   full decode (orientation and colour applied) resized with Lanczos3 at 16 bits, and its
//!   size in bytes.
//!
//! Reported per image and overall: median CPU seconds and spread, the ratio, output bytes and
//! scores, and the peak memory of each side (resident growth in a fresh process, so
//! libjpeg-turbo's own allocations count) over the buffer our decode makes; overall images per
//! CPU-second and the geometric mean of the per-image ratios.
//!
//! Corpus: `corpus.py` makes 60 phone-like photos (8–48 MP, 4:2:0 mostly, a third turned with
//! EXIF orientation 6/8, some Display P3, some progressive) from the photos of Debian's
//! wallpaper packages, under `target/bench-corpus` (rebuilt only when the script changes), and
//! 12 of them again as a phone's HEIC (grids of 512-pixel tiles, `irot`, the same profile).
//! The JPEGs and the HEICs are two sections, each reported on its own: the HEIC section is the
//! same work from a HEIC decode (libheif 1.23 with libde265 here; Debian's libvips decodes
//! through its libheif 1.15 with the same libde265).
#![allow(clippy::unwrap_used, clippy::print_stdout, clippy::print_stderr)]

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
};

use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer, images::Image};
use follow_bus::OutputRole;
use follow_image_gateway::{config::PipelineConfig, pipeline, sniff};
use image::{DynamicImage, ImageDecoder, ImageReader};
use ssimulacra2::{ColorPrimaries, Rgb, TransferCharacteristic, compute_frame_ssimulacra2};

const BENCHES: &str = env!("CARGO_MANIFEST_DIR");

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--memory") {
        return memory(Path::new(&args[i + 1]));
    }
    let runs: usize = std::env::var("FOLLOW_BENCH_RUNS").map_or(10, |r| r.parse().unwrap());
    let cores = std::thread::available_parallelism().unwrap().get();
    let corpus = Path::new(BENCHES).join("../../target/bench-corpus");
    let built = Command::new("python3")
        .arg(Path::new(BENCHES).join("benches/corpus.py"))
        .arg(&corpus)
        .status()
        .unwrap();
    assert!(built.success(), "corpus.py failed");
    // `FOLLOW_BENCH_SECTIONS=heic` (or `jpeg`) runs one section alone.
    let sections =
        std::env::var("FOLLOW_BENCH_SECTIONS").unwrap_or_else(|_| "jpeg,heic,formats".into());
    for (label, extension) in [("JPEG", "jpg"), ("HEIC", "heic")] {
        if !sections.split(',').any(|s| s.eq_ignore_ascii_case(label)) {
            continue;
        }
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&corpus)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == extension))
            .collect();
        paths.sort();
        section(label, &paths, runs, (cores - 1, cores));
        println!();
    }
    if sections.split(',').any(|s| s == "formats") {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&corpus)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
            .collect();
        paths.sort();
        formats(&paths, cores - 1);
    }
}

/// The formats section: the 2048 px pixels the gateway makes of every sixth corpus JPEG,
/// encoded as its JPEG, as WebP at several qualities and methods (ours: libwebp) and as AVIF at
/// several qualities and efforts (libvips' `heifsave`: libheif with libaom), all on one core;
/// each scored (SSIMULACRA2 against the full decode) and timed (median CPU of 3 after a
/// warm-up; AVIF once, it is slow). Says which WebP quality scores as the JPEG does, and what an
/// AVIF of that score costs beside the whole pipeline.
fn formats(paths: &[PathBuf], core: usize) {
    let config = config();
    let dir = tempfile::tempdir().unwrap();
    pin(core);
    // Per setting, each photo's measures.
    let mut table: Vec<(String, Vec<Measured>)> = Vec::new();
    let mut add = |label: String, (score, bytes, cpu): (f64, usize, f64)| {
        let measured = Measured { score, bytes, cpu };
        match table.iter_mut().find(|(l, _)| *l == label) {
            Some((_, rows)) => rows.push(measured),
            None => table.push((label, vec![measured])),
        }
    };
    let photos: Vec<&PathBuf> = paths.iter().step_by(6).collect();
    for (i, path) in photos.iter().enumerate() {
        eprintln!("formats: photo {} of {}", i + 1, photos.len());
        let photo = Photo::read(path);
        let reference = photo.reference();
        add(
            "whole pipeline".into(),
            (0.0, 0, timed(|| photo.ours(&config).files.len())),
        );
        let main = main_pixels(&photo, &config);
        let jpeg = pipeline::encode(&main, config.jpeg_quality).unwrap().bytes;
        let cpu = timed(|| pipeline::encode(&main, config.jpeg_quality).unwrap());
        add(
            format!("JPEG q{}", config.jpeg_quality),
            (score(&reference, &jpeg), jpeg.len(), cpu),
        );
        for (quality, method) in [(80, 4), (90, 4), (90, 2), (92, 2), (94, 2), (92, 0)] {
            let webp = pipeline::encode_webp(&main, quality, method).unwrap().bytes;
            let cpu = timed(|| pipeline::encode_webp(&main, quality, method).unwrap());
            add(
                format!("WebP q{quality} method {method}"),
                (score(&reference, &webp), webp.len(), cpu),
            );
        }
        let png = dir.path().join(format!("{i}.png"));
        main.save(&png).unwrap();
        let out = Command::new("python3")
            .arg(Path::new(BENCHES).join("benches/vips_worker.py"))
            .args(["--avif", &core.to_string()])
            .arg(dir.path())
            .arg(&png)
            .env("VIPS_CONCURRENCY", "1")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for line in String::from_utf8(out.stdout).unwrap().lines() {
            let [_, q, effort, cpu, bytes, decoded] = line.split(' ').collect::<Vec<_>>()[..]
            else {
                panic!("vips_worker.py --avif: {line:?}");
            };
            let decoded = std::fs::read(decoded).unwrap();
            add(
                format!("AVIF Q{q} effort {effort}"),
                (
                    score(&reference, &decoded),
                    bytes.parse().unwrap(),
                    cpu.parse().unwrap(),
                ),
            );
        }
    }
    println!(
        "formats: the gateway's 2048 px pixels of {} corpus photos as JPEG, WebP (ours, \
         libwebp) and AVIF (libvips heifsave: libheif + libaom, VIPS_CONCURRENCY=1), one core; \
         score: mean SSIMULACRA2 against the full decode; CPU: median of 3 after a warm-up \
         (AVIF: one encode)",
        photos.len()
    );
    println!(
        "{:<22} {:>8} {:>10} {:>9}",
        "encoding", "score", "bytes", "CPU ms"
    );
    let mean = |rows: &[Measured], f: fn(&Measured) -> f64| {
        rows.iter().map(f).sum::<f64>() / rows.len() as f64
    };
    for (label, rows) in &table {
        println!(
            "{label:<22} {:>8.2} {:>10} {:>9.1}",
            mean(rows, |r| r.score),
            rows.iter().map(|r| r.bytes).sum::<usize>(),
            1e3 * mean(rows, |r| r.cpu)
        );
    }
}

/// One encoding of one photo in the formats section.
struct Measured {
    /// SSIMULACRA2.
    score: f64,
    bytes: usize,
    /// CPU seconds.
    cpu: f64,
}

/// The main image's pixels as the pipeline makes them: decoded, shrunk, sRGB, upright.
fn main_pixels(photo: &Photo, config: &PipelineConfig) -> DynamicImage {
    let decoded = pipeline::decode(
        &photo.bytes,
        photo.format,
        config.max_pixels,
        config.long_edge,
    )
    .unwrap();
    pipeline::main_image(
        decoded.image,
        decoded.colours.as_ref(),
        decoded.orientation,
        config.long_edge,
    )
    .unwrap()
}

/// Median CPU seconds of 3 runs of `work`, after one to warm up.
fn timed<T>(mut work: impl FnMut() -> T) -> f64 {
    std::hint::black_box(work());
    let mut runs: Vec<f64> = (0..3)
        .map(|_| {
            let start = cpu_seconds();
            std::hint::black_box(work());
            cpu_seconds() - start
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    runs[1]
}

/// One section of the bench: these photos through both sides, reported.
fn section(label: &str, paths: &[PathBuf], runs: usize, (core, cores): (usize, usize)) {
    let photos: Vec<Photo> = paths.iter().map(|p| Photo::read(p)).collect();
    let config = config();
    let mut vips = Vips::start(core, paths);
    let out = tempfile::tempdir().unwrap();

    // Warm-up: one pass of each side, keeping the outputs for scoring and our peak memory.
    eprintln!("{label}: warm-up pass, outputs kept for scoring");
    let mut rows: Vec<Row> = photos
        .iter()
        .enumerate()
        .map(|(i, photo)| {
            let prefix = out.path().join(format!("{i}"));
            vips.run(i, Some(&prefix));
            let ours = photo.ours(&config);
            Row {
                ours: OUTPUTS.map(|(role, content_type, _)| {
                    ours.file(role, content_type).unwrap().bytes.clone()
                }),
                theirs: OUTPUTS
                    .map(|(.., name)| std::fs::read(prefix.with_extension(name)).unwrap()),
                memory: peak_memory(&paths[i]),
                ..Row::default()
            }
        })
        .collect();

    eprintln!("{label}: scoring outputs (SSIMULACRA2 against full-decode Lanczos3 references)");
    for (photo, row) in photos.iter().zip(&mut rows) {
        let reference = photo.reference();
        for output in 0..OUTPUTS.len() {
            row.ours_score[output] = score(&reference, &row.ours[output]);
            row.theirs_score[output] = score(&reference, &row.theirs[output]);
        }
    }

    pin(core);
    eprintln!("{label}: {runs} timed passes, interleaved");
    for run in 0..runs {
        for (i, (photo, row)) in photos.iter().zip(&mut rows).enumerate() {
            let mut ours = || {
                let start = cpu_seconds();
                std::hint::black_box(photo.ours(&config));
                row.ours_cpu.push(cpu_seconds() - start);
            };
            if (run + i) % 2 == 0 {
                ours();
                row.theirs_cpu.push(vips.run(i, None));
            } else {
                row.theirs_cpu.push(vips.run(i, None));
                ours();
            }
        }
    }
    vips.stop();
    report(label, &photos, &rows, runs, (core, cores), &vips.version);
}

/// Peak memory for one photo, ours and libvips', each over the size of the buffer our decode
/// makes: measured in a fresh process of each side (`--memory`).
fn peak_memory(path: &Path) -> [f64; 2] {
    let output = |command: &mut Command| {
        let out = command.arg("--memory").arg(path).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let ours = output(&mut Command::new(std::env::current_exe().unwrap()));
    let theirs = output(
        Command::new("python3")
            .arg(Path::new(BENCHES).join("benches/vips_worker.py"))
            .env("VIPS_CONCURRENCY", "1"),
    );
    let (peak, decoded) = ours.trim().split_once(' ').unwrap();
    let decoded: f64 = decoded.parse().unwrap();
    [peak, theirs.trim()].map(|peak| peak.parse::<f64>().unwrap() / decoded)
}

/// `--memory PATH`: how far the resident set grows at its peak while the pipeline runs, and the
/// decoded buffer's size. Resident memory, not Rust's heap: libjpeg-turbo allocates through
/// `malloc` (a progressive JPEG's coefficients, its row buffers); the high-water mark is reset
/// (`clear_refs` 5) once the photo is in memory.
fn memory(path: &Path) {
    let config = config();
    let photo = Photo::read(path);
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let before = resident_kib("VmRSS:");
    drop(photo.ours(&config));
    let peak = (resident_kib("VmHWM:") - before) * 1024;
    let decoded = pipeline::decode(
        &photo.bytes,
        photo.format,
        config.max_pixels,
        config.long_edge,
    )
    .unwrap()
    .image
    .as_bytes()
    .len();
    println!("{peak} {decoded}");
}

/// The gateway's defaults, the WebP quality from `FOLLOW_WEBP_QUALITY` if set (libvips' side
/// reads it too).
fn config() -> PipelineConfig {
    let mut config = PipelineConfig::default();
    if let Ok(quality) = std::env::var("FOLLOW_WEBP_QUALITY") {
        config.webp_quality = quality.parse().unwrap();
    }
    config
}

/// A `/proc/self/status` figure in KiB.
fn resident_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find_map(|l| l.strip_prefix(field)).unwrap();
    line.trim().trim_end_matches(" kB").parse().unwrap()
}

/// One corpus photo, in memory.
struct Photo {
    name: String,
    bytes: Vec<u8>,
    format: sniff::Format,
    width: u32,
    height: u32,
    tags: String,
    /// What bounds its peak memory, for the report's worst cases.
    kind: Kind,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Baseline,
    /// A progressive JPEG's coefficients are 1× its RGB pixels for 4:2:0, 1.33× for 4:2:2, 2×
    /// for 4:4:4 — the floor of its peak memory.
    Progressive420,
    ProgressiveOther,
    Heic,
}

impl Photo {
    fn read(path: &Path) -> Self {
        let bytes = std::fs::read(path).unwrap();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let format = sniff::sniff(&bytes[..sniff::MAGIC_LEN]).unwrap();
        if format == sniff::Format::Heif {
            let decoded = pipeline::decode(&bytes, format, u64::MAX, u32::MAX).unwrap();
            let mut tags = vec!["heic"];
            if decoded.colours.is_some() {
                tags.push("icc");
            }
            return Self {
                name,
                bytes,
                format,
                width: decoded.width,
                height: decoded.height,
                tags: tags.join(","),
                kind: Kind::Heic,
            };
        }
        let frame = sniff::jpeg_frame(&bytes).unwrap();
        let mut decoder = ImageReader::new(std::io::Cursor::new(&bytes))
            .with_guessed_format()
            .unwrap()
            .into_decoder()
            .unwrap();
        let (width, height) = decoder.dimensions();
        let mut tags = Vec::new();
        match decoder.orientation().unwrap() {
            image::metadata::Orientation::Rotate90 => tags.push("o6"),
            image::metadata::Orientation::Rotate270 => tags.push("o8"),
            _ => {}
        }
        if decoder.icc_profile().unwrap().is_some() {
            tags.push("icc");
        }
        drop(decoder);
        let progressive = frame.process == 2;
        if progressive {
            tags.push("prog");
        }
        let subsamp = turbojpeg::read_header(&bytes).unwrap().subsamp;
        match subsamp {
            turbojpeg::Subsamp::Sub2x2 => {}
            turbojpeg::Subsamp::Sub2x1 => tags.push("422"),
            turbojpeg::Subsamp::None => tags.push("444"),
            _ => tags.push("other"),
        }
        let kind = match (progressive, subsamp) {
            (false, _) => Kind::Baseline,
            (true, turbojpeg::Subsamp::Sub2x2) => Kind::Progressive420,
            (true, _) => Kind::ProgressiveOther,
        };
        Self {
            name,
            bytes,
            format,
            width,
            height,
            tags: tags.join(","),
            kind,
        }
    }

    fn ours(&self, config: &PipelineConfig) -> pipeline::Output {
        pipeline::run(&self.bytes, self.format, config, |_| {}).unwrap()
    }

    /// The full decode, in sRGB, turned upright, at 16 bits per channel.
    fn reference(&self) -> DynamicImage {
        if self.format == sniff::Format::Heif {
            // libheif's decode is upright already; 10-bit files come out at 8 bits.
            let decoded = pipeline::decode(&self.bytes, self.format, u64::MAX, u32::MAX).unwrap();
            let mut image = decoded.image;
            if let Some(colours) = &decoded.colours {
                pipeline::to_srgb(&mut image, colours);
            }
            return DynamicImage::ImageRgb16(image.to_rgb16());
        }
        let mut decoder = ImageReader::new(std::io::Cursor::new(&self.bytes))
            .with_guessed_format()
            .unwrap()
            .into_decoder()
            .unwrap();
        let orientation = decoder.orientation().unwrap();
        let profile = decoder.icc_profile().unwrap();
        let mut image = DynamicImage::from_decoder(decoder).unwrap();
        if let Some(profile) = profile {
            pipeline::to_srgb(&mut image, &pipeline::Colours::Icc(profile));
        }
        image.apply_orientation(orientation);
        DynamicImage::ImageRgb16(image.to_rgb16())
    }
}

/// SSIMULACRA2 of an encoded output against the reference resized (Lanczos3, 16 bits) to its
/// size: 100 is identical, 90 visually lossless, 70 high quality.
fn score(reference: &DynamicImage, encoded: &[u8]) -> f64 {
    let output = image::load_from_memory(encoded).unwrap().to_rgb8();
    let (w, h) = output.dimensions();
    let mut resized = Image::new(w, h, PixelType::U16x3);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3));
    Resizer::new()
        .resize(reference, &mut resized, &options)
        .unwrap();
    let wanted: Vec<[f32; 3]> = resized
        .buffer()
        .chunks_exact(6)
        .map(|p| {
            let c = |i: usize| f32::from(u16::from_le_bytes([p[i], p[i + 1]])) / 65535.0;
            [c(0), c(2), c(4)]
        })
        .collect();
    let got: Vec<[f32; 3]> = output
        .pixels()
        .map(|p| p.0.map(|c| f32::from(c) / 255.0))
        .collect();
    let frame = |data| {
        Rgb::new(
            data,
            w as usize,
            h as usize,
            TransferCharacteristic::SRGB,
            ColorPrimaries::BT709,
        )
        .unwrap()
    };
    compute_frame_ssimulacra2(frame(wanted), frame(got)).unwrap()
}

/// The outputs both sides make, in [`Row`]'s order.
const OUTPUTS: [(OutputRole, &str, &str); 4] = [
    (OutputRole::Main, "image/jpeg", "main.jpg"),
    (OutputRole::Preview, "image/jpeg", "preview.jpg"),
    (OutputRole::Main, "image/webp", "main.webp"),
    (OutputRole::Preview, "image/webp", "preview.webp"),
];

/// What one photo measured, on both sides (outputs in [`OUTPUTS`]' order).
#[derive(Default)]
struct Row {
    ours: [Vec<u8>; 4],
    theirs: [Vec<u8>; 4],
    ours_score: [f64; 4],
    theirs_score: [f64; 4],
    ours_cpu: Vec<f64>,
    theirs_cpu: Vec<f64>,
    /// Peak resident memory while processing, [ours, libvips'], over the size of the buffer our
    /// decode made.
    memory: [f64; 2],
}

/// The long-lived libvips process.
struct Vips {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    version: String,
}

impl Vips {
    fn start(core: usize, files: &[PathBuf]) -> Self {
        let mut child = Command::new("python3")
            .arg(Path::new(BENCHES).join("benches/vips_worker.py"))
            .arg(core.to_string())
            .args(files)
            .env("VIPS_CONCURRENCY", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut ready = String::new();
        stdout.read_line(&mut ready).unwrap();
        let version = ready
            .strip_prefix("ready ")
            .unwrap_or_else(|| panic!("vips_worker.py: {ready:?} (is pyvips installed?)"))
            .trim()
            .to_owned();
        Self {
            child,
            stdin,
            stdout,
            version,
        }
    }

    /// CPU seconds for image `index`; with a prefix, its outputs are written there.
    fn run(&mut self, index: usize, keep: Option<&Path>) -> f64 {
        let prefix = keep.map_or("-".into(), |p| p.display().to_string());
        writeln!(self.stdin, "{index} {prefix}").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line.split_whitespace().next().unwrap().parse().unwrap()
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Pins this process's threads (and the decoder's, which inherit it) to one core.
fn pin(core: usize) {
    let mut set = rustix::thread::CpuSet::new();
    set.set(core);
    rustix::thread::sched_setaffinity(None, &set).unwrap();
}

/// CPU time of the whole process, every thread.
fn cpu_seconds() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// (max - min) / median, in percent.
fn spread(values: &[f64]) -> f64 {
    let max = values.iter().copied().fold(f64::MIN, f64::max);
    let min = values.iter().copied().fold(f64::MAX, f64::min);
    100.0 * (max - min) / median(values)
}

fn report(
    label: &str,
    photos: &[Photo],
    rows: &[Row],
    runs: usize,
    (core, cores): (usize, usize),
    version: &str,
) {
    let webp_quality = config().webp_quality;
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    println!("{label}: gateway pipeline vs {version} (pyvips), the same work, one core each");
    println!(
        "conditions: {} photos in memory; both processes pinned to core {core} of {} ({cpu}); \
         VIPS_CONCURRENCY=1, libvips cache off; CPU time of the whole process per image; \
         1 warm-up pass then {runs} passes, the two sides interleaved per image, alternating \
         which goes first",
        photos.len(),
        cores,
    );
    println!(
        "work on both sides: 2048 and 320 px JPEG, quality 85, 4:2:0, optimized Huffman \
         tables, stripped, Lanczos3 (boxes first from 4x: libvips' gap 2), libvips' \
         shrink-on-load rule, orientation applied, ICC -> sRGB; preview from the 2048 pixels; \
         each also as WebP (libwebp, quality {webp_quality}, method {})",
        pipeline::WEBP_METHOD
    );
    println!(
        "score: SSIMULACRA2 (higher is better; 90 ~ visually lossless) of each output against \
         the full decode resized with Lanczos3 at 16 bits"
    );
    println!();
    println!(
        "{:<9} {:>5} {:<16} {:>8} {:>5} {:>8} {:>5} {:>6} {:>8} {:>8} {:>13} {:>13} {:>11}",
        "photo",
        "MP",
        "tags",
        "ours ms",
        "±%",
        "vips ms",
        "±%",
        "ratio",
        "ours KB",
        "vips KB",
        "main ours/vips",
        "prev ours/vips",
        "mem× ours/vips"
    );
    let (mut log_ratio, mut ours_total, mut theirs_total) = (0.0, 0.0, 0.0);
    let (mut ours_bytes, mut theirs_bytes) = (0usize, 0usize);
    let (mut ours_score, mut theirs_score) = ([0.0; 4], [0.0; 4]);
    let (mut ours_format_bytes, mut theirs_format_bytes) = ([0usize; 2], [0usize; 2]);
    let (mut worst_ratio, mut best_ratio) = (f64::MAX, 0.0f64);
    // Worst peak memory [ours, libvips'] per kind: baseline, progressive 4:2:0, other
    // progressive, HEIC.
    let mut worst_memory = [[0.0f64; 2]; 4];
    for (photo, row) in photos.iter().zip(rows) {
        let (ours, theirs) = (median(&row.ours_cpu), median(&row.theirs_cpu));
        let ratio = theirs / ours;
        log_ratio += ratio.ln();
        worst_ratio = worst_ratio.min(ratio);
        best_ratio = best_ratio.max(ratio);
        ours_total += ours;
        theirs_total += theirs;
        let ob: usize = row.ours[..2].iter().map(Vec::len).sum();
        let tb: usize = row.theirs[..2].iter().map(Vec::len).sum();
        ours_bytes += ob;
        theirs_bytes += tb;
        for o in 0..OUTPUTS.len() {
            ours_score[o] += row.ours_score[o];
            theirs_score[o] += row.theirs_score[o];
            ours_format_bytes[o / 2] += row.ours[o].len();
            theirs_format_bytes[o / 2] += row.theirs[o].len();
        }
        let worst = &mut worst_memory[photo.kind as usize];
        *worst = [0, 1].map(|side| worst[side].max(row.memory[side]));
        println!(
            "{:<9} {:>5.1} {:<16} {:>8.1} {:>5.1} {:>8.1} {:>5.1} {:>5.2}x {:>8.1} {:>8.1} {:>6.1}/{:<6.1} {:>6.1}/{:<6.1} {:>5.2}/{:<5.2}",
            photo.name,
            f64::from(photo.width) * f64::from(photo.height) / 1e6,
            photo.tags,
            ours * 1e3,
            spread(&row.ours_cpu),
            theirs * 1e3,
            spread(&row.theirs_cpu),
            ratio,
            ob as f64 / 1e3,
            tb as f64 / 1e3,
            row.ours_score[0],
            row.theirs_score[0],
            row.ours_score[1],
            row.theirs_score[1],
            row.memory[0],
            row.memory[1],
        );
    }
    let n = photos.len() as f64;
    println!();
    println!(
        "images per CPU-second: ours {:.2}, libvips {:.2} ({:.2}x)",
        n / ours_total,
        n / theirs_total,
        theirs_total / ours_total
    );
    println!(
        "per-image speed ratio (libvips CPU / ours): geometric mean {:.2}x, range {:.2}x..{:.2}x (target >= 1.5x)",
        (log_ratio / n).exp(),
        worst_ratio,
        best_ratio
    );
    println!(
        "JPEG output bytes: ours {ours_bytes}, libvips {theirs_bytes} ({:+} B, {:.5}x; target <= 1.0x)",
        ours_bytes as i64 - theirs_bytes as i64,
        ours_bytes as f64 / theirs_bytes as f64
    );
    println!(
        "mean SSIMULACRA2: main ours {:.2} vs libvips {:.2}; preview ours {:.2} vs libvips {:.2} (target: ours >= libvips - 1)",
        ours_score[0] / n,
        theirs_score[0] / n,
        ours_score[1] / n,
        theirs_score[1] / n
    );
    println!(
        "WebP (quality {webp_quality}): mean SSIMULACRA2 main ours {:.2} vs libvips {:.2}, preview ours \
         {:.2} vs libvips {:.2}; bytes ours {} ({:.1} % of our JPEGs'), libvips {} (target: \
         WebP scores within 1 of the JPEG's, fewer bytes)",
        ours_score[2] / n,
        theirs_score[2] / n,
        ours_score[3] / n,
        theirs_score[3] / n,
        ours_format_bytes[1],
        100.0 * ours_format_bytes[1] as f64 / ours_format_bytes[0] as f64,
        theirs_format_bytes[1],
    );
    let [baseline, progressive, other, heic] = worst_memory;
    if label == "HEIC" {
        println!(
            "peak memory (resident growth) per image, worst, over the buffer our decode makes: \
             ours {:.2}x, libvips {:.2}x (libheif holds the decoded YCbCr planes beside the RGB)",
            heic[0], heic[1]
        );
        return;
    }
    println!(
        "peak memory (resident growth) per image, worst, over the buffer our decode makes \
         (target <= 1.5x): baseline ours {:.2}x, libvips {:.2}x; progressive 4:2:0 ours {:.2}x, \
         libvips {:.2}x; other progressive (coefficients alone: 1.33x for 4:2:2, 2x for \
         4:4:4) ours {:.2}x, libvips {:.2}x",
        baseline[0], baseline[1], progressive[0], progressive[1], other[0], other[1]
    );
}
