//! Hot reload: on a change to the config file (or SIGHUP) the file is read, validated and
//! swapped in atomically; an invalid file is refused with the key named, counted in a metric,
//! and the old config stays in force. Every accepted or refused change is appended to the
//! audit log `<data_dir>/config-audit.jsonl` with the time, a diff of the keys and the
//! consequences of the new config.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use crate::clock::SharedClock;
use crate::config::{Config, ConfigError};
use crate::settings::{LiveSettings, Settings};

/// File name of the audit log inside the data dir.
pub const AUDIT_LOG_FILE: &str = "config-audit.jsonl";

/// Keys read once at start (every `server.*` and `store.*` key, and `insights.bucket`); a
/// reload keeps their running values and says so. The bucket length is fixed at start
/// because the released grid must not depend on who was seen: a new length takes effect
/// from the first UTC midnight after the restart (`privacy::release`), never mid-grid.
pub const RESTART_ONLY_SECTIONS: [&str; 3] = ["server.", "store.", "insights.bucket"];

/// Where the config comes from: an optional file plus command-line overrides (env is read
/// at each load, so an env change applies at the next reload too).
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    pub path: Option<PathBuf>,
    pub flags: Vec<(String, toml::Value)>,
}

impl ConfigSource {
    /// Loads and validates the config.
    pub fn load(&self) -> Result<Settings, ConfigError> {
        let config = Config::read(self.path.as_deref(), std::env::vars(), &self.flags)?;
        Settings::new(config)
    }
}

/// Flattens a config into `section.key -> value` for diffs.
fn flatten(config: &Config) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Ok(toml::Value::Table(sections)) = toml::Value::try_from(config) {
        for (section, value) in sections {
            if let toml::Value::Table(keys) = value {
                for (key, v) in keys {
                    out.insert(format!("{section}.{key}"), v.to_string());
                }
            }
        }
    }
    out
}

/// The keys whose values differ, as `(key, old, new)`.
pub fn diff(old: &Config, new: &Config) -> Vec<(String, String, String)> {
    let (a, b) = (flatten(old), flatten(new));
    b.iter()
        .filter_map(|(k, v)| {
            let before = a.get(k).cloned().unwrap_or_default();
            (before != *v).then(|| (k.clone(), before, v.clone()))
        })
        .collect()
}

/// Re-reads the config source into the live settings, with an audit trail.
#[derive(Debug)]
pub struct Reloader {
    source: ConfigSource,
    live: LiveSettings,
    clock: SharedClock,
    audit_path: PathBuf,
    // Serializes reloads so two triggers cannot interleave their audit lines.
    lock: Mutex<()>,
}

impl Reloader {
    pub fn new(
        source: ConfigSource,
        live: LiveSettings,
        clock: SharedClock,
        data_dir: &Path,
    ) -> Self {
        Reloader {
            source,
            live,
            clock,
            audit_path: data_dir.join(AUDIT_LOG_FILE),
            lock: Mutex::new(()),
        }
    }

    /// The config file being watched, if any.
    pub fn path(&self) -> Option<&Path> {
        self.source.path.as_deref()
    }

