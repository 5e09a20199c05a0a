//! The dashboard in a real browser: runs `tests/browser/dashboard.test.mjs` (headless
//! Chromium driven by playwright-core) against the real `hexveil serve --demo` binary.
//!
//! It fails, never skips, when Chromium or the Node packages are missing, and says how to
//! install them (`.ci/run` does it before `cargo test`).

use std::path::Path;
use std::process::Command;

#[test]
fn dashboard_in_headless_chromium() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let browser_dir = root.join("tests/browser");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "the dashboard test needs Chromium at {chromium}: install it with \
         `apt-get update && apt-get install -y chromium` (or set CHROMIUM=/path/to/chromium)"
    );
    let node = Command::new("node").arg("--version").output();
    assert!(
        node.as_ref().is_ok_and(|o| o.status.success()),
        "the dashboard test needs Node.js 18+: install it with `apt-get install -y nodejs npm`"
    );
    assert!(
        browser_dir.join("node_modules/playwright-core").exists(),
        "the dashboard test needs playwright-core: run `npm ci` in {}",
        browser_dir.display()
    );
    let out = Command::new("node")
        .arg("dashboard.test.mjs")
        .current_dir(&browser_dir)
        .env("HEXVEIL_BIN", env!("CARGO_BIN_EXE_hexveil"))
        .env("CHROMIUM", &chromium)
        .output()
        .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(
        out.status.success(),
        "browser test failed:\n{stdout}\n{stderr}"
    );
}
