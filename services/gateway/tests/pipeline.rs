//! The pipeline's outputs against a reference — the same photo decoded in full, turned upright,
//! resized with `image`'s Lanczos3 — within a tolerance, whichever path made them: shrink on
//! load, the banded resize, the orientation applied after the resize.
#![allow(clippy::unwrap_used)]

mod common;

use common::{mean_difference, with_exif_orientation_6};
use follow_image_gateway::{
    config::PipelineConfig,
    pipeline::{self, Colours},
    sniff::Format,
};
use image::{
    DynamicImage, GenericImageView as _, ImageBuffer, Rgb, codecs::jpeg::JpegEncoder,
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
        let out = pipeline::run(&body, Format::Jpeg, &config, |_| {}).unwrap();
        let mut reference = image::load_from_memory(&plain).unwrap();
        if turned {
            reference = reference.rotate90();
        }
        assert_eq!((out.width, out.height), reference.dimensions());
        for (encoded, edge) in [
            (out.main(), config.long_edge),
            (out.preview(), config.preview_edge),
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

#[test]
fn jpeg_outputs_are_4_2_0_and_carry_no_profile() {
    let out = pipeline::run(
        &photo_like(3000, 2000),
        Format::Jpeg,
        &PipelineConfig::default(),
        |_| {},
    )
    .unwrap();
    for encoded in [out.main(), out.preview()] {
        let header = turbojpeg::read_header(&encoded.bytes).unwrap();
        assert_eq!(header.subsamp, turbojpeg::Subsamp::Sub2x2);
    }
}

/// The colour conversion itself, before any JPEG rounding: Display P3 pixels land within one
/// level of what Little CMS makes of them (libvips `icc_transform`, relative intent), grey and
/// the ends of the scale exactly; an unreadable profile leaves the pixels as they were.
#[test]
fn icc_conversion_matches_little_cms_within_one_level() {
    let p3 = include_bytes!("fixtures/display-p3.icc");
    let lcms: [([u8; 3], [u8; 3]); 10] = [
        ([200, 120, 60], [213, 115, 42]),
        ([60, 160, 200], [0, 163, 204]),
        ([0, 0, 0], [0, 0, 0]),
        ([255, 255, 255], [255, 255, 255]),
        ([255, 0, 0], [255, 0, 0]),
        ([0, 255, 0], [0, 255, 0]),
        ([0, 0, 255], [0, 0, 255]),
        ([128, 128, 128], [128, 128, 128]),
        ([17, 34, 51], [11, 35, 53]),
        ([240, 230, 140], [242, 230, 126]),
    ];
    let source = ImageBuffer::from_fn(10, 2, |x, _| Rgb(lcms[x as usize].0));
    let mut image = DynamicImage::ImageRgb8(source.clone());
    pipeline::to_srgb(&mut image, &Colours::Icc(p3.to_vec()));
    for (x, (p3, want)) in lcms.iter().enumerate() {
        for y in 0..2 {
            let got = image.as_rgb8().unwrap().get_pixel(x as u32, y).0;
            let off = got.iter().zip(want).map(|(g, w)| g.abs_diff(*w)).max();
            assert!(off <= Some(1), "{p3:?}: {got:?}, lcms says {want:?}");
            if p3.iter().all(|c| *c == p3[0]) {
                assert_eq!(got, *want, "grey {p3:?}");
            }
        }
    }
    let mut untouched = DynamicImage::ImageRgb8(source.clone());
    pipeline::to_srgb(&mut untouched, &Colours::Icc(b"not a profile".to_vec()));
    assert_eq!(untouched.as_rgb8().unwrap(), &source);
}

/// A phone's Display P3 profile (`fixtures/display-p3.icc`, as `benches/corpus.py` writes it):
/// the colours come out converted to sRGB and the profile is not kept. The expected values are
/// lcms' (libvips `icc_transform`, relative intent), not ours.
#[test]
fn an_embedded_display_p3_profile_is_converted_to_srgb() {
    let p3 = include_bytes!("fixtures/display-p3.icc");
    let colours = [
        ([200, 120, 60], [213, 115, 42]),
        ([60, 160, 200], [0, 163, 204]),
    ];
    let img = ImageBuffer::from_fn(128, 64, |x, _| Rgb(colours[(x / 64) as usize].0));
    let mut tagged = Vec::new();
    let mut encoder = JpegEncoder::new_with_quality(&mut tagged, 100);
    image::ImageEncoder::set_icc_profile(&mut encoder, p3.to_vec()).unwrap();
    DynamicImage::ImageRgb8(img)
        .write_with_encoder(encoder)
        .unwrap();
    let out = pipeline::run(&tagged, Format::Jpeg, &PipelineConfig::default(), |_| {}).unwrap();
    let mut decoder = image::ImageReader::new(std::io::Cursor::new(&out.main().bytes))
        .with_guessed_format()
        .unwrap()
        .into_decoder()
        .unwrap();
    assert_eq!(
        image::ImageDecoder::icc_profile(&mut decoder).unwrap(),
        None
    );
    let got = DynamicImage::from_decoder(decoder).unwrap().to_rgb8();
    for (half, (_, srgb)) in colours.iter().enumerate() {
        let pixel = got.get_pixel(32 + 64 * half as u32, 32).0;
        for (g, want) in pixel.iter().zip(srgb) {
            assert!(
                g.abs_diff(*want) <= 4,
                "half {half}: {pixel:?}, lcms says {srgb:?}"
            );
        }
    }
}
