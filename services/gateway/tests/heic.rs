//! HEIC as phones write it (`fixtures/heic/`, made by its `make.py`: grids of 512-pixel tiles,
//! 8- and 10-bit, `irot` beside an EXIF orientation, Display P3 by ICC profile or `nclx`,
//! alpha) decoded to the pixels it was made from; and hostile HEIC refused with a clear error,
//! never a panic, before its pixels are allocated.
#![allow(clippy::unwrap_used)]

mod common;

use common::{HEIC as GRID, HEIC_ALPHA as ALPHA, mean_difference};
use follow_image_gateway::{
    config::PipelineConfig,
    pipeline::{self, Colours, PipelineError},
    sniff::{self, Format, Header},
};
use image::{DynamicImage, GenericImageView as _, ImageBuffer, Rgb, metadata::Orientation};

const GRID_10BIT_IROT: &[u8] = include_bytes!("fixtures/heic/grid-10bit-irot.heic");
const P3_ICC: &[u8] = include_bytes!("fixtures/heic/p3-icc.heic");
const P3_NCLX: &[u8] = include_bytes!("fixtures/heic/p3-nclx.heic");
/// What the grids were made from.
const PHOTO: &[u8] = include_bytes!("../../../demo/photo.jpg");

fn decode(bytes: &[u8], max_pixels: u64) -> Result<pipeline::Decoded, PipelineError> {
    pipeline::decode(bytes, Format::Heif, max_pixels, 2048)
}

#[test]
fn heic_is_told_by_its_brand_and_declared_by_either_name() {
    for file in [GRID, GRID_10BIT_IROT, P3_ICC, P3_NCLX, ALPHA] {
        assert_eq!(
            sniff::sniff(&file[..sniff::MAGIC_LEN]).unwrap(),
            Format::Heif
        );
    }
    for name in ["image/heic", "image/heif"] {
        assert_eq!(Format::of_content_type(name), Some(Format::Heif));
    }
    let mut avif = GRID[..sniff::MAGIC_LEN].to_vec();
    avif[8..12].copy_from_slice(b"avif");
    assert!(matches!(
        sniff::sniff(&avif),
        Err(PipelineError::InvalidImage(_))
    ));
    // Every content type a route accepts is a format the gateway takes.
    for name in follow_bus::CONTENT_TYPES {
        assert!(Format::of_content_type(name).is_some(), "{name}");
    }
}

/// The grid's tiles come out joined into the photo, 8-bit and 10-bit; the 10-bit file is
/// stored on its side with `irot` and an EXIF orientation 6 that says the same: it comes out
/// upright, turned once, not twice.
#[test]
fn grids_decode_to_the_photo_upright_whatever_their_depth() {
    let photo = image::load_from_memory(PHOTO).unwrap().to_rgb8();
    for (name, file) in [("8-bit", GRID), ("10-bit irot", GRID_10BIT_IROT)] {
        assert_eq!(
            sniff::check_header(file, 50_000_000).unwrap(),
            Header::Dimensions {
                width: 1600,
                height: 900
            },
            "{name}"
        );
        let decoded = decode(file, 50_000_000).unwrap();
        assert_eq!((decoded.width, decoded.height), (1600, 900), "{name}");
        assert_eq!(decoded.orientation, Orientation::NoTransforms, "{name}");
        let difference = mean_difference(&decoded.image.to_rgb8(), &photo);
        assert!(difference < 3.0, "{name}: mean difference {difference:.2}");

        let out = pipeline::run(file, Format::Heif, &PipelineConfig::default(), |_| {}).unwrap();
        assert_eq!((out.width, out.height), (1600, 900), "{name}");
        assert_eq!(out.main().content_type, "image/jpeg", "{name}");
        let main = image::load_from_memory(&out.main().bytes).unwrap();
        assert_eq!(main.dimensions(), (1600, 900), "{name}");
        let preview = image::load_from_memory(&out.preview().bytes).unwrap();
        assert!(preview.width() > preview.height(), "{name}: upright");
    }
}

