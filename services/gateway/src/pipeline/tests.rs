//! The pipeline's stages against references: libvips' boxes and Lanczos3, `image`'s turns,
//! Little CMS, TurboJPEG's direct decode; and damaged input that must never panic.

use fast_image_resize::{ResizeOptions, Resizer};
use image::{
    GenericImageView, ImageBuffer, Rgb, Rgba,
    codecs::{jpeg::JpegEncoder, png::PngEncoder},
    metadata::Orientation,
};

use super::{colour::*, decode::*, orient::*, resize::*, *};
use crate::sniff::{self, Format};

fn jpeg(width: u32, height: u32) -> Vec<u8> {
    let img = ImageBuffer::from_fn(width, height, |x, _| Rgb([(x % 256) as u8, 0, 0]));
    let mut out = Vec::new();
    DynamicImage::ImageRgb8(img)
        .write_with_encoder(JpegEncoder::new_with_quality(&mut out, 90))
        .unwrap();
    out
}

/// A progressive JPEG, transcoded to baseline before decoding, comes out exactly as
/// TurboJPEG's direct decode makes it: grey and every common subsampling, odd sizes, shrunk
/// on load or not.
#[test]
fn progressive_jpegs_decode_to_the_same_pixels_through_a_baseline_transcode() {
    use turbojpeg::{Compressor, Decompressor, Image, PixelFormat, ScalingFactor, Subsamp};
    let mut rng = fastrand::Rng::with_seed(7);
    let subsamplings = [
        Subsamp::Sub2x2,
        Subsamp::Sub2x1,
        Subsamp::None,
        Subsamp::Gray,
    ];
    for (width, height) in [(5, 7), (17, 9), (333, 251)] {
        let pixels: Vec<u8> = (0..width * height * 3).map(|_| rng.u8(..)).collect();
        for subsamp in subsamplings {
            let mut compressor = Compressor::new().unwrap();
            compressor.set_subsamp(subsamp).unwrap();
            compressor.set_progressive(true).unwrap();
            let image = Image {
                pixels: &pixels[..],
                width,
                pitch: width * 3,
                height,
                format: PixelFormat::RGB,
            };
            let jpeg = compressor.compress_to_vec(image).unwrap();
            for shrink in [1, 2] {
                let mut decompressor = Decompressor::new().unwrap();
                let factor = ScalingFactor::new(1, shrink);
                decompressor.set_scaling_factor(factor).unwrap();
                let header = decompressor.read_header(&jpeg).unwrap().scaled(factor);
                let format = match subsamp {
                    Subsamp::Gray => PixelFormat::GRAY,
                    _ => PixelFormat::RGB,
                };
                let pitch = header.width * format.size();
                let mut expected = vec![0; pitch * header.height];
                let output = Image {
                    pixels: &mut expected[..],
                    width: header.width,
                    pitch,
                    height: header.height,
                    format,
                };
                decompressor.decompress(&jpeg, output).unwrap();
                let ours = decode_jpeg(&jpeg, 1 << 30, shrink as u16).unwrap().image;
                let case = format!("{width} × {height}, {subsamp:?}, 1/{shrink}");
                assert_eq!(ours.as_bytes(), expected, "{case}");
            }
        }
    }
}

/// Every EXIF orientation of grey, RGB and RGBA pixels (odd sizes, each pixel distinct)
/// comes out exactly as `image`'s own `apply_orientation` makes it.
#[test]
fn turns_upright_as_image_does() {
    let value = |x: u32, y: u32, c: u32| (x * 31 + y * 7 + c * 101) as u8;
    let images = [
        DynamicImage::ImageLuma8(ImageBuffer::from_fn(7, 3, |x, y| {
            image::Luma([value(x, y, 0)])
        })),
        DynamicImage::ImageRgb8(ImageBuffer::from_fn(5, 9, |x, y| {
            Rgb([0, 1, 2].map(|c| value(x, y, c)))
        })),
        DynamicImage::ImageRgba8(ImageBuffer::from_fn(4, 6, |x, y| {
            Rgba([0, 1, 2, 3].map(|c| value(x, y, c)))
        })),
    ];
    for image in images {
        for exif in 1..=8 {
            let orientation = Orientation::from_exif(exif).unwrap();
            let mut ours = image.clone();
            turn_upright(&mut ours, orientation);
            let mut theirs = image.clone();
            theirs.apply_orientation(orientation);
            assert_eq!(ours, theirs, "{:?}, EXIF {exif}", image.color());
        }
    }
}

