//! What deploy scripts need of `put`: files from memory, owners and groups,
//! and puts that leave a target alone when it already is as asked.

use std::io::ErrorKind;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use chopsticks::{Direction, Error, Group, Local, Sudo, Tunnel};

use crate::support::{Scratch, USER};

fn transfer_error(error: &Error) -> (ErrorKind, String) {
    match error {
        Error::Transfer {
            direction: Direction::Put,
            kind,
            message,
            ..
        } => (*kind, error.to_string() + " / " + message),
        other => panic!("expected a put's transfer error, got {other:?}"),
    }
}

fn umask() -> u32 {
    chopsticks_core::__private::files::umask()
}

#[tokio::test]
async fn strings_and_bytes_are_written_whole_with_a_new_files_mode() {
    let dir = Scratch::new("from-memory");
    let tun = Tunnel::new(Local::new());
    let config = format!("listen = {}\nworkers = 4\n", 8080);
    let sent = tun
        .put_bytes(config.clone(), dir.path("etc/app.conf"))
        .create_dirs(true)
        .await
        .expect("put a string");
    assert_eq!(
        std::fs::read_to_string(dir.path("etc/app.conf")).expect("read"),
        config
    );
    assert_eq!(sent.size, config.len() as u64);
    assert_eq!(
        sent.checksum,
        blake3::hash(config.as_bytes()).to_hex().as_str()
    );
    assert!(sent.changed);
    assert_eq!(sent.local_path, std::path::PathBuf::new());
    let mode = std::fs::metadata(dir.path("etc/app.conf"))
        .expect("stat")
        .mode()
        & 0o777;
    assert_eq!(mode, 0o666 & !umask());

    // Several chunks of bytes, and an empty file.
    let large: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    tun.put_bytes(large.as_slice(), dir.path("large"))
        .mode(0o600)
        .await
        .expect("put bytes");
    assert_eq!(std::fs::read(dir.path("large")).expect("read"), large);
    let mode = std::fs::metadata(dir.path("large")).expect("stat").mode() & 0o777;
    assert_eq!(mode, 0o600);
    tun.put_bytes("", dir.path("empty"))
        .await
        .expect("put nothing");
    assert_eq!(std::fs::metadata(dir.path("empty")).expect("stat").len(), 0);

    // A failure says where the bytes came from, and leaves nothing.
    let error = tun
        .put_bytes("x", dir.path("missing/dir/file"))
        .await
        .expect_err("no such directory");
    let (kind, text) = transfer_error(&error);
    assert_eq!(kind, ErrorKind::NotFound, "{text}");
    assert!(text.contains("put from memory → localhost:"), "{text}");
    assert_eq!(dir.entries(), ["empty", "etc", "large"]);
}

#[tokio::test]
async fn a_group_writes_the_same_bytes_to_every_host() {
    let dir = Scratch::new("group-bytes");
    let group = Group::new(["one", "two", "three"].map(|name| Tunnel::new(Local::named(name))))
        .expect("group");
    let result = group
        .put_bytes(b"shared\n".to_vec(), dir.path("motd"))
        .await
        .into_result()
        .expect("every host");
    assert_eq!(result.len(), 3);
    assert!(
        result
            .values()
            .all(|transfer| transfer.changed && transfer.size == 7)
    );
    assert_eq!(std::fs::read(dir.path("motd")).expect("read"), b"shared\n");
    let again = group
        .put_bytes(b"shared\n".to_vec(), dir.path("motd"))
        .skip_unchanged(true)
        .await
        .into_result()
        .expect("every host");
    assert!(
        again.values().all(|transfer| !transfer.changed),
        "{again:?}"
    );
}

