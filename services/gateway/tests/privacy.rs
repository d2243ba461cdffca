//! The privacy manifest: files carrying each kind of metadata, in each accepted format, are
//! named for exactly what they carry; the outputs carry none of it.
#![allow(clippy::unwrap_used)]

use exif::{Field, In, Rational, Tag, Value, experimental::Writer};
use follow_bus::{MetadataKind as Kind, OutputRole};
use follow_image_gateway::{
    config::PipelineConfig,
    pipeline::{self, Output},
    sniff::{Format, jpeg_segments},
};
use image::{DynamicImage, RgbImage};

const HEIC_METADATA: &[u8] = include_bytes!("fixtures/heic/metadata.heic");
const HEIC_EXIF_ORIENTATION: &[u8] = include_bytes!("fixtures/heic/grid-10bit-irot.heic");
const HEIC_PLAIN: &[u8] = include_bytes!("fixtures/heic/grid.heic");

fn run(bytes: &[u8], format: Format) -> Output {
    pipeline::run(bytes, format, &PipelineConfig::default(), |_| {}).unwrap()
}

fn picture() -> DynamicImage {
    DynamicImage::ImageRgb8(RgbImage::from_fn(96, 64, |x, y| {
        image::Rgb([(x * 2) as u8, (y * 3) as u8, 90])
    }))
}

fn ascii(tag: Tag, text: &str) -> Field {
    Field {
        tag,
        ifd_num: In::PRIMARY,
        value: Value::Ascii(vec![text.as_bytes().to_vec()]),
    }
}

/// An EXIF block (TIFF structure) holding `fields`, and a JPEG thumbnail if given.
fn tiff(fields: &[Field], thumbnail: Option<&[u8]>) -> Vec<u8> {
    let mut writer = Writer::new();
    for field in fields {
        writer.push_field(field);
    }
    if let Some(jpeg) = thumbnail {
        writer.set_jpeg(jpeg, In::THUMBNAIL);
    }
    let mut out = std::io::Cursor::new(Vec::new());
    writer.write(&mut out, false).unwrap();
    out.into_inner()
}

/// Every EXIF tag the manifest names, and an orientation (which it does not).
fn telling_fields() -> Vec<Field> {
    let degrees = |d| Rational { num: d, denom: 1 };
    vec![
        Field {
            tag: Tag::Orientation,
            ifd_num: In::PRIMARY,
            value: Value::Short(vec![1]),
        },
        ascii(Tag::Make, "follow"),
        ascii(Tag::Model, "Phone 1"),
        ascii(Tag::DateTimeOriginal, "2026:12:08 10:00:00"),
        ascii(Tag::BodySerialNumber, "SN-1234"),
        ascii(Tag::Artist, "Alice"),
        ascii(Tag::ImageDescription, "at home"),
        ascii(Tag::Software, "Editor 2"),
        ascii(Tag::GPSLatitudeRef, "N"),
        Field {
            tag: Tag::GPSLatitude,
            ifd_num: In::PRIMARY,
            value: Value::Rational(vec![degrees(48), degrees(51), degrees(24)]),
        },
        Field {
            tag: Tag::MakerNote,
            ifd_num: In::PRIMARY,
            value: Value::Undefined(b"vendor private".to_vec(), 0),
        },
    ]
}

fn jpeg_of(image: &DynamicImage) -> Vec<u8> {
    pipeline::encode(image, 90).unwrap().bytes
}

/// `jpeg` with `segments` (marker, payload) inserted after its SOI.
fn with_segments(jpeg: &[u8], segments: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let mut out = jpeg[..2].to_vec();
    for (marker, payload) in segments {
        out.extend_from_slice(&[0xFF, *marker]);
        out.extend_from_slice(&(payload.len() as u16 + 2).to_be_bytes());
        out.extend_from_slice(payload);
    }
    out.extend_from_slice(&jpeg[2..]);
    out
}

fn prefixed(prefix: &[u8], rest: &[u8]) -> Vec<u8> {
    [prefix, rest].concat()
}

const XMP: &[u8] = b"<x:xmpmeta xmlns:x=\"adobe:ns:meta/\"/>";

/// Every kind a JPEG can carry, each from where cameras and editors put it; and the outputs,
/// JPEG and WebP, keep none of it.
#[test]
fn a_jpeg_is_named_for_every_kind_it_carries_and_its_outputs_keep_none() {
    let thumbnail = jpeg_of(&picture().thumbnail(16, 16));
    let exif = tiff(&telling_fields(), Some(&thumbnail));
    let jpeg = with_segments(
        &jpeg_of(&picture()),
        &[
            (0xE1, prefixed(b"Exif\0\0", &exif)),
            (0xE1, prefixed(b"http://ns.adobe.com/xap/1.0/\0", XMP)),
            (0xED, prefixed(b"Photoshop 3.0\0", b"8BIM\x04\x04")),
            (0xE2, prefixed(b"MPF\0", b"MM\0*")),
            (0xFE, b"a comment".to_vec()),
        ],
    );
    let out = run(&jpeg, Format::Jpeg);
    assert_eq!(
        out.stripped_metadata,
        [
            Kind::Exif,
            Kind::Gps,
            Kind::CaptureTime,
            Kind::Camera,
            Kind::SerialNumber,
            Kind::Owner,
            Kind::MakerNotes,
            Kind::Thumbnail,
            Kind::Xmp,
            Kind::Iptc,
            Kind::Comment,
            Kind::Software,
        ]
    );
    for role in [OutputRole::Main, OutputRole::Preview] {
        let jpeg = out.file(role, "image/jpeg").unwrap();
        let markers: Vec<u8> = jpeg_segments(&jpeg.bytes).map(|(m, _)| m).collect();
        assert!(
            markers.iter().all(|m| !matches!(m, 0xE1..=0xEF | 0xFE)),
            "{markers:x?}"
        );
        let webp = out.file(role, "image/webp").unwrap();
        assert_eq!(webp_chunks(&webp.bytes), [*b"VP8 "]);
    }
}