    /// Reloads now. `Ok(true)` when a changed config was put in force, `Ok(false)` when the
    /// file is unchanged, `Err` (old config kept) when it is invalid.
    pub fn reload(&self, trigger: &str) -> Result<bool, ConfigError> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.live.current();
        match self.source.load() {
            Ok(mut new) => {
                // The listeners, their transport bounds and the store are set up once, at
                // start: a reload keeps their running values and says which changes wait.
                let kept: Vec<String> = diff(&old.config, &new.config)
                    .into_iter()
                    .map(|(key, _, _)| key)
                    .filter(|key| RESTART_ONLY_SECTIONS.iter().any(|s| key.starts_with(s)))
                    .collect();
                new.config.server = old.config.server.clone();
                new.config.store = old.config.store.clone();
                if new.config.insights.bucket != old.config.insights.bucket {
                    // The consequences depend on the bucket length: validate what will run.
                    let mut config = new.config.clone();
                    config.insights.bucket = old.config.insights.bucket;
                    new = match Settings::new(config) {
                        Ok(s) => s,
                        Err(e) => return Err(self.refused(trigger, e)),
                    };
                }
                for key in &kept {
                    tracing::warn!(%key, "config key changed but applies only after a restart");
                }
                let changes = diff(&old.config, &new.config);
                if changes.is_empty() {
                    return Ok(false);
                }
                self.live.replace(new.clone());
                metrics::counter!("hexveil_config_reloads_total", "result" => "accepted")
                    .increment(1);
                tracing::info!(trigger, keys = ?changes.iter().map(|c| &c.0).collect::<Vec<_>>(), "config reloaded");
                self.audit(serde_json::json!({
                    "result": "accepted",
                    "trigger": trigger,
                    "changes": changes.iter().map(|(k, o, n)| serde_json::json!({"key": k, "old": o, "new": n})).collect::<Vec<_>>(),
                    "restart_needed_for": kept,
                    "consequences": new.consequences,
                }));
                Ok(true)
            }
            Err(e) => Err(self.refused(trigger, e)),
        }
    }

    /// Records a refused config (the old one stays in force) and hands the error back.
    fn refused(&self, trigger: &str, e: ConfigError) -> ConfigError {
        metrics::counter!("hexveil_config_reloads_total", "result" => "refused").increment(1);
        tracing::error!(trigger, key = e.key(), error = %e, "config refused; the previous config stays in force");
        self.audit(serde_json::json!({
            "result": "refused",
            "trigger": trigger,
            "key": e.key(),
            "error": e.to_string(),
        }));
        e
    }

    fn audit(&self, mut entry: serde_json::Value) {
        entry["time_ms"] = serde_json::json!(self.clock.now().millis());
        if let Some(p) = &self.source.path {
            entry["file"] = serde_json::json!(p.display().to_string());
        }
        let line = format!("{entry}\n");
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.audit_path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            tracing::error!(path = %self.audit_path.display(), error = %e, "cannot append to the config audit log");
        }
    }

    /// Watches the file (and SIGHUP) until `shutdown` resolves.
    pub async fn watch(
        self: std::sync::Arc<Self>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        use notify::Watcher;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(16);
        let mut _watcher = None;
        if let Some(path) = self.path() {
            let name = path.file_name().map(|n| n.to_os_string());
            let dir = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_path_buf();
            let result = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
                if let Ok(ev) = res {
                    let ours = ev
                        .paths
                        .iter()
                        .any(|p| p.file_name().map(|n| n.to_os_string()) == name);
                    if ours && !matches!(ev.kind, notify::EventKind::Access(_)) {
                        let _ = tx.try_send(());
                    }
                }
            })
            .and_then(|mut w| {
                w.watch(&dir, notify::RecursiveMode::NonRecursive)
                    .map(|_| w)
            });
            match result {
                Ok(w) => _watcher = Some(w),
                Err(e) => {
                    tracing::error!(error = %e, "cannot watch the config file; SIGHUP still reloads")
                }
            }
        }
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGHUP");
                None
            }
        };
        // The file may have changed between the first load and the watch starting: read it
        // once more now that no change can be missed (a no-op when it is unchanged).
        if self.path().is_some() {
            let this = self.clone();
            let _ = tokio::task::spawn_blocking(move || this.reload("watch start")).await;
        }
        tokio::pin!(shutdown);
        loop {
            let trigger = tokio::select! {
                Some(()) = rx.recv() => {
                    // Editors write a file in several steps; let them finish, then reload once.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    while rx.try_recv().is_ok() {}
                    "file change"
                }
                Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => "SIGHUP",
                () = &mut shutdown => break,
            };
            let this = self.clone();
            // Reading and validating is blocking work (file I/O, accounting). Validation is
            // bounded (every value has a range), but shutdown never waits on it regardless.
            let reload = tokio::task::spawn_blocking(move || this.reload(trigger));
            tokio::select! {
                _ = reload => {}
                () = &mut shutdown => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{ManualClock, Timestamp};

    /// Audit 9 F4/F7: a hot reload of `insights.bucket` (1 h → 1 min or back) must not change
    /// the running grid; it waits for a restart (and then for the next UTC midnight), says so
    /// in the audit log, and the rest of the file applies at once.
    #[test]
    fn a_reload_keeps_the_bucket_length_and_says_it_waits_for_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hexveil.toml");
        std::fs::write(&path, "[insights]\nbucket = \"1h\"\n").unwrap();
        let source = ConfigSource {
            path: Some(path.clone()),
            flags: Vec::new(),
        };
        let live = LiveSettings::new(source.load().unwrap());
        let clock: SharedClock = std::sync::Arc::new(ManualClock::new(Timestamp(0)));
        let reloader = Reloader::new(source, live.clone(), clock, dir.path());
        std::fs::write(
            &path,
            "[insights]\nbucket = \"1m\"\n[caps]\nper_device_per_day = 2\n",
        )
        .unwrap();
        assert!(reloader.reload("test").unwrap());
        let now = live.current();
        assert_eq!(now.config.insights.bucket.as_secs(), 3600);
        assert_eq!(now.config.caps.per_device_per_day, 2);
        let expected = Settings::new(now.config.clone()).unwrap();
        assert_eq!(
            now.consequences.privacy.epsilon_per_device_per_day,
            expected.consequences.privacy.epsilon_per_device_per_day,
            "the consequences are those of what runs"
        );
        let audit = std::fs::read_to_string(dir.path().join(AUDIT_LOG_FILE)).unwrap();
        let entry: serde_json::Value = serde_json::from_str(audit.lines().last().unwrap()).unwrap();
        assert_eq!(
            entry["restart_needed_for"],
            serde_json::json!(["insights.bucket"])
        );
    }
}
