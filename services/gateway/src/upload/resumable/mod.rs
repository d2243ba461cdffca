//! Resumable uploads: the tus 1.0.0 protocol (core, `creation`, `creation-with-upload`,
//! `termination`, `expiration`) beside the single `PUT`, on the same guard, checks and commit.
//!
//! * `POST /upload` (the upload token as for `PUT`, `Upload-Length` within the token's limit)
//!   takes the image's one-time guard for the upload's life, and answers `201` with the upload's
//!   URL, `/upload/{image id}{nonce}`: whoever holds that URL may append (as with tusd, the URL
//!   is the capability). A body sent with it is appended at once.
//! * `PATCH /upload/{id}` appends at `Upload-Offset`; `HEAD` tells the offset; `DELETE` abandons
//!   the upload (its parts removed, its guard released: the token may start again).
//! * Every acknowledged byte is in S3 before the answer (see [`append`]), and the upload's state
//!   is in Valkey ([`follow_bus::Resumables`]): any instance takes the next `PATCH`, and one
//!   that dies loses nothing it acknowledged. A lock lets one append run at a time (`423`
//!   for another meanwhile, which tus clients retry).
//! * An upload nothing was appended to for `FOLLOW_RESUMABLE_EXPIRY_SECS` (or whose token
//!   expired) is gone (`410`): whichever instance notices first removes its parts ([`Sweeper`]).

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use axum::{
    body::Body,
    extract::{Path, RawQuery, State},
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use follow_bus::Resumable;
use follow_token::UploadClaims;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{BodyCheck, Gateway, Refused, token_of, verify};
use crate::{error::UploadError, sniff::Format};
use append::Appended;

mod append;
mod sweep;

pub use sweep::Sweeper;

/// The protocol version spoken (and the only one).
const TUS_VERSION: &str = "1.0.0";
const TUS_EXTENSIONS: &str = "creation,creation-with-upload,termination,expiration";
/// The media type of an append's body.
const OFFSET_STREAM: &str = "application/offset+octet-stream";

const TUS_RESUMABLE: HeaderName = HeaderName::from_static("tus-resumable");
const UPLOAD_LENGTH: HeaderName = HeaderName::from_static("upload-length");
const UPLOAD_OFFSET: HeaderName = HeaderName::from_static("upload-offset");
const UPLOAD_EXPIRES: HeaderName = HeaderName::from_static("upload-expires");

/// `OPTIONS /upload`: what is spoken here.
pub async fn options_upload(State(gateway): State<Arc<Gateway>>) -> Response {
    let mut response = StatusCode::NO_CONTENT.into_response();
    let headers = response.headers_mut();
    for (name, value) in [
        ("tus-version", TUS_VERSION.to_owned()),
        ("tus-extension", TUS_EXTENSIONS.to_owned()),
        (
            "tus-max-size",
            gateway.config.receive.max_upload_bytes.to_string(),
        ),
    ] {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(HeaderName::from_static(name), value);
        }
    }
    tus(response)
}

/// `POST /upload`: creates an upload (and appends its first bytes, if sent).
pub async fn post_upload(
    State(gateway): State<Arc<Gateway>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let response = match gateway.create(query.as_deref(), &headers, body).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    };
    gateway.metrics.upload(response.status().as_u16());
    tus(response)
}

/// `HEAD /upload/{id}`: how far the upload is.
pub async fn head_upload(State(gateway): State<Arc<Gateway>>, Path(id): Path<String>) -> Response {
    let response = match gateway.find(&id).await {
        Ok(record) => {
            let mut response = StatusCode::OK.into_response();
            let headers = response.headers_mut();
            headers.insert(UPLOAD_OFFSET, HeaderValue::from(record.offset));
            headers.insert(UPLOAD_LENGTH, HeaderValue::from(record.length));
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            if record.completed {
                response
            } else {
                with_expiry(response, record.expires)
            }
        }
        Err(e) => e.into_response(),
    };
    tus(response)
}

/// `PATCH /upload/{id}`: appends the body at `Upload-Offset`.
pub async fn patch_upload(
    State(gateway): State<Arc<Gateway>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let response = match gateway.patch(&id, &headers, body).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    };
    gateway.metrics.upload(response.status().as_u16());
    tus(response)
}

/// `DELETE /upload/{id}`: abandons the upload.
pub async fn delete_upload(
    State(gateway): State<Arc<Gateway>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let response = match gateway.terminate(&id, &headers).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => e.into_response(),
    };
    tus(response)
}

fn tus(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(TUS_RESUMABLE, HeaderValue::from_static(TUS_VERSION));
    response
}

