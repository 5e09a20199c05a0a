//! hexveil: a privacy-preserving location-recommendation engine.
//!
//! Layers, data flowing one way:
//! - the wire: [`api`] (gRPC, the only module that knows protobuf) and [`web`] (HTTP: the
//!   merchant dashboard and its JSON API, health, metrics);
//! - the domain: [`consent`] (consent, transparency, retention), [`policy`], [`presence`]
//!   (the offer decision pipeline) over [`caps`], [`devices`] and [`offers`] (in-memory
//!   state kept in sync with the store), and [`merchants`];
//! - storage: [`store`] (the only module that runs SQL; group-commit writes);
//! - underneath, importing nothing above them: [`config`], [`settings`], [`clock`],
//!   [`cells`], [`pseudonym`], [`model`], [`privacy`].
//!
//! [`server`] wires the layers to listeners and background jobs, within the bounds of
//! [`transport`] (connections, streams, idle time, load shedding); [`cli`] is the command line;
//! [`demo`] seeds the synthetic city of `hexveil serve --demo` through the real paths;
//! [`simulate`] replays its daily routine through the same paths under a config to report
//! what the config does (`hexveil simulate`).
//! See `ARCHITECTURE.md` for the invariants each module keeps.

pub mod api;
pub mod caps;
pub mod cells;
pub mod cli;
pub mod clock;
pub mod config;
pub mod consent;
pub mod demo;
pub mod devices;
pub mod merchants;
pub mod model;
pub mod nodes;
pub mod offers;
pub mod policy;
pub mod presence;
pub mod privacy;
pub mod pseudonym;
pub mod reload;
pub mod server;
pub mod settings;
pub mod simulate;
pub mod store;
pub mod telemetry;
pub mod transport;
pub mod web;
