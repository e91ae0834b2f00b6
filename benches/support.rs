//! Helpers the harness-less benches share (`mod support;` in each; each
//! uses a part, hence `allow(dead_code)` there).

use std::io::Write;
use std::path::Path;

/// Empties the agent cache of the test-kit sshd's login user, so the next
/// bootstrap starts cold.
#[cfg(feature = "ssh")]
pub fn empty_remote_cache(sshd: &chopsticks_testkit::Sshd) {
    let status = std::process::Command::new("ssh")
        .arg("-F")
        .arg(sshd.client_config())
        .arg(sshd.alias(0))
        .arg(r#"rm -rf -- "${XDG_CACHE_HOME:-$HOME/.cache}/chopsticks""#)
        .status()
        .expect("ssh");
    assert!(status.success(), "emptying the remote agent cache");
}

/// A number from the environment, or `default`.
pub fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// The median of `samples` (the upper one of an even count).
pub fn median<T: PartialOrd + Copy>(mut samples: Vec<T>) -> T {
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    samples[samples.len() / 2]
}

/// Writes `mib` MiB of non-repeating bytes (xorshift) to `path`, synced.
pub fn write_source(path: &Path, mib: usize) {
    let mut file = std::fs::File::create(path).expect("create source");
    let mut block = vec![0u8; 1 << 20];
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..mib {
        for byte in block.iter_mut() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *byte = state as u8;
        }
        file.write_all(&block).expect("write source");
    }
    file.sync_all().expect("sync");
}

fn noop() {}

/// The mean time of `trips` sequential trivial calls on `tunnel`, after
/// connecting and 100 calls to warm up.
pub async fn mean_call(tunnel: &chopsticks::Tunnel, trips: usize) -> std::time::Duration {
    for _ in 0..101 {
        tunnel.call(noop, ()).await.expect("warm-up call");
    }
    let started = std::time::Instant::now();
    for _ in 0..trips {
        tunnel.call(noop, ()).await.expect("call");
    }
    started.elapsed() / trips as u32
}