fn with_expiry(mut response: Response, expires: i64) -> Response {
    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(expires).unwrap_or(0));
    if let Ok(value) = HeaderValue::from_str(&httpdate::fmt_http_date(at)) {
        response.headers_mut().insert(UPLOAD_EXPIRES, value);
    }
    response
}

/// An append's answer: the offset after it, and the expiry of an unfinished upload.
fn appended(mut response: Response, appended: &Appended) -> Response {
    response
        .headers_mut()
        .insert(UPLOAD_OFFSET, HeaderValue::from(appended.offset));
    match appended.expires {
        Some(expires) => with_expiry(response, expires),
        None => response,
    }
}

/// The client speaks this protocol's version.
fn check_version(headers: &HeaderMap) -> Result<(), UploadError> {
    match headers.get(TUS_RESUMABLE).and_then(|v| v.to_str().ok()) {
        Some(TUS_VERSION) => Ok(()),
        _ => Err(UploadError::TusVersion),
    }
}

/// A header holding a byte count.
fn header_u64(headers: &HeaderMap, name: &HeaderName) -> Option<Result<u64, UploadError>> {
    let value = headers.get(name)?;
    Some(
        value
            .to_str()
            .ok()
            .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| UploadError::BadRequest(format!("`{name}` must be a number of bytes"))),
    )
}

/// The name an upload holds the image's guard by, on whichever instance it continues.
fn guard_holder(nonce: &str) -> String {
    format!("resumable/{nonce}")
}

/// An upload's URL path segment: its image and its nonce, 64 hex digits.
fn upload_id(record: &Resumable) -> String {
    format!("{}{}", record.image_id.simple(), record.nonce)
}

/// The image and nonce of an upload id, if it has the shape of one.
fn parse_upload_id(id: &str) -> Option<(Uuid, &str)> {
    if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let (image, nonce) = id.split_at(32);
    Some((Uuid::try_parse(image).ok()?, nonce))
}

/// The token's claims an upload carries on with (as verified when it was created).
fn claims_of(record: &Resumable) -> UploadClaims {
    UploadClaims {
        iss: String::new(),
        aud: String::new(),
        sub: record.owner.clone(),
        jti: record.image_id,
        image_id: record.image_id,
        storage_key: record.storage_key.clone(),
        content_type: record.content_type.clone(),
        max_file_size: record.length,
        iat: 0,
        exp: u64::try_from(record.token_expires).unwrap_or(0),
    }
}

impl Gateway {
    /// When an upload expires if nothing comes after now: the idle expiry, within the token.
    fn resumable_expiry(&self, token_expires: i64) -> i64 {
        let idle = OffsetDateTime::now_utc() + self.config.resumable.expiry;
        idle.unix_timestamp().min(token_expires)
    }

    /// How long the guard of an upload expiring at `expires` must live.
    fn until(expires: i64) -> Duration {
        let left = expires - OffsetDateTime::now_utc().unix_timestamp();
        Duration::from_secs(u64::try_from(left).unwrap_or(0).max(1))
    }

    async fn create(
        self: &Arc<Self>,
        query: Option<&str>,
        headers: &HeaderMap,
        body: Body,
    ) -> Result<Response, UploadError> {
        check_version(headers)?;
        let claims = verify(&self.verifier, &token_of(query, headers)?)?;
        let span = tracing::info_span!("resumable", image_id = %claims.image_id);
        tracing::Instrument::instrument(self.create_verified(claims, headers, body), span).await
    }

    async fn create_verified(
        self: &Arc<Self>,
        claims: UploadClaims,
        headers: &HeaderMap,
        body: Body,
    ) -> Result<Response, UploadError> {
        let appends = headers.contains_key(header::CONTENT_TYPE);
        if appends && super::content_type(headers) != OFFSET_STREAM {
            return Err(content_type_refused(headers));
        }
        let record = self.new_upload(&claims, headers)?;
        let expires = record.expires;
        let expires_at =
            OffsetDateTime::from_unix_timestamp(expires).map_err(|_| UploadError::TokenExpired)?;
        let per_user = self.config.resumable.per_user;
        match self
            .resumables
            .open(&claims.sub, claims.image_id, expires_at, per_user)
            .await
        {
            Ok(true) => {}
            Ok(false) => return Err(UploadError::TooManyOpen(per_user)),
            Err(e) => return Err(bus_unavailable(&e)),
        }
        let created = self.start(&claims, &record).await;
        if let Err(e) = created {
            if let Err(e) = self.resumables.close(&claims.sub, claims.image_id).await {
                tracing::warn!(error = %e, "an open upload could not be uncounted");
            }
            return Err(e);
        }
        tracing::info!(length = record.length, "resumable upload created");
        let mut response = StatusCode::CREATED.into_response();
        let id = upload_id(&record);
        if let Ok(value) = HeaderValue::from_str(&format!("/upload/{id}")) {
            response.headers_mut().insert(header::LOCATION, value);
        }
        if !appends {
            response
                .headers_mut()
                .insert(UPLOAD_OFFSET, HeaderValue::from(0_u64));
            return Ok(with_expiry(response, expires));
        }
        let Locked::Open(record, holder) = self.locked(&id, 0).await? else {
            return Err(UploadError::Duplicate);
        };
        let done = self.append_locked(*record, &holder, body).await?;
        Ok(appended(response, &done))
    }

