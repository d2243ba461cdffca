#![allow(clippy::unwrap_used)]

use follow_proto::{FILE_DESCRIPTOR_SET, prost::Message as _, prost_types::FileDescriptorSet};
use time::macros::datetime;

use super::*;
use crate::OutputRole;

fn processed() -> ImageResult {
    ImageResult {
        image_id: Uuid::new_v4(),
        outcome: ResultOutcome::Processed(Processed {
            storage_key: "routes/r/i.jpg".into(),
            preview_key: "routes/r/i.preview.jpg".into(),
            sha256: "ab".repeat(32),
            content_type: "image/jpeg".into(),
            width: 4000,
            height: 3000,
            processed_width: 2048,
            processed_height: 1536,
            byte_size: 123_456,
            thumbhash: vec![0x1f, 0x08, 0x0a, 0x0d, 0x80, 0x58, 0x78, 0x87, 0x7f, 0x78],
            files: vec![
                file(OutputRole::Main, "image/jpeg", 2048, 1536, 123_456),
                file(OutputRole::Preview, "image/jpeg", 320, 240, 20_000),
                file(OutputRole::Main, "image/webp", 2048, 1536, 98_765),
                file(OutputRole::Preview, "image/webp", 320, 240, 15_000),
            ],
            stripped_metadata: vec![MetadataKind::Gps, MetadataKind::Camera],
        }),
        produced_at: datetime!(2026-11-23 10:00:00.123 UTC),
        processing_ms: 842,
    }
}

fn file(role: OutputRole, content_type: &str, width: u32, height: u32, bytes: u64) -> OutputFile {
    OutputFile {
        role,
        content_type: content_type.into(),
        width,
        height,
        byte_size: bytes,
    }
}

fn failed() -> ImageResult {
    ImageResult {
        outcome: ResultOutcome::Failed(Failure {
            code: ErrorCode::InvalidImage,
            message: "not a JPEG, PNG or WebP".into(),
        }),
        ..processed()
    }
}

fn strip(fields: Vec<(&'static str, String)>, name: &str) -> Vec<(&'static str, String)> {
    fields.into_iter().filter(|(n, _)| *n != name).collect()
}

#[test]
fn both_outcomes_round_trip() {
    for r in [processed(), failed()] {
        assert_eq!(ImageResult::from_fields(&r.to_fields()).unwrap(), r);
    }
}

#[test]
fn fields_are_readable_strings() {
    let f = processed().to_fields();
    let get = |n: &str| f.iter().find(|(k, _)| *k == n).unwrap().1.clone();
    assert_eq!(get("status"), "processed");
    assert_eq!(get("schema_version"), "1");
    assert_eq!(get("width"), "4000");
    assert_eq!(get("produced_at"), "2026-11-23T10:00:00.123Z");
    let f = failed().to_fields();
    assert!(f.contains(&("error_code", "INVALID_IMAGE".into())));
    assert!(!f.iter().any(|(k, _)| *k == "storage_key"));
}

#[test]
fn unknown_fields_are_ignored() {
    let r = processed();
    let mut f: Vec<(String, Vec<u8>)> = r
        .to_fields()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.into_bytes()))
        .collect();
    f.push(("added_in_v2".into(), b"whatever".to_vec()));
    f.push(("bin".into(), vec![0xff, 0xfe]));
    assert_eq!(ImageResult::from_fields(&f).unwrap(), r);
}

#[test]
fn a_missing_required_field_is_a_typed_error() {
    for name in [
        "image_id",
        "status",
        "schema_version",
        "produced_at",
        "processing_ms",
        "sha256",
        "width",
    ] {
        let f = strip(processed().to_fields(), name);
        assert_eq!(
            ImageResult::from_fields(&f),
            Err(DecodeError::MissingField(
                field::ALL.into_iter().find(|n| *n == name).unwrap()
            ))
        );
    }
    for name in ["error_code", "error_message"] {
        let f = strip(failed().to_fields(), name);
        assert!(matches!(
            ImageResult::from_fields(&f),
            Err(DecodeError::MissingField(_))
        ));
    }
}

#[test]
fn hostile_values_are_typed_errors() {
    let cases: [(&str, &[u8]); 10] = [
        ("image_id", b"not-a-uuid"),
        ("status", b"PROCESSED"),
        ("schema_version", b"-1"),
        ("width", b"4294967296"),
        ("byte_size", b"1e9"),
        ("sha256", b"xyz"),
        ("produced_at", b"yesterday"),
        ("processing_ms", b""),
        ("storage_key", &[0xff, 0xfe, 0xfd]),
        ("status", &[0xc3, 0x28]),
    ];
    for (name, value) in cases {
        let f: Vec<(&str, Vec<u8>)> = processed()
            .to_fields()
            .into_iter()
            .map(|(k, v)| {
                if k == name {
                    (k, value.to_vec())
                } else {
                    (k, v.into_bytes())
                }
            })
            .collect();
        assert!(
            matches!(
                ImageResult::from_fields(&f),
                Err(DecodeError::InvalidField { .. })
            ),
            "{name} = {value:?}"
        );
    }
    let f: Vec<(&str, &str)> = vec![];
    assert!(ImageResult::from_fields(&f).is_err());
}

