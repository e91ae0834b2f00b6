//! Calls registered functions in *another build* of this program: the agent
//! is the file given as the first argument (the same crate built for another
//! target, or with other features), sent by the shell bootstrap in place of
//! this program. Each outcome is printed as one `name: result` line.
//!
//! ```text
//! cargo build --example other_build --features example-variant
//! cp target/debug/examples/other_build /tmp/other-build
//! cargo run --example other_build -- /tmp/other-build
//! ```
//!
//! For another architecture, name the build for that platform instead:
//! `.program_for("Linux aarch64", "target/aarch64-unknown-linux-musl/release/fleet")`.

use chopsticks::{Local, Tunnel};

fn add(a: u64, b: u64) -> u64 {
    a + b
}

async fn shout(text: String) -> String {
    text.to_uppercase()
}

/// Registered in both builds, with other types in the variant.
#[cfg(not(feature = "example-variant"))]
fn width(value: u32) -> u32 {
    value
}

#[cfg(feature = "example-variant")]
fn width(value: u64) -> u64 {
    value
}

/// Only in the variant: code that moves every other function's offset.
#[cfg(feature = "example-variant")]
fn padding(values: Vec<u64>) -> u64 {
    values
        .iter()
        .map(|value| value.rotate_left(7) ^ 0x5a5a)
        .sum()
}

#[cfg(feature = "example-variant")]
chopsticks::register! {
    fn padding(Vec<u64>) -> u64;
}

/// Not registered: another build cannot run it.
fn build_name() -> String {
    let name = if cfg!(feature = "example-variant") {
        "variant"
    } else {
        "plain"
    };
    name.to_string()
}

chopsticks::register! {
    fn add(u64, u64) -> u64;
    async fn shout(String) -> String;
}

#[cfg(not(feature = "example-variant"))]
chopsticks::register! {
    fn width(u32) -> u32;
}

#[cfg(feature = "example-variant")]
chopsticks::register! {
    fn width(u64) -> u64;
}

fn platform() -> String {
    let output = std::process::Command::new("uname")
        .arg("-sm")
        .output()
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_string());
    output.unwrap_or_default()
}

#[tokio::main]
async fn main() {
    let Some(other) = std::env::args().nth(1) else {
        eprintln!("usage: other_build PATH_OF_ANOTHER_BUILD");
        std::process::exit(2);
    };
    let cache = std::env::temp_dir().join(format!("chopsticks-other-build-{}", std::process::id()));
    let tun = Tunnel::builder(
        Local::named("other")
            .shell_bootstrap(true)
            .env("XDG_CACHE_HOME", cache.display().to_string()),
    )
    .program_for(platform(), other)
    .build();
    println!("controller: {}", build_name());
    println!("add: {:?}", tun.call(add, (2, 40)).await);
    println!(
        "shout: {:?}",
        tun.call_async(shout, ("quiet".to_string(),)).await
    );
    println!(
        "width: {:?}",
        tun.call(width, (7,)).await.map_err(|e| e.to_string())
    );
    println!(
        "build_name: {:?}",
        tun.call(build_name, ()).await.map_err(|e| e.to_string())
    );
    let _ = tun.close().await;
    let _ = std::fs::remove_dir_all(cache);
}
