//! Black-box end-to-end tests of the whole platform: only its public surfaces (gRPC, HTTP) and
//! the state it leaves in Valkey, PostgreSQL and S3, never service code. The scenarios and the
//! harness that starts a throwaway stack arrive with the services.
#![forbid(unsafe_code)]
