//! The one bearer-token parser: `Authorization: Bearer <token>` (any case of `Bearer`).

use axum::http::{HeaderMap, header};

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BearerError {
    #[error("no `authorization: Bearer <token>`")]
    Missing,
    #[error("`authorization` is not `Bearer <token>`")]
    Malformed,
}

/// The token of an `authorization` header value.
pub fn bearer(value: &str) -> Result<&str, BearerError> {
    let (scheme, token) = value.trim().split_once(' ').ok_or(BearerError::Malformed)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(BearerError::Malformed);
    }
    Ok(token)
}

/// The bearer token of `headers` (gRPC metadata are headers too: `MetadataMap::as_ref`).
pub fn bearer_of(headers: &HeaderMap) -> Result<Option<&str>, BearerError> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(BearerError::Malformed);
    }
    let value = value.to_str().map_err(|_| BearerError::Malformed)?;
    bearer(value).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_found_and_anything_else_refused() {
        assert_eq!(bearer("Bearer abc"), Ok("abc"));
        assert_eq!(bearer("bearer  abc "), Ok("abc"));
        assert_eq!(bearer("BEARER abc"), Ok("abc"));
        for bad in ["", "Bearer", "Bearer ", "Basic abc", "abc"] {
            assert_eq!(bearer(bad), Err(BearerError::Malformed), "{bad:?}");
        }
        let mut headers = HeaderMap::new();
        assert_eq!(bearer_of(&headers), Ok(None));
        headers.append(header::AUTHORIZATION, "Bearer a".parse().unwrap());
        assert_eq!(bearer_of(&headers), Ok(Some("a")));
        headers.append(header::AUTHORIZATION, "Bearer b".parse().unwrap());
        assert_eq!(bearer_of(&headers), Err(BearerError::Malformed));
    }
}
