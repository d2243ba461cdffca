//! The pipeline's outputs against a reference — the same photo decoded in full, turned upright,
//! resized with `image`'s Lanczos3 — within a tolerance, whichever path made them: shrink on
//! load, the banded resize, the orientation applied after the resize.
#![allow(clippy::unwrap_used)]

mod common;

use common::with_exif_orientation_6;
use follow_image_gateway::{config::PipelineConfig, pipeline};
use image::{
    DynamicImage, GenericImageView as _, ImageBuffer, ImageFormat, Rgb, codecs::jpeg::JpegEncoder,
    imageops::FilterType,
};

/// Smooth shapes with some detail, so the comparison measures resampling, not ringing at
/// artificial edges.
fn photo_like(width: u32, height: u32) -> Vec<u8> {
    let img = ImageBuffer::from_fn(width, height, |x, y| {
        let (fx, fy) = (x as f32 / width as f32, y as f32 / height as f32);
        let wave = |f: f32| (127.5 + 100.0 * f.sin()) as u8;
        Rgb([
            wave(fx * 9.0 + fy * 2.0),
            wave(fy * 7.0),
            wave((fx - fy) * 13.0),
        ])
    });
    let mut out = Vec::new();
    DynamicImage::ImageRgb8(img)
        .write_with_encoder(JpegEncoder::new_with_quality(&mut out, 95))
        .unwrap();
    out
}

/// Mean absolute difference per channel, 0–255.
fn mean_difference(a: &image::RgbImage, b: &image::RgbImage) -> f64 {
    let total: u64 = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| u64::from(x.abs_diff(*y)))
        .sum();
    total as f64 / a.as_raw().len() as f64
}

#[test]
fn outputs_match_a_full_size_lanczos3_reference_turned_or_not() {
    let config = PipelineConfig::default();
    for (width, height, turned) in [(5000, 1500, true), (3000, 2000, false), (1200, 900, true)] {
        let plain = photo_like(width, height);
        let body = if turned {
            with_exif_orientation_6(&plain)
        } else {
            plain.clone()
        };
        let out = pipeline::run(&body, ImageFormat::Jpeg, &config, |_| {}).unwrap();
        let mut reference = image::load_from_memory(&plain).unwrap();
        if turned {
            reference = reference.rotate90();
        }
        assert_eq!((out.width, out.height), reference.dimensions());
        for (encoded, edge) in [
            (&out.image, config.long_edge),
            (&out.preview, config.preview_edge),
        ] {
            let got = image::load_from_memory(&encoded.bytes).unwrap().to_rgb8();
            let (w, h) = got.dimensions();
            assert_eq!(w.max(h), edge.min(width.max(height)), "{width}x{height}");
            assert_eq!(w > h, reference.width() > reference.height(), "upright");
            let want = reference.resize_exact(w, h, FilterType::Lanczos3).to_rgb8();
            let difference = mean_difference(&got, &want);
            assert!(
                difference < 2.0,
                "{width}x{height} turned={turned} edge {edge}: mean difference {difference:.2}"
            );
        }
    }
}