/// A result written before placeholders existed has no `thumbhash`: it decodes, with none.
#[test]
fn a_result_without_a_thumbhash_decodes_and_a_bad_one_is_refused() {
    let f = strip(processed().to_fields(), "thumbhash");
    let ResultOutcome::Processed(p) = ImageResult::from_fields(&f).unwrap().outcome else {
        panic!("processed");
    };
    assert!(p.thumbhash.is_empty());
    let mut bad = processed().to_fields();
    bad.retain(|(n, _)| *n != "thumbhash");
    bad.push(("thumbhash", "not base64!".into()));
    assert!(matches!(
        ImageResult::from_fields(&bad),
        Err(DecodeError::InvalidField { .. })
    ));
}

/// Results written before the file list and the manifest have neither: they decode, with none.
#[test]
fn a_result_without_files_or_manifest_decodes_and_bad_ones_are_refused() {
    let f = strip(strip(processed().to_fields(), "files"), "stripped_metadata");
    let ResultOutcome::Processed(p) = ImageResult::from_fields(&f).unwrap().outcome else {
        panic!("processed");
    };
    assert!(p.files.is_empty() && p.stripped_metadata.is_empty());
    let with = |name: &'static str, value: &str| {
        let mut fields = strip(processed().to_fields(), name);
        fields.push((name, value.into()));
        ImageResult::from_fields(&fields)
    };
    let main = r#"{"role":"main","content_type":"image/jpeg","width":1,"height":1,"byte_size":9}"#;
    for bad in [
        "not json".to_owned(),
        r#"[{"role":"main"}]"#.to_owned(),
        format!("[{}]", main.replace("image/jpeg", "text/html")),
        format!("[{}]", main.replace("\"main\"", "\"original\"")),
        format!("[{main},{main}]"),
        format!("[{}]", vec![main; 40].join(",")),
    ] {
        assert!(
            matches!(with("files", &bad), Err(DecodeError::InvalidField { .. })),
            "{bad}"
        );
    }
    // A newer gateway's kinds are left out; the known ones come in order, once.
    let ResultOutcome::Processed(p) = with("stripped_metadata", "xmp,gps,future_kind,gps,")
        .unwrap()
        .outcome
    else {
        panic!("processed");
    };
    assert_eq!(p.stripped_metadata, [MetadataKind::Gps, MetadataKind::Xmp]);
}

#[test]
fn codec_fields_are_exactly_the_protobuf_fields() {
    let set = FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).unwrap();
    let message = set
        .file
        .iter()
        .filter(|f| f.package() == "follow.events.v1")
        .flat_map(|f| &f.message_type)
        .find(|m| m.name() == "ImageResult")
        .unwrap();
    let mut proto: Vec<&str> = message.field.iter().map(|f| f.name()).collect();
    let mut ours = field::ALL.to_vec();
    proto.sort_unstable();
    ours.sort_unstable();
    assert_eq!(ours, proto);
    // And a full round trip writes each of them at least once across the two outcomes.
    let mut written: Vec<&str> = processed()
        .to_fields()
        .into_iter()
        .chain(failed().to_fields())
        .map(|(k, _)| k)
        .collect();
    written.sort_unstable();
    written.dedup();
    assert_eq!(written, ours);
}

#[test]
fn notices_round_trip_and_refuse_garbage() {
    let id = Uuid::new_v4();
    let round_trip = |n: Notice| assert_eq!(Notice::decode(&n.encode()).unwrap(), n);
    round_trip(Notice::Progress(
        Progress::reached(id, Stage::Decoding).at_time(datetime!(2026-11-23 10:00:00.5 UTC)),
    ));
    round_trip(Notice::Progress(
        Progress::failed(
            id,
            Failure {
                code: ErrorCode::ImageTooLarge,
                message: "60000x60000".into(),
            },
        )
        .at_time(datetime!(2026-11-23 10:00:01 UTC)),
    ));
    round_trip(Notice::Committed(Box::new(Committed {
        image_id: id,
        image: follow_proto::api::v1::Image {
            id: id.to_string(),
            width: 4000,
            ..Default::default()
        },
        route_ready: true,
    })));
    let unexplained = Progress::reached(id, Stage::Failed);
    assert_eq!(
        unexplained.failure().map(|f| f.code),
        Some(ErrorCode::Internal)
    );
    let foreign = Notice::Committed(Box::new(Committed {
        image_id: id,
        image: follow_proto::api::v1::Image {
            id: Uuid::new_v4().to_string(),
            ..Default::default()
        },
        route_ready: false,
    }));
    assert!(Notice::decode(&foreign.encode()).is_err());
    for garbage in [&b""[..], b"\xff\xff\xff", b"hello world"] {
        assert!(Notice::decode(garbage).is_err());
    }
}

#[test]
fn stages_and_codes_round_trip_through_names_and_protobuf() {
    for s in Stage::ALL {
        assert_eq!(s.as_str().parse::<Stage>(), Ok(s));
        assert_eq!(Stage::try_from(pb::Stage::from(s)), Ok(s));
    }
    assert!(Stage::ALL.windows(2).all(|w| w[0].seq() < w[1].seq()));
    for c in ErrorCode::ALL {
        assert_eq!(c.as_str().parse::<ErrorCode>(), Ok(c));
        assert_eq!(ErrorCode::try_from(pb::ErrorCode::from(c)), Ok(c));
        assert_eq!(
            pb::ErrorCode::from(c).as_str_name(),
            format!("ERROR_CODE_{}", c.as_str())
        );
    }
}
