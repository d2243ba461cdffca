//! Ed25519-signed JWTs (EdDSA) of follow: the one-time upload tokens the API hands out and the
//! gateway verifies offline, and the user tokens the API authenticates callers with.
//!
//! This crate owns key handling (generation, PEM / base64 parsing, key sets selected by `kid` for
//! rotation), token issue, and verification with every check in one place. Only `EdDSA` is ever
//! accepted: the algorithm is read from the header and refused before any key is touched, so
//! `alg: none` and HMAC-with-the-public-key forgeries cannot get through.
#![forbid(unsafe_code)]

mod claims;
mod error;
mod keys;
mod verify;

pub use claims::{
    Claims, ISSUER, MAX_SUB_LEN, UPLOAD_AUDIENCE, USER_AUDIENCE, UploadClaims, UploadGrant,
    UserClaims,
};
pub use error::TokenError;
pub use keys::{Kid, SigningKey, VerifyingKey, VerifyingKeys};
pub use verify::Verifier;
