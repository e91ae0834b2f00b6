//! The `Sudo` transport, with a throwaway user the test creates.

use chopsticks::{Error, Sudo, Tunnel};

use crate::support::is_root;

pub(crate) const USER: &str = "chopsticks-test";

/// Creates the test user when possible; says why not otherwise.
fn prepare_user() -> Result<u32, String> {
    if !is_root() {
        return Err("the sudo tests must run as root to create a user".into());
    }
    if std::process::Command::new("sudo")
        .arg("-V")
        .output()
        .is_err()
    {
        return Err("sudo is not installed (the README's test command installs it)".into());
    }
    let exists = std::process::Command::new("id")
        .arg("-u")
        .arg(USER)
        .output()
        .map_err(|e| e.to_string())?;
    if !exists.status.success() {
        let status = std::process::Command::new("useradd")
            .args(["--create-home", "--shell", "/bin/sh", USER])
            .status()
            .map_err(|e| format!("useradd: {e}"))?;
        // Another test process may have created it meanwhile; `id` decides below.
        let _ = status;
    }
    let output = std::process::Command::new("id")
        .arg("-u")
        .arg(USER)
        .output()
        .map_err(|e| e.to_string())?;
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .map_err(|e| format!("id -u {USER}: {e}"))
}

pub(crate) fn required() -> Option<u32> {
    chopsticks_testkit::require(prepare_user(), "the sudo test")
}

fn whoami() -> (u32, String) {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    (uid, std::env::var("HOME").unwrap_or_default())
}

#[tokio::test]
async fn sudo_runs_the_agent_as_another_user_through_the_bootstrap() {
    let Some(uid) = required() else { return };
    let tun = Tunnel::builder(Sudo::new(USER))
        .stderr(chopsticks::stderr::discard())
        .build();
    assert_eq!(tun.host(), "sudo:chopsticks-test");
    let (remote_uid, home) = tun.call(whoami, ()).await.expect("call as the other user");
    assert_eq!(remote_uid, uid);
    let hash = &chopsticks_core::__private::identity::agent_file()
        .expect("hash")
        .sha256;
    let cached = std::path::Path::new(&home).join(format!(".cache/chopsticks/agent-{hash}"));
    assert!(cached.exists(), "{} missing", cached.display());
    tun.close().await.expect("close");
    assert_eq!(tun.call(whoami, ()).await.expect("cached reconnect").0, uid);
}

#[tokio::test]
async fn a_user_name_that_looks_like_an_option_is_refused() {
    let tun = Tunnel::new(Sudo::new("-oProxyCommand=touch /tmp/pwned"));
    let error = tun.connect().await.expect_err("must refuse");
    assert!(matches!(error, Error::Spawn { .. }), "{error:?}");
    assert!(error.to_string().contains("option"), "{error}");
}