    /// The upload a `POST` asks for, if its length is one the token allows.
    fn new_upload(
        &self,
        claims: &UploadClaims,
        headers: &HeaderMap,
    ) -> Result<Resumable, UploadError> {
        let format = Format::of_content_type(&claims.content_type).ok_or_else(|| {
            UploadError::InvalidToken("the token's content type is not accepted".into())
        })?;
        let length = header_u64(headers, &UPLOAD_LENGTH).ok_or(UploadError::Malformed(
            "`Upload-Length` is required (a deferred length is not supported)",
        ))??;
        let limit = claims
            .max_file_size
            .min(self.config.receive.max_upload_bytes);
        if length > limit {
            return Err(UploadError::TooLarge(limit));
        }
        if length == 0 {
            return Err(UploadError::Malformed("an image is at least one byte"));
        }
        let token_expires = i64::try_from(claims.exp).unwrap_or(i64::MAX);
        let max_pixels = self.config.pipeline.max_pixels;
        Ok(Resumable {
            image_id: claims.image_id,
            nonce: Uuid::new_v4().simple().to_string(),
            owner: claims.sub.clone(),
            storage_key: claims.storage_key.clone(),
            content_type: claims.content_type.clone(),
            length,
            token_expires,
            offset: 0,
            expires: self.resumable_expiry(token_expires),
            multipart: None,
            parts: Vec::new(),
            tail: 0,
            tail_key: None,
            check: BodyCheck::new(format, length, max_pixels).save(),
            completed: false,
        })
    }

    /// The guard for the upload's life, the image not uploaded yet, the record written.
    async fn start(&self, claims: &UploadClaims, record: &Resumable) -> Result<(), UploadError> {
        let holder = guard_holder(&record.nonce);
        self.take_guard(claims, &holder, Self::until(record.expires))
            .await?;
        match self.unused(&claims.storage_key).await {
            Ok(()) => {}
            Err(Refused::Used) => {
                self.spend_guard(claims).await;
                return Err(UploadError::Duplicate);
            }
            Err(Refused::Transfer(e) | Refused::Body(e)) => {
                self.release_guard(claims.image_id, &holder).await;
                return Err(e);
            }
        }
        // The guard was free, so a record still there is of an upload that expired: its parts
        // go first.
        for _ in 0..2 {
            match self.resumables.create(record).await {
                Ok(true) => return Ok(()),
                Ok(false) => {
                    if let Ok(Some(stale)) = self.resumables.load(claims.image_id).await {
                        self.abandon(&stale).await.ok();
                    }
                }
                Err(e) => {
                    self.release_guard(claims.image_id, &holder).await;
                    return Err(bus_unavailable(&e));
                }
            }
        }
        self.release_guard(claims.image_id, &holder).await;
        Err(UploadError::InProgress(self.lease()))
    }

    /// The record of upload `id`: `404` if there is none, `410` (and its parts removed) if it
    /// expired unfinished. A completed upload's record says so until its token expires.
    async fn find(&self, id: &str) -> Result<Resumable, UploadError> {
        let (image_id, nonce) = parse_upload_id(id).ok_or(UploadError::UnknownUpload)?;
        let record = self
            .resumables
            .load(image_id)
            .await
            .map_err(|e| bus_unavailable(&e))?
            .filter(|r| constant_time_eq(r.nonce.as_bytes(), nonce.as_bytes()))
            .ok_or(UploadError::UnknownUpload)?;
        if !record.completed && record.is_expired() {
            self.abandon(&record).await.ok();
            return Err(UploadError::UploadExpired);
        }
        Ok(record)
    }

