//! The public API of every published crate, as listed in `api/*.txt`.
//!
//! The listing comes from rustdoc's JSON output, which needs the nightly
//! toolchain (only for this test; the crates build on stable). A change to
//! the public surface fails here until the listing is updated with
//!
//! ```text
//! CHOPSTICKS_UPDATE_API=1 cargo test --all-features --test tests api::
//! ```
//!
//! so every such change shows in review. `#[doc(hidden)]` items (the
//! unstable `__private` paths the agent and these tests use) are left out.

use std::path::{Path, PathBuf};

/// The published crates, by manifest directory (relative to the workspace).
const CRATES: [(&str, &str); 7] = [
    ("chopsticks", "."),
    ("chopsticks-core", "chopsticks-core"),
    ("chopsticks-agent", "chopsticks-agent"),
    ("chopsticks-local", "chopsticks-local"),
    ("chopsticks-ssh", "chopsticks-ssh"),
    ("chopsticks-docker", "chopsticks-docker"),
    ("chopsticks-ops", "chopsticks-ops"),
];

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn nightly() -> Result<(), String> {
    let output = std::process::Command::new("rustup")
        .args(["run", "nightly", "rustdoc", "--version"])
        .output()
        .map_err(|error| format!("rustup: {error}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err("the nightly toolchain is not installed (rustup toolchain install nightly)".into())
    }
}

/// The public items of the crate whose manifest is in `dir`, one per line.
fn listing(dir: &Path) -> String {
    let json = rustdoc_json::Builder::default()
        .toolchain("nightly")
        .manifest_path(dir.join("Cargo.toml"))
        .all_features(true)
        // Apart from the main target directory, whose lock `cargo test` may hold.
        .target_dir(workspace().join("target/api"))
        .silent(true)
        .build()
        .unwrap_or_else(|error| panic!("rustdoc JSON for {}: {error}", dir.display()));
    // Blanket, auto-trait and derived impls are noise in review; what a
    // type derives still shows in its own items (`Clone::clone`, ...).
    let api = public_api::Builder::from_rustdoc_json(&json)
        .omit_blanket_impls(true)
        .omit_auto_trait_impls(true)
        .build()
        .unwrap_or_else(|error| panic!("reading {}: {error}", json.display()));
    let mut text = String::new();
    for item in api.items() {
        text.push_str(&item.to_string());
        text.push('\n');
    }
    text
}

#[test]
fn the_public_api_matches_the_committed_listing() {
    if chopsticks_testkit::require(nightly(), "the public API check").is_none() {
        return;
    }
    let update = std::env::var_os("CHOPSTICKS_UPDATE_API").is_some();
    let mut changed = Vec::new();
    for (name, dir) in CRATES {
        let now = listing(&workspace().join(dir));
        let file = workspace().join("api").join(format!("{name}.txt"));
        let committed = std::fs::read_to_string(&file).unwrap_or_default();
        if now == committed {
            continue;
        }
        if update {
            std::fs::create_dir_all(workspace().join("api")).expect("api/");
            std::fs::write(&file, &now).expect("write the listing");
            continue;
        }
        let removed: Vec<&str> = committed
            .lines()
            .filter(|line| !now.lines().any(|other| other == *line))
            .collect();
        let added: Vec<&str> = now
            .lines()
            .filter(|line| !committed.lines().any(|other| other == *line))
            .collect();
        changed.push(format!(
            "{name}:\n  removed:\n    {}\n  added:\n    {}",
            removed.join("\n    "),
            added.join("\n    ")
        ));
    }
    assert!(
        changed.is_empty(),
        "the public API changed; review it, then update api/*.txt with \
         CHOPSTICKS_UPDATE_API=1 cargo test --all-features --test tests api::\n{}",
        changed.join("\n")
    );
}
