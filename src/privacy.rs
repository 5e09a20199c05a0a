//! Differential privacy: accounting (what a release schedule costs per device) and noise
//! (opendp's mechanisms, never a hand-written sampler).
//!
//! Architecture invariant: nothing leaves this module towards a merchant without noise.

pub mod accounting;
pub mod contrib;
pub mod daily;
pub mod domain;
pub mod held;
pub mod mechanism;
pub mod offer_stats;
pub mod query;
pub mod release;

pub use release::{Insights, InsightsError, ReleaseRun};

#[cfg(test)]
mod tests;
