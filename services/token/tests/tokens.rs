//! Issue and verify of upload and user tokens, and every way a token must be refused.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::time::{Duration, SystemTime};

use base64::{
    Engine as _,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use follow_token::{
    Claims as _, Kid, SigningKey, TokenError, UploadClaims, UploadGrant, UserClaims, Verifier,
    VerifyingKey, VerifyingKeys,
};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use uuid::Uuid;

fn kid(s: &str) -> Kid {
    s.parse().unwrap()
}

fn grant() -> UploadGrant {
    UploadGrant {
        sub: "alice".into(),
        image_id: Uuid::new_v4(),
        storage_key: "routes/r1/images/i1.jpg".into(),
        content_type: "image/jpeg".into(),
        max_file_size: 10 * 1024 * 1024,
    }
}

fn upload_claims() -> UploadClaims {
    UploadClaims::new(grant(), SystemTime::now(), Duration::from_secs(900))
}

fn verifier(keys: &[&SigningKey]) -> Verifier<UploadClaims> {
    Verifier::new(VerifyingKeys::new(keys.iter().map(|k| k.verifying_key())))
}

/// A token with any header and payload JSON, signed by `key` (so only the field under test is off).
fn forge(key: &SigningKey, header: Value, payload: Value) -> String {
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(payload.to_string())
    );
    let pem = key.to_pkcs8_pem();
    let der_base64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let real_key = EncodingKey::from_ed_der(&STANDARD.decode(der_base64).unwrap());
    let signature =
        jsonwebtoken::crypto::sign(signing_input.as_bytes(), &real_key, Algorithm::EdDSA).unwrap();
    format!("{signing_input}.{signature}")
}

