//! A watch's resume cursor: the level of each watched image and whether `route_ready` was sent,
//! versioned and base64url-encoded. A client resuming with the cursor of the last event it got
//! is sent exactly what raises a level from there.

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};

use super::session::{FINAL, MAX_IMAGES};
use crate::error::ApiError;

const CURSOR_VERSION: u8 = 1;

/// The cursor of `levels` (one per watched image, in watch order) and the route flag.
pub(super) fn encode_cursor(levels: &[u8], route_ready_sent: bool) -> String {
    let mut bytes = Vec::with_capacity(levels.len() + 2);
    bytes.push(CURSOR_VERSION);
    bytes.push(u8::from(route_ready_sent));
    bytes.extend_from_slice(levels);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Levels and route flag from a cursor of a watch of `images` images; all zero when empty.
pub(super) fn decode_cursor(cursor: &str, images: usize) -> Result<(Vec<u8>, bool), ApiError> {
    if cursor.is_empty() {
        return Ok((vec![0; images], false));
    }
    let bad = || ApiError::invalid("resume_cursor", "not a cursor of this watch");
    if cursor.len() > 4 * (MAX_IMAGES + 2) {
        return Err(bad());
    }
    let bytes = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| bad())?;
    match bytes.as_slice() {
        [CURSOR_VERSION, flag @ (0 | 1), levels @ ..]
            if levels.len() == images && levels.iter().all(|l| *l <= FINAL) =>
        {
            Ok((levels.to_vec(), *flag == 1))
        }
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_refuse_foreign_or_hostile_input() {
        let cursor = encode_cursor(&[0, 3, FINAL], true);
        assert_eq!(
            decode_cursor(&cursor, 3).unwrap(),
            (vec![0, 3, FINAL], true)
        );
        assert_eq!(decode_cursor("", 2).unwrap(), (vec![0, 0], false));
        for hostile in [
            encode_cursor(&[0, 3], false), // another watch's (length)
            URL_SAFE_NO_PAD.encode([9, 0, 0, 0, 0]),
            URL_SAFE_NO_PAD.encode([CURSOR_VERSION, 0, 11, 0, 0]),
            URL_SAFE_NO_PAD.encode([CURSOR_VERSION, 7, 0, 0, 0]),
            "!!!not base64!!!".to_owned(),
            "A".repeat(100_000),
        ] {
            assert!(decode_cursor(&hostile, 3).is_err(), "{hostile:.40}");
        }
    }
}