/// Display P3 declared by an ICC profile or by `nclx` code points comes out as sRGB, as the
/// same colour converted from the profile does.
#[test]
fn display_p3_by_profile_or_code_points_becomes_srgb() {
    let p3_profile = include_bytes!("fixtures/display-p3.icc");
    let mut want = DynamicImage::ImageRgb8(ImageBuffer::from_pixel(1, 1, Rgb([60, 180, 90])));
    pipeline::to_srgb(&mut want, &Colours::Icc(p3_profile.to_vec()));
    let want = want.to_rgb8().get_pixel(0, 0).0;
    assert_ne!(want, [60, 180, 90], "the conversion changes this colour");
    for (name, file) in [("icc", P3_ICC), ("nclx", P3_NCLX)] {
        let decoded = decode(file, 50_000_000).unwrap();
        assert!(decoded.colours.is_some(), "{name}: colours declared");
        let out = pipeline::run(file, Format::Heif, &PipelineConfig::default(), |_| {}).unwrap();
        let got = image::load_from_memory(&out.main().bytes)
            .unwrap()
            .to_rgb8()
            .get_pixel(32, 32)
            .0;
        for (g, w) in got.iter().zip(want) {
            assert!(g.abs_diff(w) <= 4, "{name}: {got:?}, want {want:?}");
        }
    }
}

#[test]
fn alpha_is_kept_as_png() {
    let out = pipeline::run(ALPHA, Format::Heif, &PipelineConfig::default(), |_| {}).unwrap();
    assert_eq!(out.main().content_type, "image/png");
    let image = image::load_from_memory(&out.main().bytes)
        .unwrap()
        .to_rgba8();
    assert_eq!(image.get_pixel(50, 50).0[3], 255, "the left half is opaque");
    assert_eq!(
        image.get_pixel(150, 50).0[3],
        0,
        "the right half is transparent"
    );
}

/// Where the first box named `name` starts.
fn box_at(file: &[u8], name: &[u8; 4]) -> usize {
    file.windows(4).position(|w| w == name).unwrap() - 4
}

/// A file declaring more pixels than allowed is refused from its header (as the body arrives)
/// and by the decoder's own reading, before anything is decoded: an `ispe` of 100,000², and the
/// real grid under a limit smaller than it.
#[test]
fn a_pixel_flood_is_refused_before_decoding() {
    let mut flood = GRID.to_vec();
    let ispe = box_at(&flood, b"ispe");
    flood[ispe + 12..ispe + 16].copy_from_slice(&100_000u32.to_be_bytes());
    flood[ispe + 16..ispe + 20].copy_from_slice(&100_000u32.to_be_bytes());
    assert!(matches!(
        sniff::check_header(&flood, 50_000_000),
        Err(PipelineError::ImageTooLarge(_))
    ));
    assert!(matches!(
        decode(&flood, 50_000_000),
        Err(PipelineError::ImageTooLarge(_) | PipelineError::InvalidImage(_))
    ));
    assert!(matches!(
        decode(GRID, 1_000_000),
        Err(PipelineError::ImageTooLarge(_))
    ));
}

/// A grid whose description declares 256 × 196 = 50,176 tiles (it has 8) is refused, not
/// allocated.
#[test]
fn a_grid_declaring_fifty_thousand_tiles_is_refused() {
    let mut grid = GRID.to_vec();
    // The grid's description (`ImageGrid`, stored in `idat`): version, flags, rows - 1,
    // columns - 1, then the output size.
    let idat = box_at(&grid, b"idat");
    grid[idat + 10] = 255;
    grid[idat + 11] = 195;
    let refused = decode(&grid, 50_000_000).unwrap_err();
    assert!(
        matches!(
            refused,
            PipelineError::ImageTooLarge(_) | PipelineError::InvalidImage(_)
        ),
        "{refused:?}"
    );
}

/// Truncated files, boxes whose sizes point outside the file or at themselves (a loop), and
/// thousands of damaged copies: each gets a typed refusal or an image, never a panic.
#[test]
fn damaged_heic_never_panics() {
    // A grid, and a single image (with its alpha).
    for file in [GRID, ALPHA] {
        for cut in (0..file.len()).step_by(file.len() / 64) {
            let refused = decode(&file[..cut], 50_000_000);
            assert!(refused.is_err(), "cut at {cut} of {}", file.len());
        }
    }
    for name in [b"meta", b"iloc", b"iinf", b"ipco", b"ispe", b"mdat"] {
        let at = box_at(GRID, name);
        for size in [0u32, 1, 7, 8, u32::MAX] {
            let mut bad = GRID.to_vec();
            bad[at..at + 4].copy_from_slice(&size.to_be_bytes());
            let _ = decode(&bad, 50_000_000);
        }
    }
    let mut rng = fastrand::Rng::with_seed(0x2545_f491_4f6c_dd1d);
    let small = ALPHA;
    for _ in 0..300 {
        let mut bad = small.to_vec();
        for _ in 0..rng.usize(1..8) {
            let at = rng.usize(..bad.len());
            bad[at] = rng.u8(..);
        }
        bad.truncate(rng.usize(sniff::MAGIC_LEN..=bad.len()));
        let _ = pipeline::run(&bad, Format::Heif, &PipelineConfig::default(), |_| {});
    }
}
