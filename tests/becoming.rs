//! `Become`: the agent as another user through real `sudo` and `doas`,
//! with the test kit's accounts and sudoers file
//! (`chopsticks_testkit::sudoers`): locally, through a chroot without sudo,
//! over the test kit's sshd, and in containers.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chopsticks::{Become, BecomeError, Error, Exec, Local, Password, Tunnel};
use chopsticks_testkit::sudoers::{self, APP, OPERATOR, PASSWORD, PASSWORD_USER};

/// The accounts and rules, or `None` with a note (a failure under `CI=true`).
fn accounts(test: &str) -> Option<()> {
    chopsticks_testkit::require(sudoers::prepare(), test)
}

/// `whoami`, `id -u` and `HOME`, as the agent sees them.
fn who() -> (String, String, String) {
    let run = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .output()
            .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_string())
            .unwrap_or_else(|error| format!("{program}: {error}"))
    };
    (
        run("whoami", &[]),
        run("id", &["-u"]),
        std::env::var("HOME").unwrap_or_default(),
    )
}

fn uid_of(user: &str) -> String {
    let output = Command::new("id").arg("-u").arg(user).output().expect("id");
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

fn quiet(transport: impl chopsticks::Transport) -> Tunnel {
    Tunnel::builder(transport)
        .stderr(chopsticks::stderr::discard())
        .connect_timeout(Duration::from_secs(30))
        .build()
}

/// The `BecomeError` behind a failed connect.
fn become_error(error: &Error) -> &BecomeError {
    match error {
        Error::Spawn {
            cause: Some(cause), ..
        } => cause
            .downcast_ref::<BecomeError>()
            .unwrap_or_else(|| panic!("not a BecomeError: {error:?}")),
        other => panic!("not a spawn error: {other:?}"),
    }
}

/// As `user` on this machine, by a NOPASSWD rule for root.
fn as_login(user: &str, name: &str) -> Become<Local> {
    Become::sudo(Local::named(name)).user(user)
}

/// Scans every process's argv and environment for `needle` until `done`;
/// returns (times seen, processes scanned that ran sudo with a random prompt).
fn scan_proc(
    needle: &'static [u8],
    done: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(usize, usize)> {
    std::thread::spawn(move || {
        let (mut seen, mut prompted) = (0, 0);
        while !done.load(Ordering::Relaxed) {
            for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
                for file in ["cmdline", "environ"] {
                    let Ok(bytes) = std::fs::read(entry.path().join(file)) else {
                        continue;
                    };
                    if bytes.windows(needle.len()).any(|window| window == needle) {
                        seen += 1;
                    }
                    let prompt = b"chopsticks-password-";
                    if file == "cmdline" && bytes.windows(prompt.len()).any(|w| w == prompt) {
                        prompted += 1;
                    }
                }
            }
        }
        (seen, prompted)
    })
}

/// Connects `tun` as root with the test password while every process's
/// argv and environment are scanned for it; checks it was never there, that
/// sudo was seen running, and that the agent is root.
async fn connect_as_root_unseen(tun: &Tunnel) {
    let done = Arc::new(AtomicBool::new(false));
    let scan = scan_proc(PASSWORD.as_bytes(), done.clone());
    let connected = tun.connect().await;
    done.store(true, Ordering::Relaxed);
    let (seen, prompted) = scan.join().expect("scan");
    connected.expect("the right password");
    assert_eq!(tun.call(who, ()).await.expect("call").1, "0");
    assert_eq!(
        seen, 0,
        "the password was in some process's argv or environment"
    );
    assert!(prompted > 0, "the scan never saw sudo running");
}

mod local {
    use super::*;

    #[tokio::test]
    async fn sudo_runs_the_agent_as_root_and_as_another_user() {
        let Some(()) = accounts("becoming::local") else {
            return;
        };
        let root = quiet(Become::sudo(Local::named("become-root")));
        assert_eq!(root.host(), "become-root");
        let (name, uid, home) = root.call(who, ()).await.expect("as root");
        assert_eq!(
            (name.as_str(), uid.as_str(), home.as_str()),
            ("root", "0", "/root")
        );

        // From OPERATOR (by a rule for root), to APP by OPERATOR's rule.
        let app = quiet(Become::sudo(as_login(OPERATOR, "become-app")).user(APP));
        let (name, uid, home) = app.call(who, ()).await.expect("as app");
        assert_eq!(name, APP);
        assert_eq!(uid, uid_of(APP));
        assert_eq!(home, format!("/home/{APP}"));
        // The agent is cached in the target user's own home, and is theirs.
        let cache = std::path::Path::new(&home).join(".cache/chopsticks");
        let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&cache).expect("cache"));
        assert_eq!(owner.to_string(), uid_of(APP));
        app.close().await.expect("close");
        assert_eq!(app.call(who, ()).await.expect("reconnect").0, APP);
    }

    #[tokio::test]
    async fn the_existing_sudo_transport_is_become_over_local() {
        let Some(()) = accounts("becoming::sudo") else {
            return;
        };
        let tun = quiet(chopsticks::Sudo::new(APP));
        assert_eq!(tun.host(), format!("sudo:{APP}"));
        assert_eq!(tun.call(who, ()).await.expect("call").0, APP);
    }

    #[tokio::test]
    async fn a_password_is_given_on_stdin_and_never_seen_elsewhere() {
        let Some(()) = accounts("becoming::password") else {
            return;
        };
        let pwned = std::path::Path::new("/tmp/chopsticks-pwned");
        let _ = std::fs::remove_file(pwned);
        let tun =
            quiet(Become::sudo(as_login(PASSWORD_USER, "become-password")).password(PASSWORD));
        connect_as_root_unseen(&tun).await;
        assert!(!pwned.exists(), "the password's words ran as a command");
    }

    #[tokio::test]
    async fn a_wrong_password_is_rejected_once_and_named() {
        let Some(()) = accounts("becoming::wrong_password") else {
            return;
        };
        let started = Instant::now();
        let tun = quiet(
            Become::sudo(as_login(PASSWORD_USER, "become-wrong")).password("not it's password"),
        );
        let error = tun.connect().await.expect_err("a wrong password");
        assert!(
            matches!(become_error(&error), BecomeError::WrongPassword { user, .. } if user == "root"),
            "{error:?}"
        );
        let text = error.to_string();
        assert!(
            text.contains("become-wrong") && text.contains("root"),
            "{text}"
        );
        assert!(!text.contains("not it's password") && !format!("{error:?}").contains("not it's"));
        // sudo waits about 2 s after a wrong password; a second answer would
        // take another 2 s and a third prompt.
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn a_password_callback_is_asked_once_per_host() {
        let Some(()) = accounts("becoming::callback") else {
            return;
        };
        let asked = Arc::new(AtomicUsize::new(0));
        let counter = asked.clone();
        let tun = quiet(
            Become::sudo(as_login(PASSWORD_USER, "become-callback")).password_from(
                move |host, user| {
                    assert_eq!((host, user), ("become-callback", "root"));
                    counter.fetch_add(1, Ordering::Relaxed);
                    Some(Password::new(PASSWORD))
                },
            ),
        );
        assert_eq!(tun.call(who, ()).await.expect("first").1, "0");
        tun.close().await.expect("close");
        assert_eq!(tun.call(who, ()).await.expect("reconnect").1, "0");
        assert_eq!(asked.load(Ordering::Relaxed), 1);

        // A NOPASSWD rule never asks.
        let never = Arc::new(AtomicUsize::new(0));
        let counter = never.clone();
        let root = quiet(
            Become::sudo(as_login(OPERATOR, "become-nopasswd")).password_from(move |_, _| {
                counter.fetch_add(1, Ordering::Relaxed);
                None
            }),
        );
        assert_eq!(root.call(who, ()).await.expect("call").1, "0");
        assert_eq!(never.load(Ordering::Relaxed), 0);

        // A callback that gives none.
        let none =
            quiet(Become::sudo(as_login(PASSWORD_USER, "become-none")).password_from(|_, _| None));
        let error = none.connect().await.expect_err("no password");
        assert!(
            matches!(become_error(&error), BecomeError::NoPassword { .. }),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn missing_rules_and_users_are_told_apart() {
        let Some(()) = accounts("becoming::rules") else {
            return;
        };
        // APP has no rule: sudo -n wants a password.
        let error = quiet(Become::sudo(as_login(APP, "become-norule")))
            .connect()
            .await
            .expect_err("no rule");
        assert!(
            matches!(become_error(&error), BecomeError::PasswordRequired { .. }),
            "{error:?}"
        );
        // PASSWORD_USER's rule covers root only.
        let error = quiet(
            Become::sudo(as_login(PASSWORD_USER, "become-notallowed"))
                .user(APP)
                .password(PASSWORD),
        )
        .connect()
        .await
        .expect_err("not allowed");
        assert!(
            matches!(become_error(&error), BecomeError::NotAllowed { user, .. } if user == APP),
            "{error:?}"
        );
        let error = quiet(Become::sudo(Local::named("become-nosuch")).user("chopsticks-nosuch"))
            .connect()
            .await
            .expect_err("no such user");
        assert!(
            matches!(become_error(&error), BecomeError::UnknownUser { .. }),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn a_password_with_a_line_break_is_never_sent() {
        let Some(()) = accounts("becoming::line_break") else {
            return;
        };
        let marker = std::path::Path::new("/tmp/chopsticks-become-injected");
        let _ = std::fs::remove_file(marker);
        let tun = quiet(
            Become::sudo(as_login(PASSWORD_USER, "become-newline"))
                .password(format!("{PASSWORD}\ntouch {}", marker.display())),
        );
        let error = tun.connect().await.expect_err("refused");
        assert!(
            matches!(become_error(&error), BecomeError::UnusablePassword { .. }),
            "{error:?}"
        );
        assert!(!marker.exists());
        assert!(!error.to_string().contains("touch"), "{error}");
    }

    #[tokio::test]
    async fn a_target_without_sudo_says_so() {
        let Some(()) = accounts("becoming::no_sudo") else {
            return;
        };
        let Some(root) = chopsticks_testkit::require(
            crate::support::ChrootRoot::with_tools("become"),
            "becoming::no_sudo",
        ) else {
            return;
        };
        let chroot =
            Exec::new(["chroot".to_string(), root.path().display().to_string()]).named("sudoless");
        let error = quiet(Become::sudo(chroot))
            .connect()
            .await
            .expect_err("no sudo");
        assert!(
            matches!(become_error(&error), BecomeError::NotInstalled { host, .. } if host == "sudoless"),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn through_a_command_prefix() {
        let Some(()) = accounts("becoming::exec") else {
            return;
        };
        // `setpriv` runs the words after it as they are, as `Exec` needs.
        let prefix =
            Exec::new(["setpriv", "--reuid", OPERATOR, "--init-groups"]).named("via-setpriv");
        let (name, ..) = quiet(Become::sudo(prefix).user(APP))
            .call(who, ())
            .await
            .expect("sudo through a prefix");
        assert_eq!(name, APP);
    }

    #[tokio::test]
    async fn doas_with_a_nopass_rule() {
        let Some(()) = accounts("becoming::doas") else {
            return;
        };
        if !sudoers::has_doas() {
            assert!(
                !chopsticks_testkit::in_ci(),
                "doas is not installed or /etc/doas.conf is not the test kit's"
            );
            eprintln!("SKIPPED becoming::doas: doas is not installed");
            return;
        }
        let root = quiet(Become::doas(as_login(OPERATOR, "doas-root")));
        assert_eq!(root.call(who, ()).await.expect("doas to root").1, "0");
        let app = quiet(Become::doas(as_login(OPERATOR, "doas-app")).user(APP));
        assert_eq!(app.call(who, ()).await.expect("doas to app").0, APP);
        let error = quiet(Become::doas(as_login(APP, "doas-norule")))
            .connect()
            .await
            .expect_err("no rule");
        assert!(
            matches!(become_error(&error), BecomeError::NotAllowed { .. }),
            "{error:?}"
        );
        let error = quiet(Become::doas(as_login(OPERATOR, "doas-password")).password("x"))
            .connect()
            .await
            .expect_err("doas takes no password on a pipe");
        assert!(
            matches!(become_error(&error), BecomeError::NeedsTerminal { .. }),
            "{error:?}"
        );
    }

    async fn who_after_becoming_again() -> Result<(String, String, String), String> {
        let inner = Tunnel::builder(Become::sudo(Local::named("inner")).user(APP))
            .stderr(chopsticks::stderr::discard())
            .build();
        inner.call(who, ()).await.map_err(|e| e.to_string())
    }

    #[tokio::test]
    async fn a_root_agent_opens_tunnels_of_its_own() {
        let Some(()) = accounts("becoming::nested") else {
            return;
        };
        let root = quiet(Become::sudo(as_login(OPERATOR, "become-nested")));
        let (name, _, _) = root
            .call_async(who_after_becoming_again, ())
            .await
            .expect("call")
            .expect("nested");
        assert_eq!(name, APP);
    }
}

#[cfg(feature = "ssh")]
mod over_ssh {
    use super::*;
    use chopsticks::{Group, Ssh, SshGroup};
    use chopsticks_testkit::Sshd;

    fn login(sshd: &Sshd, index: usize, user: &str) -> Ssh {
        Ssh::new(sshd.alias(index))
            .config_file(sshd.client_config())
            .user(user)
    }

    fn in_root_only_dir(name: &str) -> std::path::PathBuf {
        let dir = std::path::Path::new("/root/chopsticks-become");
        let _ = std::fs::create_dir_all(dir);
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .expect("mode");
        dir.join(name)
    }

    #[tokio::test]
    async fn sudo_over_ssh_with_a_nopasswd_rule() {
        let Some(()) = accounts("becoming::over_ssh") else {
            return;
        };
        let Some(sshd) = chopsticks_testkit::sshd_or_skip("become", 2) else {
            return;
        };
        let root = quiet(login(&sshd, 0, OPERATOR).sudo());
        assert_eq!(root.host(), sshd.alias(0));
        let (name, uid, _) = root.call(who, ()).await.expect("as root");
        assert_eq!((name.as_str(), uid.as_str()), ("root", "0"));

        // put and fetch into a directory only root may enter
        let target = in_root_only_dir("put-over-ssh");
        let _ = std::fs::remove_file(&target);
        let local = tempfile::NamedTempFile::new().expect("temp");
        std::fs::write(local.path(), b"for root only").expect("write");
        root.put(local.path(), &target).await.expect("put as root");
        assert_eq!(std::fs::read(&target).expect("read"), b"for root only");
        let back = tempfile::tempdir().expect("tempdir");
        root.fetch(&target, back.path().join("back"))
            .await
            .expect("fetch as root");
        assert_eq!(
            std::fs::read(back.path().join("back")).expect("read"),
            b"for root only"
        );
        // The login user alone may not.
        let plain = quiet(login(&sshd, 0, OPERATOR));
        assert!(
            plain
                .put(local.path(), in_root_only_dir("denied"))
                .await
                .is_err()
        );

        let app = quiet(login(&sshd, 1, OPERATOR).sudo().user(APP));
        assert_eq!(app.call(who, ()).await.expect("as app").0, APP);

        let group =
            Group::ssh_become(sshd.aliases(), &login(&sshd, 0, OPERATOR).sudo()).expect("group");
        let results = group.call(who, ()).await.into_result().expect("every host");
        assert_eq!(results.len(), 2);
        for (host, (_, uid, _)) in results {
            assert_eq!(uid, "0", "{host}");
        }
    }

    #[tokio::test]
    async fn sudo_over_ssh_with_a_password() {
        let Some(()) = accounts("becoming::over_ssh_password") else {
            return;
        };
        let Some(sshd) = chopsticks_testkit::sshd_or_skip("become-pw", 1) else {
            return;
        };
        let root = quiet(login(&sshd, 0, PASSWORD_USER).sudo().password(PASSWORD));
        connect_as_root_unseen(&root).await;

        let wrong = quiet(login(&sshd, 0, PASSWORD_USER).sudo().password("wrong"));
        let error = wrong.connect().await.expect_err("wrong password");
        assert!(
            matches!(become_error(&error), BecomeError::WrongPassword { host, .. } if host == sshd.alias(0)),
            "{error:?}"
        );
        // The login user of the test kit has no rule at all.
        let error = quiet(login(&sshd, 0, sshd.user()).sudo())
            .connect()
            .await
            .expect_err("no rule");
        assert!(
            matches!(become_error(&error), BecomeError::PasswordRequired { .. }),
            "{error:?}"
        );
    }
}

#[cfg(feature = "libssh2")]
mod over_libssh2 {
    use super::*;
    use chopsticks::NativeSsh;

    #[tokio::test]
    async fn sudo_over_native_ssh_with_a_password() {
        let Some(()) = accounts("becoming::over_libssh2") else {
            return;
        };
        let Some(sshd) = chopsticks_testkit::sshd_or_skip("become-native", 1) else {
            return;
        };
        let native = NativeSsh::new("127.0.0.1")
            .port(sshd.port())
            .user(PASSWORD_USER)
            .identity_file(sshd.client_key())
            .known_hosts(sshd.known_hosts());
        let root = quiet(Become::sudo(native).password(PASSWORD));
        assert_eq!(root.call(who, ()).await.expect("as root").1, "0");
    }
}

#[cfg(feature = "docker")]
mod in_containers {
    use super::*;
    use chopsticks::Docker;
    use chopsticks_testkit::docker;

    /// `id -u` and `HOME`: the images have no `whoami`.
    fn uid_and_home() -> (String, String) {
        let (_, uid, home) = who();
        (uid, home)
    }

    #[tokio::test]
    async fn sudo_in_a_container_through_docker_exec() {
        let Some(()) = docker::docker_or_skip() else {
            return;
        };
        let Some(image) = chopsticks_testkit::require(docker::sudo_image(), "becoming::docker")
        else {
            return;
        };
        let container =
            docker::running_container_of("chopsticks-become-sudo", image).expect("container");
        let nobody = quiet(Become::sudo(Docker::exec(&container)).user("nobody"));
        let (uid, _) = nobody.call(uid_and_home, ()).await.expect("as nobody");
        assert_eq!(uid, "65534");
        let missing = quiet(Become::sudo(Docker::exec(&container)).user("chopsticks-nosuch"));
        let error = missing.connect().await.expect_err("no such user");
        assert!(
            matches!(become_error(&error), BecomeError::UnknownUser { .. }),
            "{error:?}"
        );
        docker::remove_container("chopsticks-become-sudo");
    }

    #[tokio::test]
    async fn a_container_without_sudo_says_so() {
        let Some(()) = docker::docker_or_skip() else {
            return;
        };
        let container =
            docker::running_container_of("chopsticks-become-nosudo", docker::BOOTSTRAP_IMAGE)
                .expect("container");
        let error = quiet(Become::sudo(Docker::exec(&container)))
            .connect()
            .await
            .expect_err("no sudo");
        assert!(
            matches!(become_error(&error), BecomeError::NotInstalled { .. }),
            "{error:?}"
        );
        docker::remove_container("chopsticks-become-nosudo");
    }
}