#[tokio::test]
async fn an_unchanged_target_is_left_alone_and_any_difference_is_written() {
    let dir = Scratch::new("unchanged");
    let tun = Tunnel::new(Local::new());
    let target = dir.path("app.conf");
    let put = |contents: &'static str| {
        tun.put_bytes(contents, &target)
            .mode(0o640)
            .skip_unchanged(true)
    };
    assert!(put("a = 1\n").await.expect("first").changed);
    let before = std::fs::metadata(&target).expect("stat");

    let again = put("a = 1\n").await.expect("again");
    assert!(!again.changed, "{again:?}");
    assert_eq!(again.size, 6);
    let after = std::fs::metadata(&target).expect("stat");
    assert_eq!(
        (before.ino(), before.mtime(), before.mtime_nsec()),
        (after.ino(), after.mtime(), after.mtime_nsec()),
        "the target was rewritten"
    );

    // Other content of the same size, another mode asked for, or a put
    // without a mode that leaves the mode alone.
    assert!(put("a = 2\n").await.expect("new content").changed);
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    assert!(put("a = 2\n").await.expect("mode differs").changed);
    assert_eq!(
        std::fs::metadata(&target).expect("stat").mode() & 0o777,
        0o640
    );
    let unasked = tun
        .put_bytes("a = 2\n", &target)
        .skip_unchanged(true)
        .await
        .expect("no mode asked");
    assert!(!unasked.changed);

    // A file source is compared the same way.
    std::fs::write(dir.path("source"), "a = 2\n").expect("write");
    let from_file = tun
        .put(dir.path("source"), &target)
        .skip_unchanged(true)
        .await
        .expect("from a file");
    assert!(!from_file.changed);
    assert_eq!(from_file.checksum, again_checksum("a = 2\n"));

    // Something that is not a regular file is replaced or refused as by any put.
    std::fs::remove_file(&target).expect("rm");
    std::fs::create_dir(&target).expect("mkdir");
    let error = put("a = 2\n").await.expect_err("a directory");
    assert_eq!(transfer_error(&error).0, ErrorKind::IsADirectory);
}

fn again_checksum(text: &str) -> String {
    blake3::hash(text.as_bytes()).to_hex().to_string()
}

#[tokio::test]
async fn owner_and_group_are_set_before_the_target_appears() {
    if !crate::support::is_root() {
        chopsticks_testkit::require::<()>(
            Err("setting another owner needs root".into()),
            "owner_and_group_are_set_before_the_target_appears",
        );
        return;
    }
    let dir = Scratch::new("owner");
    let tun = Tunnel::new(Local::new());
    let target = dir.path("owned");
    let sent = tun
        .put_bytes("secret\n", &target)
        .mode(0o600)
        .owner("nobody")
        .group("65534")
        .skip_unchanged(true)
        .await
        .expect("put as nobody");
    assert!(sent.changed);
    let metadata = std::fs::metadata(&target).expect("stat");
    assert_eq!((metadata.uid(), metadata.gid()), (65534, 65534));
    assert_eq!(metadata.mode() & 0o777, 0o600);
    let again = tun
        .put_bytes("secret\n", &target)
        .mode(0o600)
        .owner("65534")
        .group("65534")
        .skip_unchanged(true)
        .await
        .expect("again");
    assert!(!again.changed, "same owner by id");
    let root_owned = tun
        .put_bytes("secret\n", &target)
        .owner("root")
        .skip_unchanged(true)
        .await
        .expect("back to root");
    assert!(root_owned.changed, "another owner asked for");
    assert_eq!(std::fs::metadata(&target).expect("stat").uid(), 0);

    let error = tun
        .put_bytes("x", &target)
        .owner("no-such-user-here")
        .await
        .expect_err("unknown user");
    let (kind, text) = transfer_error(&error);
    assert_eq!(kind, ErrorKind::NotFound, "{text}");
    assert!(text.contains("no-such-user-here"), "{text}");
    assert_eq!(std::fs::read(&target).expect("read"), b"secret\n");
    assert_eq!(dir.entries(), ["owned"]);
}

#[tokio::test]
async fn an_agent_that_may_not_chown_fails_before_any_data_and_changes_nothing() {
    let Some(_) = crate::support::sudo_user() else {
        return;
    };
    let dir = Scratch::shared("chown-refused");
    std::fs::write(dir.path("target"), b"old").expect("write");
    std::fs::set_permissions(dir.path("target"), std::fs::Permissions::from_mode(0o666))
        .expect("chmod");
    let tun = Tunnel::builder(Sudo::new(USER))
        .stderr(chopsticks::stderr::discard())
        .build();
    let error = tun
        .put_bytes(vec![7u8; 4 << 20], dir.path("target"))
        .owner("root")
        .await
        .expect_err("only root gives files away");
    let (kind, text) = transfer_error(&error);
    assert_eq!(kind, ErrorKind::PermissionDenied, "{text}");
    assert!(text.contains("sudo:chopsticks-test"), "{text}");
    assert!(text.contains("setting the owner of"), "{text}");
    assert_eq!(std::fs::read(dir.path("target")).expect("read"), b"old");
    assert_eq!(dir.entries(), ["target"]);
    // Its own user is fine.
    let own = tun
        .put_bytes("mine\n", dir.path("mine"))
        .owner(USER)
        .await
        .expect("own user");
    assert!(own.changed);
}