/// An upload token's header.
fn header(kid: &str) -> Value {
    json!({"alg": "EdDSA", "typ": UploadClaims::TYPE, "kid": kid})
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn refuses_another_kinds_typ_unknown_crit_nbf_ahead_iat_ahead_and_endless_lifetimes() {
    let key = SigningKey::generate(kid("k1"));
    let claims = serde_json::to_value(upload_claims()).unwrap();
    let with = |changes: Value| {
        let mut c = claims.clone();
        for (k, v) in changes.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    let t = now();
    let cases = [
        (
            json!({"alg": "EdDSA", "typ": UserClaims::TYPE, "kid": "k1"}),
            claims.clone(),
            "the user kind's typ",
        ),
        (
            json!({"alg": "EdDSA", "typ": "at+jwt", "kid": "k1"}),
            claims.clone(),
            "another typ",
        ),
        (
            json!({"alg": "EdDSA", "kid": "k1"}),
            claims.clone(),
            "no typ",
        ),
        (
            json!({"alg": "EdDSA", "typ": UploadClaims::TYPE, "kid": "k1", "crit": ["exp2"], "exp2": 1}),
            claims.clone(),
            "an unknown critical extension",
        ),
        (
            header("k1"),
            with(json!({"nbf": t + 3600})),
            "nbf an hour ahead",
        ),
        (
            header("k1"),
            with(json!({"iat": t + 10 * 365 * 86_400})),
            "iat ten years ahead",
        ),
        (
            header("k1"),
            with(json!({"exp": u64::MAX})),
            "exp = 2^64 - 1",
        ),
        (
            header("k1"),
            with(json!({"iat": t, "exp": t + 2 * 86_400})),
            "two days",
        ),
        (
            header("k1"),
            with(json!({"sub": "x".repeat(300)})),
            "a 300-byte sub",
        ),
        (
            header("k1"),
            with(json!({"sub": "a\u{0}b"})),
            "a NUL in sub",
        ),
    ];
    for (head, payload, case) in cases {
        assert!(
            verifier(&[&key])
                .verify(&forge(&key, head, payload))
                .is_err(),
            "accepted {case}"
        );
    }
    // What is issued is within bounds, and a lifetime over the kind's maximum is not signed.
    assert!(
        verifier(&[&key])
            .verify(&forge(&key, header("k1"), claims.clone()))
            .is_ok()
    );
    let endless = UploadClaims::new(grant(), SystemTime::now(), Duration::from_secs(2 * 86_400));
    assert!(key.sign(&endless).is_err());
    let nbf_past = with(json!({"nbf": t - 10}));
    assert!(
        verifier(&[&key])
            .verify(&forge(&key, header("k1"), nbf_past))
            .is_ok()
    );
}

#[test]
fn upload_token_round_trips() {
    let key = SigningKey::generate(kid("k1"));
    let claims = upload_claims();
    let token = key.sign(&claims).unwrap();
    let got = verifier(&[&key]).verify(&token).unwrap();
    assert_eq!(got, claims);
    assert_eq!(got.jti, got.image_id);
    assert_eq!(got.aud, "follow-image-gateway");
    assert_eq!(got.iss, "follow-api");
    assert_eq!(got.exp - got.iat, 900);

    let header = jsonwebtoken::decode_header(&token).unwrap();
    assert_eq!(header.alg, Algorithm::EdDSA);
    assert_eq!(header.kid.as_deref(), Some("k1"));
    assert_eq!(header.typ.as_deref(), Some("JWT"));
}

#[test]
fn user_token_round_trips_and_is_not_an_upload_token() {
    let key = SigningKey::generate(kid("k1"));
    let token = key
        .sign(&UserClaims::new(
            "bob",
            SystemTime::now(),
            Duration::from_secs(60),
        ))
        .unwrap();
    let user = Verifier::<UserClaims>::new(VerifyingKeys::new([key.verifying_key()]))
        .verify(&token)
        .unwrap();
    assert_eq!(user.sub, "bob");
    // Neither kind passes for the other: a user token at the gateway, an upload token at the API.
    assert_eq!(verifier(&[&key]).verify(&token), Err(TokenError::WrongType));
    let upload = key.sign(&upload_claims()).unwrap();
    assert_eq!(
        Verifier::<UserClaims>::new(VerifyingKeys::new([key.verifying_key()])).verify(&upload),
        Err(TokenError::WrongType)
    );
}

#[test]
fn rotation_selects_the_key_by_kid() {
    let old = SigningKey::generate(kid("2026-01"));
    let new = SigningKey::generate(kid("2026-02"));
    let both = verifier(&[&old, &new]);
    for key in [&old, &new] {
        let token = key.sign(&upload_claims()).unwrap();
        assert!(
            both.verify(&token).is_ok(),
            "token of {} refused",
            key.kid()
        );
    }
    // After the old key is dropped its tokens are refused.
    let token = old.sign(&upload_claims()).unwrap();
    assert_eq!(
        verifier(&[&new]).verify(&token),
        Err(TokenError::UnknownKid)
    );
}

#[test]
fn refuses_a_signature_by_another_key_under_a_known_kid() {
    let real = SigningKey::generate(kid("k1"));
    let attacker = SigningKey::generate(kid("k1"));
    let token = attacker.sign(&upload_claims()).unwrap();
    assert_eq!(
        verifier(&[&real]).verify(&token),
        Err(TokenError::BadSignature)
    );
}

#[test]
fn refuses_tampered_claims() {
    let key = SigningKey::generate(kid("k1"));
    let token = key.sign(&upload_claims()).unwrap();
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    let mut payload: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(&parts[1]).unwrap()).unwrap();
    payload["max_file_size"] = json!(u64::MAX);
    parts[1] = URL_SAFE_NO_PAD.encode(payload.to_string());
    assert_eq!(
        verifier(&[&key]).verify(&parts.join(".")),
        Err(TokenError::BadSignature)
    );
}

#[test]
fn refuses_alg_none() {
    let key = SigningKey::generate(kid("k1"));
    let claims = serde_json::to_value(upload_claims()).unwrap();
    for alg in ["none", "None", "NONE"] {
        let token = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(json!({"alg": alg, "typ": "JWT", "kid": "k1"}).to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        assert_eq!(
            verifier(&[&key]).verify(&token),
            Err(TokenError::UnsupportedAlgorithm),
            "alg {alg}"
        );
    }
}

#[test]
fn refuses_hs256_signed_with_the_public_key_as_secret() {
    let key = SigningKey::generate(kid("k1"));
    let public = key.verifying_key();
    for secret in [
        public.to_public_key_pem().into_bytes(),
        public.to_base64().into_bytes(),
    ] {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("k1".into());
        let token = jsonwebtoken::encode(
            &header,
            &upload_claims(),
            &EncodingKey::from_secret(&secret),
        )
        .unwrap();
        assert_eq!(
            verifier(&[&key]).verify(&token),
            Err(TokenError::UnsupportedAlgorithm)
        );
    }
}

#[test]
fn refuses_unknown_and_missing_kid() {
    let key = SigningKey::generate(kid("k1"));
    let claims = serde_json::to_value(upload_claims()).unwrap();
    let unknown = forge(&key, header("k2"), claims.clone());
    assert_eq!(
        verifier(&[&key]).verify(&unknown),
        Err(TokenError::UnknownKid)
    );
    let missing = forge(&key, json!({"alg": "EdDSA", "typ": "JWT"}), claims);
    assert_eq!(
        verifier(&[&key]).verify(&missing),
        Err(TokenError::MissingKid)
    );
}

#[test]
fn refuses_expired_tokens_but_allows_the_configured_leeway() {
    let key = SigningKey::generate(kid("k1"));
    let issued = SystemTime::now() - Duration::from_secs(3600);
    let expired = key
        .sign(&UploadClaims::new(grant(), issued, Duration::from_secs(60)))
        .unwrap();
    let err = verifier(&[&key]).verify(&expired).unwrap_err();
    assert_eq!(err, TokenError::Expired);
    assert!(err.is_expired());

    // Expired 10 s ago: refused with the default 5 s leeway, accepted with 30 s.
    let just = key
        .sign(&UploadClaims::new(
            grant(),
            SystemTime::now() - Duration::from_secs(70),
            Duration::from_secs(60),
        ))
        .unwrap();
    assert_eq!(verifier(&[&key]).verify(&just), Err(TokenError::Expired));
    assert!(verifier(&[&key]).with_leeway(30).verify(&just).is_ok());
}

#[test]
fn refuses_wrong_audience_and_issuer() {
    let key = SigningKey::generate(kid("k1"));
    let mut claims = upload_claims();
    claims.aud = "someone-else".into();
    assert_eq!(
        verifier(&[&key]).verify(&key.sign(&claims).unwrap()),
        Err(TokenError::WrongAudience)
    );
    let mut claims = upload_claims();
    claims.iss = "evil".into();
    assert_eq!(
        verifier(&[&key]).verify(&key.sign(&claims).unwrap()),
        Err(TokenError::WrongIssuer)
    );
}

#[test]
fn refuses_missing_claims() {
    let key = SigningKey::generate(kid("k1"));
    for field in ["exp", "aud", "iss", "sub"] {
        let mut claims = serde_json::to_value(upload_claims()).unwrap();
        claims.as_object_mut().unwrap().remove(field);
        assert_eq!(
            verifier(&[&key]).verify(&forge(&key, header("k1"), claims)),
            Err(TokenError::MissingClaim(field.into())),
            "without {field}"
        );
    }
    for field in [
        "iat",
        "image_id",
        "jti",
        "storage_key",
        "content_type",
        "max_file_size",
    ] {
        let mut claims = serde_json::to_value(upload_claims()).unwrap();
        claims.as_object_mut().unwrap().remove(field);
        let err = verifier(&[&key])
            .verify(&forge(&key, header("k1"), claims))
            .unwrap_err();
        assert!(
            matches!(err, TokenError::InvalidClaims(_)),
            "without {field}: {err:?}"
        );
    }
}

#[test]
fn refuses_claims_of_the_wrong_type() {
    let key = SigningKey::generate(kid("k1"));
    let cases = [
        ("max_file_size", json!("10")),
        ("max_file_size", json!(-1)),
        ("image_id", json!("not-a-uuid")),
        ("image_id", json!(42)),
        ("exp", json!("tomorrow")),
        ("content_type", json!(["image/jpeg"])),
        ("sub", json!(null)),
    ];
    for (field, value) in cases {
        let mut claims = serde_json::to_value(upload_claims()).unwrap();
        claims[field] = value.clone();
        let err = verifier(&[&key])
            .verify(&forge(&key, header("k1"), claims))
            .unwrap_err();
        assert!(
            // A non-numeric `exp` counts as no `exp` at all.
            matches!(
                err,
                TokenError::InvalidClaims(_) | TokenError::MissingClaim(_)
            ),
            "{field} = {value}: {err:?}"
        );
    }
}

#[test]
fn refuses_a_jti_that_is_not_the_image_id() {
    let key = SigningKey::generate(kid("k1"));
    let mut claims = upload_claims();
    claims.jti = Uuid::new_v4();
    assert!(matches!(
        verifier(&[&key]).verify(&key.sign(&claims).unwrap()),
        Err(TokenError::InvalidClaims(_))
    ));
}

#[test]
fn refuses_garbage_without_panicking() {
    let key = SigningKey::generate(kid("k1"));
    let v = verifier(&[&key]);
    let long = "a".repeat(100_000);
    let cases = [
        "",
        ".",
        "..",
        "a.b.c",
        "a.b.c.d",
        "eyJhbGciOiJFZERTQSJ9",
        "eyJhbGciOiJFZERTQSJ9..",
        "eyJhbGciOiJFZERTQSIsImtpZCI6ImsxIn0.e30.",
        "eyJhbGciOiJFZERTQSIsImtpZCI6ImsxIn0.!!!.???",
        "\u{0}\u{1}.\u{2}.\u{3}",
        long.as_str(),
    ];
    for token in cases {
        let err = v.verify(token).unwrap_err();
        assert!(
            matches!(
                err,
                TokenError::Malformed
                    | TokenError::MissingKid
                    | TokenError::WrongType
                    | TokenError::BadSignature
                    | TokenError::InvalidClaims(_)
                    | TokenError::MissingClaim(_)
            ),
            "{token:.40}: {err:?}"
        );
    }
}

#[test]
fn keys_round_trip_through_pem_and_base64() {
    let key = SigningKey::generate(kid("k1"));
    let token = key.sign(&upload_claims()).unwrap();
    for text in [key.to_pkcs8_pem(), key.to_base64()] {
        let parsed = SigningKey::parse(kid("k1"), &text).unwrap();
        assert_eq!(parsed.verifying_key(), key.verifying_key());
    }
    let public = key.verifying_key();
    for text in [public.to_public_key_pem(), public.to_base64()] {
        assert_eq!(VerifyingKey::parse(kid("k1"), &text).unwrap(), public);
    }
    let list = format!(
        "k1={}, k2={}",
        public.to_public_key_pem(),
        SigningKey::generate(kid("k2")).verifying_key().to_base64()
    );
    let keys = VerifyingKeys::parse_list(&list).unwrap();
    assert_eq!(keys.kids().count(), 2);
    assert!(Verifier::<UploadClaims>::new(keys).verify(&token).is_ok());
}

#[test]
fn bad_keys_are_typed_errors() {
    for text in [
        "",
        "not base64 !!",
        "AAAA",
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----",
    ] {
        assert!(
            matches!(
                SigningKey::parse(kid("k"), text),
                Err(TokenError::InvalidKey(_))
            ),
            "{text:?}"
        );
        assert!(
            matches!(
                VerifyingKey::parse(kid("k"), text),
                Err(TokenError::InvalidKey(_))
            ),
            "{text:?}"
        );
    }
    for list in ["", "k1", "=abc", "bad kid!=AAAA"] {
        assert!(
            matches!(
                VerifyingKeys::parse_list(list),
                Err(TokenError::InvalidKey(_))
            ),
            "{list:?}"
        );
    }
    for bad in ["", "has space", &"x".repeat(65)] {
        assert!(bad.parse::<Kid>().is_err());
    }
}

#[test]
fn signing_key_debug_does_not_leak_the_secret() {
    let key = SigningKey::generate(kid("k1"));
    let shown = format!("{key:?}");
    assert!(shown.contains("k1"));
    assert!(!shown.contains(&key.to_base64()));
}
