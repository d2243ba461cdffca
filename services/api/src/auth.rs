//! Who is calling: the `sub` of the `authorization: Bearer <user JWT>` metadata, verified offline
//! with the configured public keys (EdDSA only, selected by `kid`) — by an interceptor, before
//! the request's message is read or decoded: an unauthenticated caller costs no more than its
//! headers.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use follow_service::auth::bearer_of;
use follow_token::{UserClaims, Verifier, VerifyingKeys};
use tonic::{Request, Status, metadata::MetadataMap};

use crate::error::ApiError;

/// The authenticated caller's user id, in the extensions of every request that reached a
/// handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User(pub String);

/// When the caller's token expires (a watch stream it opened ends then).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expiry(pub SystemTime);

#[derive(Debug)]
pub struct Authenticator {
    verifier: Verifier<UserClaims>,
    /// Clock skew tolerated on a user token's times.
    leeway: Duration,
}

impl Authenticator {
    pub fn new(keys: VerifyingKeys, leeway: Duration) -> Self {
        Self {
            verifier: Verifier::new(keys).with_leeway(leeway.as_secs()),
            leeway,
        }
    }

    pub fn authenticate(&self, metadata: &MetadataMap) -> Result<(User, Expiry), ApiError> {
        let token = bearer_of(metadata.as_ref())
            .map_err(|e| ApiError::Unauthenticated(e.to_string()))?
            .ok_or_else(|| ApiError::Unauthenticated("no authorization metadata".into()))?;
        let claims = self
            .verifier
            .verify(token)
            .map_err(|e| ApiError::Unauthenticated(e.to_string()))?;
        let expiry = UNIX_EPOCH + Duration::from_secs(claims.exp) + self.leeway;
        Ok((User(claims.sub), Expiry(expiry)))
    }
}

/// The interceptor that authenticates every call of the API's services before its message is
/// decoded, leaving [`User`] and [`Expiry`] in the request's extensions.
pub fn interceptor(
    auth: Arc<Authenticator>,
) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static {
    move |mut request: Request<()>| {
        let (user, expiry) = auth.authenticate(request.metadata())?;
        request.extensions_mut().insert(user);
        request.extensions_mut().insert(expiry);
        Ok(request)
    }
}

/// The caller of `request`, as the interceptor found it.
pub fn caller<T>(request: &Request<T>) -> Result<User, ApiError> {
    request
        .extensions()
        .get::<User>()
        .cloned()
        .ok_or_else(|| ApiError::Unauthenticated("not authenticated".into()))
}

/// When the caller's token of `request` expires.
pub fn expiry<T>(request: &Request<T>) -> Option<SystemTime> {
    request.extensions().get::<Expiry>().map(|e| e.0)
}
