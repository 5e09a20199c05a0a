//! The live configuration: a validated [`Config`] with its [`Consequences`], swapped
//! atomically on reload so every request sees one whole config, old or new, never a mix.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::{Config, ConfigError, Consequences};

/// A validated config and what it implies.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub config: Config,
    pub consequences: Consequences,
}

impl Settings {
    /// Validates `config`; refuses it naming the key at fault.
    pub fn new(config: Config) -> Result<Settings, ConfigError> {
        let consequences = config.validate()?;
        Ok(Settings {
            config,
            consequences,
        })
    }
}

/// A shared, atomically replaceable handle to the settings in force.
#[derive(Debug, Clone)]
pub struct LiveSettings(Arc<ArcSwap<Settings>>);

impl LiveSettings {
    pub fn new(settings: Settings) -> Self {
        LiveSettings(Arc::new(ArcSwap::from_pointee(settings)))
    }

    /// The settings in force now (a cheap reference-counted snapshot).
    pub fn current(&self) -> Arc<Settings> {
        self.0.load_full()
    }

    /// Puts `settings` in force for every request that starts after this call.
    pub fn replace(&self, settings: Settings) {
        self.0.store(Arc::new(settings));
    }
}
