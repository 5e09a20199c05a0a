//! hexveil: a privacy-preserving location-recommendation engine.
//!
//! Layers, data flowing one way:
//! - the wire: [`api`] (gRPC, the only module that knows protobuf) and [`web`] (HTTP);
//! - the domain: [`consent`] (consent, transparency, retention) and [`policy`];
//! - storage: [`store`] (the only module that runs SQL; group-commit writes);
//! - underneath, importing nothing above them: [`config`], [`settings`], [`clock`],
//!   [`cells`], [`pseudonym`], [`model`], [`privacy`].
//!
//! [`server`] wires the layers to listeners and background jobs; [`cli`] is the command line.
//! See `ARCHITECTURE.md` for the invariants each module keeps.

pub mod api;
pub mod cells;
pub mod cli;
pub mod clock;
pub mod config;
pub mod consent;
pub mod model;
pub mod policy;
pub mod privacy;
pub mod pseudonym;
pub mod reload;
pub mod server;
pub mod settings;
pub mod store;
pub mod telemetry;
pub mod web;
