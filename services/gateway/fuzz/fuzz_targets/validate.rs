//! Any bytes, declared as any accepted type: the pipeline answers with an image or a typed
//! refusal, never a panic, and never allocates beyond its pixel limit (small here, so the fuzzer
//! explores refusals quickly).
#![no_main]

use follow_image_gateway::{config::PipelineConfig, pipeline, sniff::{self, Format}};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let config = PipelineConfig { max_pixels: 4_000_000, long_edge: 256, preview_edge: 64, ..PipelineConfig::default() };
    let _ = sniff::sniff(&data[..data.len().min(sniff::MAGIC_LEN)]);
    let _ = sniff::check_header(data, config.max_pixels);
    for format in [Format::Jpeg, Format::Png, Format::WebP, Format::Heif] {
        let _ = pipeline::run(data, format, &config, |_| {});
    }
});
