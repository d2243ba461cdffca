//! The protobuf contracts of follow (`proto/follow/**`) as Rust: prost messages and tonic clients
//! and servers, generated at build time without a system `protoc`.
//!
//! Modules mirror the protobuf packages (`follow.api.v1` is [`api::v1`]). These types belong at
//! the edges of the services: domain code converts from them once and never sees their `Option`s.
//!
//! The crate re-exports the `tonic`, `prost` and `prost_types` it was generated against, so users
//! cannot end up with mismatched versions.

pub use prost;
pub use prost_types;
pub use tonic;

pub mod codec;
pub mod time;

/// Every file of the contracts with its imports, encoded: for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/follow_descriptor.bin"));

/// A protobuf package `follow.<area>.v1` as the module `<area>::v1`. Modules must mirror the
/// package path: generated code refers to other packages by `super::super::<area>::v1`.
macro_rules! package {
    ($(#[$doc:meta])* $area:ident => $package:literal) => {
        $(#[$doc])*
        pub mod $area {
            /// Generated; lints do not apply to it.
            #[allow(
                missing_docs,
                clippy::all,
                clippy::pedantic,
                unreachable_pub,
                unused_qualifications,
                missing_debug_implementations
            )]
            pub mod v1 {
                include!(concat!(env!("OUT_DIR"), "/", $package, ".rs"));
            }
        }
    };
}

package!(
    /// `follow.api.v1`: the public API (`RouteService`, `ImageService`).
    api => "follow.api.v1"
);
package!(
    /// `follow.gateway.v1`: the image gateway's control surface (`GatewayService`).
    gateway => "follow.gateway.v1"
);
package!(
    /// `follow.events.v1`: what crosses the Valkey bus (`ImageResult`, `ImageProgress`).
    events => "follow.events.v1"
);

#[cfg(test)]
mod tests {
    use prost::Message as _;

    #[test]
    fn descriptor_set_holds_every_service_and_its_imports() {
        let set = prost_types::FileDescriptorSet::decode(super::FILE_DESCRIPTOR_SET)
            .expect("the embedded descriptor set decodes");
        let names: Vec<&str> = set.file.iter().map(|f| f.name()).collect();
        for wanted in [
            "google/protobuf/timestamp.proto",
            "follow/events/v1/events.proto",
            "follow/api/v1/route_service.proto",
            "follow/api/v1/image_service.proto",
            "follow/gateway/v1/gateway_service.proto",
        ] {
            assert!(names.contains(&wanted), "{wanted} missing from {names:?}");
        }
        let services: Vec<&str> = set
            .file
            .iter()
            .flat_map(|f| f.service.iter().map(|s| s.name()))
            .collect();
        assert_eq!(
            services,
            ["RouteService", "ImageService", "GatewayService"],
            "services in the descriptor set"
        );
    }
}
