//! The gRPC API: the only module that knows protobuf. One file per service; each handler is
//! validate → domain call → map, and every error leaves through [`status`].
//!
//! API boundary: raw device tokens are validated and pseudonymized here and go no further.

pub mod codec;
mod consent;
mod convert;
mod merchant;
pub mod metrics_layer;
mod presence;
mod status;
mod transparency;
mod validate;

pub use consent::ConsentApi;
pub use merchant::{AuthenticatedMerchant, MerchantApi, MerchantAuthLayer};
pub use presence::PresenceApi;
pub use status::ApiError;
pub use transparency::TransparencyApi;

/// Types and service stubs generated from `proto/hexveil/v1/*.proto`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("hexveil.v1");
}

/// The encoded descriptor set of `hexveil.v1`, served by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/hexveil_descriptor.bin"));
