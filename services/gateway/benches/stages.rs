//! Where the pipeline's time goes, stage by stage, for the JPEGs given (absolute paths: cargo
//! runs benches in the package's directory): best of 7 runs of each of `pipeline::run`'s
//! steps, one thread.
//!
//!     cargo bench -p follow-image-gateway --bench stages -- /abs/PHOTO.jpg ...
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::{path::PathBuf, time::Instant};

use follow_image_gateway::{config::PipelineConfig, pipeline};

const STAGES: [&str; 6] = [
    "decode",
    "resize",
    "ICC->sRGB",
    "turn",
    "encode 2048",
    "preview",
];

fn main() {
    let config = PipelineConfig::default();
    let photos: Vec<PathBuf> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .map(PathBuf::from)
        .collect();
    if photos.is_empty() {
        println!("usage: cargo bench -p follow-image-gateway --bench stages -- /abs/PHOTO.jpg ...");
        return;
    }
    println!("best of 7, milliseconds: {}", STAGES.join(" | "));
    for path in photos {
        let bytes = std::fs::read(&path).unwrap();
        let mut best = [f64::MAX; STAGES.len()];
        for _ in 0..7 {
            let mut times = [0.0; STAGES.len()];
            let mut timed = |stage: usize, start: Instant| {
                times[stage] = start.elapsed().as_secs_f64() * 1e3;
            };
            let start = Instant::now();
            let decoded = pipeline::decode(
                &bytes,
                follow_image_gateway::sniff::Format::Jpeg,
                config.max_pixels,
                config.long_edge,
            )
            .unwrap();
            timed(0, start);
            let start = Instant::now();
            let mut main = pipeline::shrunk(decoded.image, config.long_edge).unwrap();
            timed(1, start);
            let start = Instant::now();
            if let Some(colours) = &decoded.colours {
                pipeline::to_srgb(&mut main, colours);
            }
            timed(2, start);
            let start = Instant::now();
            pipeline::turn_upright(&mut main, decoded.orientation);
            timed(3, start);
            let start = Instant::now();
            std::hint::black_box(pipeline::encode(&main, config.jpeg_quality).unwrap());
            timed(4, start);
            let start = Instant::now();
            let preview = pipeline::scaled(&main, config.preview_edge).unwrap_or(main);
            std::hint::black_box(pipeline::encode(&preview, config.jpeg_quality).unwrap());
            timed(5, start);
            for (best, time) in best.iter_mut().zip(times) {
                *best = best.min(time);
            }
        }
        let figures: Vec<String> = best.iter().map(|t| format!("{t:.1}")).collect();
        let size = imagesize::blob_size(&bytes).unwrap();
        println!(
            "{} ({}x{}): {}",
            path.file_name().unwrap().to_string_lossy(),
            size.width,
            size.height,
            figures.join(" | ")
        );
    }
}
