//! Descriptors: a controller at a low soft limit still opens hundreds of
//! local tunnels (the first raises it to the hard limit), and one that truly
//! runs out gets an error that names the limit.
//!
//! The controller under test is agent A, whose limits the test may lower
//! for good.

use std::time::Duration;

use chopsticks::{Error, Local, Tunnel};

fn set_descriptor_limit(soft: u64, hard: u64) {
    let limit = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: `limit` is a valid rlimit that setrlimit only reads.
    let result = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    assert_eq!(result, 0, "setrlimit: {}", std::io::Error::last_os_error());
}

fn hard_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is writable; getrlimit fills it.
    let result = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    assert_eq!(result, 0);
    limit.rlim_max
}

fn one() -> u8 {
    1
}

/// Runs on agent A: lowers its soft limit to `soft` (and its hard limit too
/// when `hard` is given), then opens `count` local tunnels one after another
/// and calls each. Returns how many answered, or the first error.
async fn open_tunnels(soft: u64, hard: Option<u64>, count: usize) -> Result<usize, String> {
    set_descriptor_limit(soft, hard.unwrap_or_else(hard_limit));
    let mut tunnels = Vec::with_capacity(count);
    for index in 0..count {
        let tunnel = Tunnel::builder(Local::named(format!("b{index}")))
            .stderr(chopsticks::stderr::discard())
            .build();
        match tunnel.call(one, ()).await {
            Ok(_) => tunnels.push(tunnel),
            Err(error @ Error::Spawn { .. }) => return Err(error.to_string()),
            Err(other) => return Err(format!("not a spawn error: {other:?}")),
        }
    }
    Ok(tunnels.len())
}

fn controller() -> Tunnel {
    Tunnel::builder(Local::named("a"))
        .stderr(chopsticks::stderr::discard())
        .connect_timeout(Duration::from_secs(30))
        .build()
}

#[tokio::test]
async fn three_hundred_local_tunnels_open_from_a_soft_limit_of_64() {
    let hard = hard_limit();
    let enough = if hard >= 2048 {
        Ok(())
    } else {
        Err(format!(
            "the hard descriptor limit is {hard}; 300 tunnels need at least 2048"
        ))
    };
    if chopsticks_testkit::require(enough, "a test of 300 tunnels").is_none() {
        return;
    }
    let opened = controller()
        .call_async(open_tunnels, (64, None, 300))
        .await
        .expect("agent A");
    assert_eq!(opened, Ok(300));
}

#[tokio::test]
async fn running_out_of_descriptors_names_the_limit() {
    let outcome = controller()
        .call_async(open_tunnels, (64, Some(64), 100))
        .await
        .expect("agent A");
    let text = outcome.expect_err("64 descriptors cannot hold 100 tunnels");
    assert!(
        text.contains("RLIMIT_NOFILE") && text.contains("64"),
        "{text}"
    );
}
