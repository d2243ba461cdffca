//! HEIF only, seeded with the phone-like files of `tests/fixtures/heic/` (grids, 10-bit, `irot`,
//! ICC and `nclx`, alpha): mutations of real box trees reach libheif's parsers and the tiles'
//! decoding, where random bytes stop at the `ftyp` box. The same promise as `validate`: an image
//! or a typed refusal, never a panic, never more memory than the pixel limit allows.
#![no_main]

use follow_image_gateway::{config::PipelineConfig, pipeline, sniff::{self, Format}};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let config = PipelineConfig { max_pixels: 4_000_000, long_edge: 256, preview_edge: 64, ..PipelineConfig::default() };
    let _ = sniff::check_header(data, config.max_pixels);
    let _ = pipeline::run(data, Format::Heif, &config, |_| {});
});
