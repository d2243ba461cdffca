//! `./dev bench gateway`: the gateway's pipeline (decode → orient → resize to 2048 and 320 →
//! encode) against libvips' `vips thumbnail` doing the same work, on the same files, one image
//! at a time and single-threaded (`VIPS_CONCURRENCY=1`), each image in its own process under
//! `/usr/bin/time` so both sides' wall time and peak RSS are measured the same way.
//!
//! Corpus: the JPEG wallpapers of Debian's `lomiri-wallpapers-20.04` and `ukui-wallpapers`
//! (8–24 MP, baseline and progressive) in `/usr/share/backgrounds`, plus a generated 3000×2000
//! PNG with alpha.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use follow_image_gateway::{config::PipelineConfig, pipeline, sniff};

const CORPUS: &str = "/usr/share/backgrounds";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--one") {
        return one(Path::new(&args[i + 1]));
    }
    if args.iter().any(|a| a == "--noop") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut corpus: Vec<(PathBuf, u64)> = std::fs::read_dir(CORPUS)
        .unwrap_or_else(|e| {
            panic!("{CORPUS}: {e} (install lomiri-wallpapers-20.04 ukui-wallpapers)")
        })
        .filter_map(|e| {
            let path = e.ok()?.path();
            let size = imagesize::size(&path).ok()?;
            let pixels = (size.width * size.height) as u64;
            (path.extension()? == "jpg" && pixels >= 8_000_000).then_some((path, pixels))
        })
        .collect();
    corpus.sort();
    let png = tmp.path().join("alpha.png");
    image::DynamicImage::ImageRgba8(image::ImageBuffer::from_fn(3000, 2000, |x, y| {
        image::Rgba([
            (x % 256) as u8,
            (y % 256) as u8,
            ((x + y) % 256) as u8,
            (x / 12 % 256) as u8,
        ])
    }))
    .save(&png)
    .unwrap();
    let me = std::env::current_exe().unwrap();
    let baseline = measure(Command::new(&me).arg("--noop")).1;
    let vips_baseline = measure(Command::new("vips").arg("--version")).1;
    println!("gateway pipeline vs libvips, one image at a time, single-threaded, 2 shared cores");
    println!(
        "{:<40} {:>6} {:>9} {:>9} {:>8} {:>9} {:>10} {:>10}",
        "file", "MP", "ours s", "vips s", "speed", "ours MiB", "ours x dec", "vips x dec"
    );
    let (mut ours_jpeg, mut vips_jpeg, mut worst_memory) = (0.0, 0.0, 0.0f64);
    let mut worst_vips_memory = 0.0f64;
    let files = corpus
        .iter()
        .cloned()
        .chain(std::iter::once((png.clone(), 6_000_000)));
    for (path, pixels) in files {
        let (ours_s, ours_kib) = measure(Command::new(&me).arg("--one").arg(&path));
        let main = tmp.path().join("main.jpg");
        let first = measure(
            Command::new("vips")
                .env("VIPS_CONCURRENCY", "1")
                .arg("thumbnail")
                .arg(&path)
                .arg(format!("{}[Q=85,strip]", main.display()))
                .arg("2048"),
        );
        let second = measure(
            Command::new("vips")
                .env("VIPS_CONCURRENCY", "1")
                .arg("thumbnail")
                .arg(&main)
                .arg(format!(
                    "{}[Q=85,strip]",
                    tmp.path().join("preview.jpg").display()
                ))
                .arg("320"),
        );
        let vips_s = first.0 + second.0;
        let decoded = pixels as f64 * 3.0;
        let memory = (ours_kib.saturating_sub(baseline) as f64 * 1024.0) / decoded;
        let vips_memory =
            (first.1.max(second.1).saturating_sub(vips_baseline) as f64 * 1024.0) / decoded;
        if path.extension().is_some_and(|e| e == "jpg") {
            ours_jpeg += ours_s;
            vips_jpeg += vips_s;
            worst_memory = worst_memory.max(memory);
            worst_vips_memory = worst_vips_memory.max(vips_memory);
        }
        println!(
            "{:<40} {:>6.1} {:>9.3} {:>9.3} {:>7.2}x {:>9.0} {:>10.2} {:>10.2}",
            path.file_name().unwrap().to_string_lossy(),
            pixels as f64 / 1e6,
            ours_s,
            vips_s,
            vips_s / ours_s,
            ours_kib as f64 / 1024.0,
            memory,
            vips_memory,
        );
    }
    let n = corpus.len() as f64;
    println!("JPEG corpus ({} files):", corpus.len());
    println!("  ours  {:>7.2} images/s", n / ours_jpeg);
    println!("  vips  {:>7.2} images/s", n / vips_jpeg);
    println!(
        "  ratio {:>7.2}x libvips throughput per core (target >= 1.0)",
        vips_jpeg / ours_jpeg
    );
    println!(
        "  peak memory per image, worst: {worst_memory:.2}x its decoded RGB size (target <= 1.5); vips {worst_vips_memory:.2}x"
    );
}

/// One image through the pipeline, as the gateway runs it.
fn one(path: &Path) {
    let bytes = std::fs::read(path).unwrap();
    let format = sniff::sniff(&bytes[..sniff::MAGIC_LEN]).unwrap();
    pipeline::run(&bytes, format, &PipelineConfig::default(), |_| {}).unwrap();
}

/// Wall seconds and peak RSS (KiB) of a command, from GNU time.
fn measure(command: &mut Command) -> (f64, u64) {
    let program = command.get_program().to_owned();
    let args: Vec<_> = command.get_args().map(ToOwned::to_owned).collect();
    let envs: Vec<_> = command
        .get_envs()
        .map(|(k, v)| (k.to_owned(), v.map(ToOwned::to_owned)))
        .collect();
    let mut timed = Command::new("/usr/bin/time");
    timed.arg("-f").arg("%e %M").arg(program).args(args);
    for (k, v) in envs {
        if let Some(v) = v {
            timed.env(k, v);
        }
    }
    let output = timed.output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    let last = stderr.lines().last().unwrap();
    let mut parts = last.split_whitespace();
    let seconds: f64 = parts.next().unwrap().parse().unwrap();
    let kib: u64 = parts.next().unwrap().parse().unwrap();
    (seconds, kib)
}
