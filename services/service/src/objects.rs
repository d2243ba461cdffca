//! The S3 objects of an image (docs/architecture.md, "S3 objects"), all under its `storage_key`
//! `routes/{route_id}/images/{image_id}`: the one place their names are made and checked.

use follow_bus::{ImageResult, OutputRole, StreamMessage as _};
use uuid::Uuid;

use crate::s3::{Bucket, S3Error};

/// `routes/{route_id}/images/{image_id}`: where the processed image is stored.
pub fn storage_key(route_id: Uuid, image_id: Uuid) -> String {
    format!("routes/{route_id}/images/{image_id}")
}

/// The `(route_id, image_id)` a storage key names, if it has exactly the shape of
/// [`storage_key`] (lower-case hyphenated UUIDs, nothing else).
pub fn parse_storage_key(key: &str) -> Option<(Uuid, Uuid)> {
    let rest = key.strip_prefix("routes/")?;
    let (route, image) = rest.split_once("/images/")?;
    let route = Uuid::try_parse(route).ok()?;
    let image = Uuid::try_parse(image).ok()?;
    (storage_key(route, image) == key).then_some((route, image))
}

/// The preview, beside the processed image.
pub fn preview_key(storage_key: &str) -> String {
    format!("{storage_key}.preview")
}

/// Where a stored file of the image under `storage_key` lives: the JPEG or PNG main image at
/// the storage key itself and its preview at [`preview_key`] (the names older images have),
/// the WebP of each beside them with `.webp` added; `None` for a type outputs never have.
pub fn output_key(storage_key: &str, role: OutputRole, content_type: &str) -> Option<String> {
    let base = match role {
        OutputRole::Main => storage_key.to_owned(),
        OutputRole::Preview => preview_key(storage_key),
    };
    match content_type {
        "image/jpeg" | "image/png" => Some(base),
        "image/webp" => Some(format!("{base}.webp")),
        _ => None,
    }
}

/// The uploaded bytes as received, until the hand-off.
pub fn original_key(storage_key: &str) -> String {
    format!("{storage_key}.original")
}

/// The bytes of a resumable upload received after its last stored part (fewer than a part),
/// one object per append that left some (`partial/` apart: a bucket lifecycle rule can expire
/// what a lost Valkey record left behind).
pub fn partial_key(storage_key: &str, name: &str) -> String {
    format!("partial/{storage_key}/{name}")
}

/// The `ImageResult` as JSON, written before the hand-off: what recovers a result Valkey lost.
pub fn record_key(storage_key: &str) -> String {
    format!("{storage_key}.result.json")
}

/// What `{storage_key}.result.json` holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Missing,
    Found(Box<ImageResult>),
    /// There, but not a result (or of another image): for operators, never applied.
    Corrupt(String),
}

/// A record is a few hundred bytes; anything much larger is not one.
const MAX_RECORD: u64 = 64 * 1024;

/// The result record of the image stored under `storage_key`.
pub async fn read_record(bucket: &Bucket, storage_key: &str) -> Result<Record, S3Error> {
    let key = record_key(storage_key);
    let json = match bucket.get(&key, MAX_RECORD).await {
        Ok(json) => json,
        Err(S3Error::NotFound) => return Ok(Record::Missing),
        Err(S3Error::TooLarge(_)) => return Ok(Record::Corrupt(format!("{key} is too large"))),
        Err(e) => return Err(e),
    };
    Ok(match ImageResult::from_json(&json) {
        Ok(result) if parse_storage_key(storage_key).map(|(_, id)| id) == Some(result.image_id) => {
            Record::Found(Box::new(result))
        }
        Ok(_) => Record::Corrupt(format!("{key} is the result of another image")),
        Err(e) => Record::Corrupt(format!("{key}: {e}")),
    })
}

/// Writes the result record of the image stored under `storage_key`, unless it has one
/// ([`S3Error::Exists`]: the record there is the image's outcome, never replaced).
pub async fn write_record(
    bucket: &Bucket,
    storage_key: &str,
    result: &ImageResult,
) -> Result<(), S3Error> {
    bucket
        .put_new(
            &record_key(storage_key),
            result.to_json(),
            "application/json",
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_output_has_its_own_object_and_none_is_a_storage_key() {
        let key = storage_key(Uuid::new_v4(), Uuid::new_v4());
        let mut names = Vec::new();
        for role in [OutputRole::Main, OutputRole::Preview] {
            for content_type in follow_bus::OUTPUT_TYPES {
                names.push(output_key(&key, role, content_type).unwrap());
            }
            assert_eq!(output_key(&key, role, "image/heic"), None);
        }
        assert_eq!(names[0], key);
        assert_eq!(names[3], preview_key(&key));
        names.dedup();
        // JPEG and PNG share a name (an image is stored as one or the other); WebP has its own.
        assert_eq!(names.len(), 4);
        assert!(names.iter().skip(1).all(|n| parse_storage_key(n).is_none()));
    }

    #[test]
    fn storage_keys_round_trip_and_nothing_else_parses() {
        let (route, image) = (Uuid::new_v4(), Uuid::new_v4());
        let key = storage_key(route, image);
        assert_eq!(parse_storage_key(&key), Some((route, image)));
        for bad in [
            format!("routes/{route}/images/{image}/../x"),
            format!("routes/{route}/images/{image}.preview"),
            format!("/routes/{route}/images/{image}"),
            format!("routes/{}/images/{image}", route.simple()),
            format!("routes/{route}/images/{}", image.to_string().to_uppercase()),
            format!("other/{route}/images/{image}"),
            String::new(),
        ] {
            assert_eq!(parse_storage_key(&bad), None, "{bad}");
        }
    }
}