#[test]
fn resizes_to_the_long_edge_and_never_upscales() {
    let config = PipelineConfig {
        long_edge: 64,
        preview_edge: 16,
        ..PipelineConfig::default()
    };
    let mut stages = Vec::new();
    let out = run(&jpeg(200, 100), Format::Jpeg, &config, |s| stages.push(s)).unwrap();
    assert_eq!(
        stages,
        [Stage::Decoding, Stage::Processing, Stage::Encoding]
    );
    assert_eq!((out.width, out.height), (200, 100));
    assert_eq!((out.main().width, out.main().height), (64, 32));
    assert_eq!((out.preview().width, out.preview().height), (16, 8));
    assert_eq!(out.main().content_type, "image/jpeg");
    let small = run(&jpeg(10, 20), Format::Jpeg, &config, |_| {}).unwrap();
    assert_eq!((small.main().width, small.main().height), (10, 20));
}

#[test]
fn large_jpegs_shrink_on_load_to_the_same_sizes() {
    let config = PipelineConfig {
        long_edge: 512,
        preview_edge: 64,
        ..PipelineConfig::default()
    };
    let big = jpeg(2100, 300);
    assert!(sniff::jpeg_frame(&big).is_some_and(|f| f.is_common()));
    let out = run(&big, Format::Jpeg, &config, |_| {}).unwrap();
    assert_eq!((out.width, out.height), (2100, 300));
    assert_eq!((out.main().width, out.main().height), (512, 73));
    assert_eq!((out.preview().width, out.preview().height), (64, 9));
    // The pixels survive the DCT-domain shrink: red is the source column mod 256.
    let main = image::load_from_memory(&out.main().bytes)
        .unwrap()
        .to_rgb8();
    for x in [10u32, 50, 100, 300] {
        let expected = i32::try_from(x * 2100 / 512 % 256).unwrap();
        let red = i32::from(main.get_pixel(x, 36)[0]);
        assert!(
            (red - expected).abs() <= 12,
            "x {x}: red {red}, expected {expected}"
        );
    }
}

#[test]
fn the_banded_in_place_resize_matches_the_plain_one() {
    // Noise: a source row overwritten too early would show. Scales near 1 keep many bands
    // waiting before they may go home; large ones free rows at once; portraits have more
    // rows than columns.
    let noise = |x: u32, y: u32, c: u32| {
        let h =
            (x.wrapping_mul(73_856_093) ^ y.wrapping_mul(19_349_663) ^ c.wrapping_mul(83_492_791))
                .wrapping_mul(2_654_435_761);
        (h >> 24) as u8
    };
    let image = |width: u32, height: u32| {
        DynamicImage::ImageRgb8(ImageBuffer::from_fn(width, height, |x, y| {
            Rgb([noise(x, y, 0), noise(x, y, 1), noise(x, y, 2)])
        }))
    };
    for (width, height, edge) in [
        (1000, 301, 256),
        (301, 1000, 256),
        (700, 1050, 1024),
        (1500, 2100, 2048),
        (1800, 2400, 64),
    ] {
        let source = image(width, height);
        let plain = scaled(&source, edge).unwrap().to_rgb8();
        let banded = shrunk(source, edge).unwrap().to_rgb8();
        assert_eq!(plain.dimensions(), banded.dimensions());
        let worst = plain
            .as_raw()
            .iter()
            .zip(banded.as_raw())
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        assert!(
            worst <= 2,
            "{width}x{height} to {edge}: largest difference {worst}"
        );
    }
    let source = image(1000, 301);
    let grey = DynamicImage::ImageLuma8(source.to_luma8());
    assert_eq!(shrunk(grey, 256).unwrap().dimensions(), (256, 77));
    let small = shrunk(source, 5000).unwrap();
    assert_eq!(small.dimensions(), (1000, 301));
}