/// The FourCCs of a WebP file's chunks.
fn webp_chunks(bytes: &[u8]) -> Vec<[u8; 4]> {
    let mut chunks = Vec::new();
    let mut rest = &bytes[12..];
    while let Some((head, after)) = rest.split_first_chunk::<8>() {
        chunks.push(head[..4].try_into().unwrap());
        let size = u32::from_le_bytes(head[4..].try_into().unwrap()) as usize;
        rest = &after[(size + (size & 1)).min(after.len())..];
    }
    chunks
}

#[test]
fn an_exif_block_with_nothing_telling_is_named_as_exif_alone_and_no_metadata_as_nothing() {
    let orientation = tiff(&telling_fields()[..1], None);
    let jpeg = with_segments(
        &jpeg_of(&picture()),
        &[(0xE1, prefixed(b"Exif\0\0", &orientation))],
    );
    assert_eq!(run(&jpeg, Format::Jpeg).stripped_metadata, [Kind::Exif]);
    assert_eq!(
        run(&jpeg_of(&picture()), Format::Jpeg).stripped_metadata,
        []
    );
    // A damaged block is still a block: named, never a failure.
    for damaged in [
        b"MM\0*\0\0\0\x08\xff\xff".to_vec(),
        b"garbage".to_vec(),
        Vec::new(),
    ] {
        let jpeg = with_segments(
            &jpeg_of(&picture()),
            &[(0xE1, prefixed(b"Exif\0\0", &damaged))],
        );
        assert_eq!(run(&jpeg, Format::Jpeg).stripped_metadata, [Kind::Exif]);
    }
}

/// A PNG chunk: length, type, data, CRC.
fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut crc = crc32fast::Hasher::new();
    crc.update(kind);
    crc.update(data);
    [
        &(data.len() as u32).to_be_bytes()[..],
        kind,
        data,
        &crc.finalize().to_be_bytes(),
    ]
    .concat()
}

#[test]
fn png_chunks_are_named_by_type_and_keyword() {
    let mut png = Vec::new();
    picture()
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let iend = png.len() - 12;
    let gps = tiff(&telling_fields()[8..10], None);
    let chunks = [
        chunk(b"eXIf", &gps),
        chunk(b"tEXt", b"Author\0Alice"),
        chunk(b"iTXt", &prefixed(b"XML:com.adobe.xmp\0\0\0\0\0", XMP)),
        chunk(b"tEXt", b"Comment\0hello"),
        chunk(b"tIME", &[0x07, 0xEA, 12, 8, 10, 0, 0]),
    ]
    .concat();
    let png = [&png[..iend], &chunks, &png[iend..]].concat();
    assert_eq!(
        run(&png, Format::Png).stripped_metadata,
        [
            Kind::Exif,
            Kind::Gps,
            Kind::CaptureTime,
            Kind::Owner,
            Kind::Xmp,
            Kind::Comment
        ]
    );
}

#[test]
fn webp_chunks_are_named() {
    let mut webp = Vec::new();
    let mut encoder = image_webp::WebPEncoder::new(&mut webp);
    encoder.set_exif_metadata(tiff(&telling_fields()[1..3], None));
    encoder.set_xmp_metadata(XMP.to_vec());
    let rgb = picture().to_rgb8();
    encoder
        .encode(&rgb, 96, 64, image_webp::ColorType::Rgb8)
        .unwrap();
    assert_eq!(
        run(&webp, Format::WebP).stripped_metadata,
        [Kind::Exif, Kind::Camera, Kind::Xmp]
    );
}

/// HEIF's metadata are items beside the image: EXIF, XMP (a `mime` item), thumbnails.
#[test]
fn heic_items_are_named() {
    assert_eq!(
        run(HEIC_METADATA, Format::Heif).stripped_metadata,
        [
            Kind::Exif,
            Kind::Gps,
            Kind::CaptureTime,
            Kind::Camera,
            Kind::Thumbnail,
            Kind::Xmp
        ]
    );
    assert_eq!(
        run(HEIC_EXIF_ORIENTATION, Format::Heif).stripped_metadata,
        [Kind::Exif, Kind::Camera]
    );
    assert_eq!(run(HEIC_PLAIN, Format::Heif).stripped_metadata, []);
}

/// Damaged metadata never panics: 500 copies of a JPEG carrying an EXIF block of every kind,
/// bytes of the block changed at random, decode or are refused with a typed error.
#[test]
fn damaged_metadata_never_panics() {
    let exif = tiff(
        &telling_fields(),
        Some(&jpeg_of(&picture().thumbnail(16, 16))),
    );
    let jpeg = with_segments(
        &jpeg_of(&picture()),
        &[(0xE1, prefixed(b"Exif\0\0", &exif))],
    );
    let mut rng = fastrand::Rng::with_seed(29);
    for _ in 0..500 {
        let mut damaged = jpeg.clone();
        for _ in 0..rng.usize(1..8) {
            let at = rng.usize(12..12 + exif.len());
            damaged[at] = rng.u8(..);
        }
        let _ = pipeline::decode(&damaged, Format::Jpeg, 50_000_000, 2048);
    }
}
