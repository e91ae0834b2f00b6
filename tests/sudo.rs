//! The `Sudo` transport, with a throwaway user the test creates.

use chopsticks::{Error, Sudo, Tunnel};

use crate::support::{USER, sudo_user};

fn whoami() -> (u32, String) {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    (uid, std::env::var("HOME").unwrap_or_default())
}

#[tokio::test]
async fn sudo_runs_the_agent_as_another_user_through_the_bootstrap() {
    let Some(uid) = sudo_user() else { return };
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
    let dir = tempfile::tempdir().expect("tempdir");
    let marker = dir.path().join("pwned");
    let tun = Tunnel::new(Sudo::new(format!(
        "-oProxyCommand=touch {}",
        marker.display()
    )));
    let error = tun.connect().await.expect_err("must refuse");
    assert!(matches!(error, Error::Spawn { .. }), "{error:?}");
    assert!(error.to_string().contains("option"), "{error}");
    assert!(!marker.exists(), "the option-like user name ran a command");
}