#[test]
fn a_jpeg_libjpeg_turbo_only_warns_about_is_still_processed() {
    // Stray bytes before the end marker: libjpeg-turbo warns ("extraneous bytes") and so
    // refuses; the photo must still be processed, as libvips would.
    let mut bytes = jpeg(64, 48);
    let end = bytes.len() - 2;
    bytes.splice(end..end, *b"junk!");
    assert!(decode_jpeg(&bytes, u64::MAX, 1).is_err());
    let out = run(&bytes, Format::Jpeg, &PipelineConfig::default(), |_| {}).unwrap();
    assert_eq!((out.width, out.height), (64, 48));
}

#[test]
fn reductions_of_4x_or_more_are_boxed_first_as_libvips_does() {
    // The preview: 6.4x, boxes of 3 then Lanczos3 for 2.13x.
    assert_eq!(box_factors((2048, 1536), (320, 240)), Some((3, 3)));
    // Under 4x (a JPEG after shrink-on-load, unless 32x its edge or more): Lanczos3
    // alone.
    assert_eq!(box_factors((4032, 3024), (2048, 1536)), None);
    assert_eq!(box_factors((8000, 6000), (2048, 1536)), None);
    // Each axis on its own.
    assert_eq!(box_factors((10_000, 30), (2000, 20)), Some((2, 1)));
    let source = DynamicImage::ImageRgb8(ImageBuffer::from_fn(2048, 1536, |x, y| {
        Rgb([(x / 7) as u8, (y / 5) as u8, ((x + y) / 13) as u8])
    }));
    assert_eq!(scaled(&source, 320).unwrap().dimensions(), (320, 240));
    assert_eq!(shrunk(source, 320).unwrap().dimensions(), (320, 240));
}

#[test]
fn boxes_are_exact_with_edge_copies_and_alpha_weighted() {
    let rgb = ImageBuffer::from_fn(5, 4, |x, y| Rgb([(10 * x + y) as u8, 100, (x * y) as u8]));
    let boxed = box_shrink(&DynamicImage::ImageRgb8(rgb.clone()), (2, 3)).to_rgb8();
    assert_eq!(boxed.dimensions(), (3, 2));
    // Columns 0-1, rows 0-2: reds 0,1,2,10,11,12 average 6.
    assert_eq!(boxed.get_pixel(0, 0).0, [6, 100, 1]);
    // The corner box is column 4 and row 3 repeated: the corner pixel itself.
    assert_eq!(boxed.get_pixel(2, 1), rgb.get_pixel(4, 3));
    // A transparent red pixel lends no colour to its opaque blue neighbour.
    let rgba = ImageBuffer::from_fn(2, 1, |x, _| {
        if x == 0 {
            Rgba([255, 0, 0, 0])
        } else {
            Rgba([0, 0, 255, 255])
        }
    });
    let boxed = box_shrink(&DynamicImage::ImageRgba8(rgba), (2, 1)).to_rgba8();
    assert_eq!(boxed.get_pixel(0, 0).0, [0, 0, 255, 128]);
}

#[test]
fn boxed_previews_stay_on_the_source_grid() {
    // Fine detail (a 64-px wave, 10 px in the preview) through the 6.4x preview reduction:
    // boxes on the exact grid, then Lanczos3 mapped onto the source's extent, stay within a
    // few levels of Lanczos3 all the way (mean 0.28, worst 3). Boxes stretched to the
    // rounded size (683 for 682.67) wander by up to half a source pixel: mean 1.19, worst 6.
    let wave = |v: u32| (128.0 + 100.0 * (f64::from(v) * std::f64::consts::TAU / 64.0).sin()) as u8;
    let source = DynamicImage::ImageRgb8(ImageBuffer::from_fn(2048, 1536, |x, y| {
        Rgb([wave(x), wave(y), wave(x + y)])
    }));
    let mut reference = DynamicImage::new(320, 240, source.color());
    Resizer::new()
        .resize(
            &source,
            &mut reference,
            &ResizeOptions::new().resize_alg(RESAMPLING),
        )
        .unwrap();
    let boxed = scaled(&source, 320).unwrap();
    let diffs: Vec<u8> = reference
        .as_bytes()
        .iter()
        .zip(boxed.as_bytes())
        .map(|(a, b)| a.abs_diff(*b))
        .collect();
    let mean = diffs.iter().map(|&d| f64::from(d)).sum::<f64>() / diffs.len() as f64;
    let worst = diffs.iter().max().copied().unwrap();
    assert!(mean < 0.6 && worst <= 4, "mean {mean:.2}, worst {worst}");
}