    /// Upload `id` with its lock taken for this append (by the holder returned), read again
    /// under the lock, at `offset`; or its length if it completed there (the answer to an
    /// append whose answer was lost).
    async fn locked(&self, id: &str, offset: u64) -> Result<Locked, UploadError> {
        let record = self.find(id).await?;
        match (record.completed, record.offset == offset) {
            (false, true) => {}
            (true, true) => return Ok(Locked::Completed(record.length)),
            (_, false) => return Err(UploadError::OffsetMismatch(record.offset)),
        }
        let holder = self.lock(&record).await?;
        match self.find(id).await {
            Ok(record) if !record.completed && record.offset == offset => {
                Ok(Locked::Open(Box::new(record), holder))
            }
            other => {
                if let Err(e) = self.resumables.unlock(record.image_id, &holder).await {
                    tracing::warn!(error = %e, "an upload's lock could not be released; it expires");
                }
                Err(match other {
                    Ok(record) => UploadError::OffsetMismatch(record.offset),
                    Err(e) => e,
                })
            }
        }
    }

    /// Takes the upload's lock; the holder's name.
    async fn lock(&self, record: &Resumable) -> Result<String, UploadError> {
        let holder = format!("{}/{}", self.holder, Uuid::new_v4().simple());
        match self
            .resumables
            .lock(record.image_id, &holder, self.lease())
            .await
        {
            Ok(true) => Ok(holder),
            Ok(false) => Err(UploadError::Locked),
            Err(e) => Err(bus_unavailable(&e)),
        }
    }

    async fn patch(
        self: &Arc<Self>,
        id: &str,
        headers: &HeaderMap,
        body: Body,
    ) -> Result<Response, UploadError> {
        check_version(headers)?;
        if super::content_type(headers) != OFFSET_STREAM {
            return Err(content_type_refused(headers));
        }
        let offset = header_u64(headers, &UPLOAD_OFFSET)
            .ok_or(UploadError::Malformed("`Upload-Offset` is required"))??;
        let (record, holder) = match self.locked(id, offset).await? {
            Locked::Open(record, holder) => (*record, holder),
            Locked::Completed(length) => {
                let done = Appended {
                    offset: length,
                    expires: None,
                };
                return Ok(appended(StatusCode::NO_CONTENT.into_response(), &done));
            }
        };
        let span = tracing::info_span!("resumable", image_id = %record.image_id);
        let done = tracing::Instrument::instrument(self.append_locked(record, &holder, body), span)
            .await?;
        Ok(appended(StatusCode::NO_CONTENT.into_response(), &done))
    }

    async fn terminate(&self, id: &str, headers: &HeaderMap) -> Result<(), UploadError> {
        check_version(headers)?;
        let record = self.find(id).await?;
        self.lock(&record).await?;
        tracing::info!(image_id = %record.image_id, "resumable upload abandoned by its client");
        self.abandon(&record).await
    }

    /// Removes an unfinished upload: its parts, its tail, its record; its guard released (the
    /// token may start again while valid). Storage away: the record stays for a sweeper to
    /// retry.
    async fn abandon(&self, record: &Resumable) -> Result<(), UploadError> {
        if record.completed {
            // Its photo is accepted: nothing to abandon, and the token stays used.
            return Err(UploadError::Duplicate);
        }
        let original = follow_service::objects::original_key(&record.storage_key);
        if let Some(upload) = &record.multipart
            && let Err(e) = self.bucket.abort_multipart(&original, upload).await
        {
            tracing::warn!(error = %e, "an abandoned upload's parts could not be removed");
            return Err(UploadError::StorageUnavailable);
        }
        self.release_guard(record.image_id, &guard_holder(&record.nonce))
            .await;
        self.forget(record, None)
            .await
            .map_err(|e| bus_unavailable(&e))
    }
}

/// An upload ready for an append.
enum Locked {
    /// Its record, read under its lock, and the lock's holder.
    Open(Box<Resumable>, String),
    /// It completed at this length.
    Completed(u64),
}

fn content_type_refused(headers: &HeaderMap) -> UploadError {
    UploadError::ContentTypeMismatch {
        expected: OFFSET_STREAM.to_owned(),
        got: super::content_type(headers),
    }
}

fn bus_unavailable(e: &follow_bus::BusError) -> UploadError {
    tracing::warn!(error = %e, "resumable upload refused: Valkey unavailable");
    UploadError::BusUnavailable
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq as _;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upload_id_is_its_image_and_nonce_and_nothing_else_parses() {
        let image = Uuid::new_v4();
        let nonce = Uuid::new_v4().simple().to_string();
        let id = format!("{}{nonce}", image.simple());
        assert_eq!(parse_upload_id(&id), Some((image, nonce.as_str())));
        for bad in [
            "",
            "xyz",
            &id[1..],
            &format!("{id}0"),
            &id.replace(&nonce[..1], "g"),
        ] {
            assert_eq!(parse_upload_id(bad), None, "{bad}");
        }
    }
}