#[test]
fn alpha_is_kept_as_png() {
    let img = ImageBuffer::from_fn(40, 30, |x, _| Rgba([0, 0, 255, (x * 6) as u8]));
    let mut png = Vec::new();
    DynamicImage::ImageRgba8(img)
        .write_with_encoder(PngEncoder::new(&mut png))
        .unwrap();
    let out = run(&png, Format::Png, &PipelineConfig::default(), |_| {}).unwrap();
    assert_eq!(out.main().content_type, "image/png");
    let back = image::load_from_memory(&out.main().bytes).unwrap();
    assert!(back.color().has_alpha());
    // Its WebP is lossless: the PNG's pixels exactly, wherever they show (libwebp drops the
    // colour of fully transparent pixels).
    let webp = out.file(OutputRole::Main, "image/webp").unwrap();
    let webp = image::load_from_memory(&webp.bytes).unwrap().to_rgba8();
    let differing = (webp.pixels().zip(back.to_rgba8().pixels()))
        .filter(|(a, b)| a != b && b[3] != 0)
        .count();
    assert_eq!(differing, 0);
}

/// Each role comes as JPEG and as WebP of the same size; the WebP shows the same picture.
#[test]
fn every_role_comes_as_jpeg_and_as_webp_of_the_same_pixels() {
    let config = PipelineConfig {
        long_edge: 256,
        preview_edge: 64,
        ..PipelineConfig::default()
    };
    let out = run(&jpeg(600, 300), Format::Jpeg, &config, |_| {}).unwrap();
    let kinds: Vec<_> = out
        .files
        .iter()
        .map(|f| {
            (
                f.role,
                f.encoded.content_type,
                f.encoded.width,
                f.encoded.height,
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            (OutputRole::Main, "image/jpeg", 256, 128),
            (OutputRole::Preview, "image/jpeg", 64, 32),
            (OutputRole::Main, "image/webp", 256, 128),
            (OutputRole::Preview, "image/webp", 64, 32),
        ]
    );
    for role in [OutputRole::Main, OutputRole::Preview] {
        let decode = |content_type| {
            let file = out.file(role, content_type).unwrap();
            image::load_from_memory(&file.bytes).unwrap().to_rgb8()
        };
        let (jpeg, webp) = (decode("image/jpeg"), decode("image/webp"));
        assert_eq!(jpeg.dimensions(), webp.dimensions());
        let mean = jpeg
            .as_raw()
            .iter()
            .zip(webp.as_raw())
            .map(|(a, b)| f64::from(a.abs_diff(*b)))
            .sum::<f64>()
            / jpeg.as_raw().len() as f64;
        assert!(mean < 4.0, "{role:?}: mean difference {mean:.2}");
    }
}

/// What `fuzz/` does at scale, deterministically: corrupted real images of each format
/// (bytes flipped, cut, spliced) always end in an image or a typed refusal.
#[test]
fn corrupted_images_never_panic() {
    let mut png = Vec::new();
    DynamicImage::ImageRgba8(ImageBuffer::from_fn(48, 32, |x, y| {
        Rgba([x as u8, y as u8, 0, 200])
    }))
    .write_with_encoder(PngEncoder::new(&mut png))
    .unwrap();
    let mut webp = Vec::new();
    DynamicImage::ImageRgb8(ImageBuffer::from_fn(48, 32, |x, y| {
        Rgb([x as u8, y as u8, 9])
    }))
    .write_with_encoder(image::codecs::webp::WebPEncoder::new_lossless(&mut webp))
    .unwrap();
    let config = PipelineConfig {
        max_pixels: 1_000_000,
        long_edge: 32,
        preview_edge: 16,
        ..PipelineConfig::default()
    };
    let mut rng = fastrand::Rng::with_seed(0x2545_F491_4F6C_DD1D);
    for (original, format) in [
        (jpeg(48, 32), Format::Jpeg),
        (png, Format::Png),
        (webp, Format::WebP),
    ] {
        for _ in 0..300 {
            let _ = run(&damaged(&original, &mut rng), format, &config, |_| {});
        }
    }
}

/// A hostile ICC profile — every truncation of a real one, and 2,000 damaged copies — never
/// panics the colour conversion (it converts, or leaves the pixels as they were).
#[test]
fn damaged_icc_profiles_never_panic() {
    let p3 = include_bytes!("../../tests/fixtures/display-p3.icc");
    let image = DynamicImage::ImageRgb8(ImageBuffer::from_fn(8, 2, |x, _| {
        Rgb([x as u8 * 30, 100, 200])
    }));
    for len in 0..p3.len() {
        to_srgb(&mut image.clone(), &Colours::Icc(p3[..len].to_vec()));
    }
    let mut rng = fastrand::Rng::with_seed(0x9e37_79b9_7f4a_7c15);
    for _ in 0..2_000 {
        to_srgb(&mut image.clone(), &Colours::Icc(damaged(p3, &mut rng)));
    }
}

/// `original` damaged the same way on every run of a seed: a few bytes changed, the end cut
/// off, or junk spliced in.
fn damaged(original: &[u8], rng: &mut fastrand::Rng) -> Vec<u8> {
    let mut bytes = original.to_vec();
    match rng.u8(0..3) {
        0 => {
            for _ in 0..rng.usize(1..=8) {
                let at = rng.usize(0..bytes.len());
                bytes[at] = rng.u8(..);
            }
        }
        1 => bytes.truncate(rng.usize(0..bytes.len())),
        _ => {
            let at = rng.usize(0..bytes.len());
            let junk: Vec<u8> = (0..rng.usize(0..64)).map(|_| rng.u8(..)).collect();
            bytes.splice(at..at, junk);
        }
    }
    bytes
}

#[test]
fn truncated_mislabelled_and_garbage_bytes_are_invalid_never_a_panic() {
    let good = jpeg(64, 64);
    let cases: Vec<(Vec<u8>, Format)> = vec![
        (good[..good.len() / 2].to_vec(), Format::Jpeg),
        (good.clone(), Format::Png),
        (b"\xFF\xD8\xFF".to_vec(), Format::Jpeg),
        (vec![0; 10_000], Format::Jpeg),
        (Vec::new(), Format::WebP),
    ];
    for (bytes, format) in cases {
        let result = run(&bytes, format, &PipelineConfig::default(), |_| {});
        assert!(
            matches!(result, Err(PipelineError::InvalidImage(_))),
            "{format:?} {} bytes: {result:?}",
            bytes.len()
        );
    }
}

/// The placeholder holds the photo's average colour and aspect ratio, alpha included, in a few
/// dozen bytes.
#[test]
fn the_placeholder_holds_the_colour_and_shape_of_the_photo() {
    for (colour, (width, height)) in [
        ([200, 40, 40, 255], (800, 400)),
        ([20, 90, 220, 128], (300, 600)),
    ] {
        let mut png = Vec::new();
        DynamicImage::ImageRgba8(ImageBuffer::from_pixel(width, height, Rgba(colour)))
            .write_with_encoder(PngEncoder::new(&mut png))
            .unwrap();
        let out = run(&png, Format::Png, &PipelineConfig::default(), |_| {}).unwrap();
        assert!(out.thumbhash.len() <= 40, "{} bytes", out.thumbhash.len());
        let (r, g, b, a) = thumbhash::thumb_hash_to_average_rgba(&out.thumbhash).unwrap();
        for (got, want) in [r, g, b, a].into_iter().zip(colour) {
            assert!(
                (got * 255.0 - f32::from(want)).abs() < 12.0,
                "{colour:?}: {r} {g} {b} {a}"
            );
        }
        let ratio = thumbhash::thumb_hash_to_approximate_aspect_ratio(&out.thumbhash).unwrap();
        let want = width as f32 / height as f32;
        // Approximate: the shape is kept as a grid of at most 7 × 7 (5 × 5 with alpha).
        assert!(
            (ratio - want).abs() / want < 0.25,
            "aspect {ratio} for {want}"
        );
    }
}
