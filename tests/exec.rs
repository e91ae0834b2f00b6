//! The `Exec` transport: the shell bootstrap through a command prefix, into
//! a network namespace, a chroot and a container (the `docker exec -i`
//! CLI), and what bad prefixes get.

use std::time::Duration;

use chopsticks::{Error, Exec, LocalError, Tunnel};
use chopsticks_testkit::docker::{BOOTSTRAP_IMAGE, docker_or_skip, remove_container};
use chopsticks_testkit::netns::netns_or_skip;

use crate::support::{ChrootRoot, Scratch};

fn tunnel(exec: Exec) -> Tunnel {
    Tunnel::builder(exec)
        .stderr(chopsticks::stderr::discard())
        .connect_timeout(Duration::from_secs(60))
        .build()
}

/// The network namespace this process is in, as the kernel names it.
fn network_namespace() -> String {
    std::fs::read_link("/proc/self/ns/net")
        .map(|link| link.display().to_string())
        .unwrap_or_default()
}

fn add(a: u64, b: u64) -> u64 {
    a + b
}

async fn ticks(count: u64) -> u64 {
    for _ in 0..count {
        tokio::task::yield_now().await;
    }
    count
}

#[tokio::test]
async fn into_a_network_namespace() {
    let Some(host) = netns_or_skip("exec::into_a_network_namespace") else {
        return;
    };
    let tun = tunnel(Exec::new(["ip", "netns", "exec", host.name()]).named("blue"));
    assert_eq!(tun.host(), "blue");
    let theirs = tun.call(network_namespace, ()).await.expect("call");
    assert_ne!(
        theirs,
        network_namespace(),
        "the agent runs in the namespace"
    );
    assert_eq!(tun.call(add, (40, 2)).await.expect("call"), 42);
    assert_eq!(tun.call_async(ticks, (3,)).await.expect("async call"), 3);
    let dir = Scratch::new("exec-netns");
    std::fs::write(dir.path("source"), b"through ip netns exec\n").expect("write");
    tun.put(dir.path("source"), dir.path("put"))
        .await
        .expect("put");
    tun.fetch(dir.path("put"), dir.path("fetched"))
        .await
        .expect("fetch");
    assert_eq!(
        std::fs::read(dir.path("fetched")).expect("read"),
        b"through ip netns exec\n"
    );
    tun.close().await.expect("close");
}

fn marker() -> String {
    std::fs::read_to_string("/chroot-marker").unwrap_or_default()
}

#[tokio::test]
async fn into_a_chroot() {
    let Some(root) = chopsticks_testkit::require(
        ChrootRoot::with_tools("exec").and_then(|root| {
            std::fs::write(root.path().join("chroot-marker"), b"inside")
                .map(|()| root)
                .map_err(|e| e.to_string())
        }),
        "exec::into_a_chroot",
    ) else {
        return;
    };
    let chroot = root.path().display().to_string();
    let tun = tunnel(Exec::new(["chroot", chroot.as_str()]).named("jail"));
    assert_eq!(tun.call(marker, ()).await.expect("call"), "inside");
    assert_eq!(tun.call(add, (1, 2)).await.expect("call"), 3);
    tun.put_bytes("in the jail\n", "/tmp/put")
        .await
        .expect("put");
    assert_eq!(
        std::fs::read(root.path().join("tmp/put")).expect("read"),
        b"in the jail\n"
    );
    let dir = Scratch::new("exec-chroot");
    tun.fetch("/chroot-marker", dir.path("marker"))
        .await
        .expect("fetch");
    assert_eq!(std::fs::read(dir.path("marker")).expect("read"), b"inside");
    tun.close().await.expect("close");
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_default()
        .trim()
        .to_string()
}

#[tokio::test]
async fn into_a_container_through_the_docker_cli() {
    if docker_or_skip().is_none() {
        return;
    }
    let name = format!("chopsticks-test-exec-cli-{}", std::process::id());
    let id = chopsticks_testkit::docker::running_container_of(&name, BOOTSTRAP_IMAGE)
        .expect("start a container");
    let tun = tunnel(Exec::new(["docker", "exec", "-i", name.as_str()]).named(name.as_str()));
    let theirs = tun.call(hostname, ()).await.expect("call");
    assert!(
        id.starts_with(&theirs),
        "{theirs} is not the container {id}"
    );
    assert_eq!(tun.call_async(ticks, (5,)).await.expect("async call"), 5);
    tun.put_bytes("config\n", "/tmp/app.conf")
        .await
        .expect("put");
    let dir = Scratch::new("exec-docker");
    tun.fetch("/tmp/app.conf", dir.path("copy"))
        .await
        .expect("fetch");
    assert_eq!(std::fs::read(dir.path("copy")).expect("read"), b"config\n");
    tun.close().await.expect("close");
    remove_container(&name);
}

#[tokio::test]
async fn a_prefix_that_ends_at_once_is_a_spawn_error_naming_it_and_its_stderr() {
    let tun = tunnel(Exec::new([
        "sh",
        "-c",
        "echo 'error: pod web-9 not found' >&2; exit 1",
        "fake-kubectl",
    ]));
    let error = tun.call(add, (1, 1)).await.expect_err("the command failed");
    let Error::Spawn {
        cause: Some(cause), ..
    } = &error
    else {
        panic!("expected a spawn error, got {error:?}");
    };
    let local = cause.downcast_ref::<LocalError>().expect("a LocalError");
    assert!(
        matches!(local, LocalError::CommandEnded { .. }),
        "{local:?}"
    );
    let text = error.to_string();
    assert!(text.contains("pod web-9 not found"), "{text}");
    assert!(text.contains("`sh -c echo"), "{text}");

    let missing = tunnel(Exec::new(["no-such-command-here", "exec"]))
        .call(add, (1, 1))
        .await
        .expect_err("no such program");
    assert!(
        missing.to_string().contains("no-such-command-here"),
        "{missing}"
    );

    let empty = tunnel(Exec::new(Vec::<String>::new()).named("nothing"))
        .call(add, (1, 1))
        .await
        .expect_err("an empty command");
    assert!(empty.to_string().contains("empty"), "{empty}");
}

#[tokio::test]
async fn hostile_words_in_a_prefix_reach_the_command_as_they_are() {
    let dir = Scratch::new("exec-hostile");
    let witness = dir.path("ran");
    // Words a shell would act on: passed as argv, `env` sees them as an
    // assignment and a program name, and nothing is run by a shell.
    let hostile = format!(
        "X=$(touch {}); `touch {}`",
        witness.display(),
        witness.display()
    );
    let tun = tunnel(Exec::new(["env", hostile.as_str()]).named("hostile"));
    assert_eq!(tun.call(add, (2, 3)).await.expect("call through env"), 5);
    let seen: String = tun
        .call(|| std::env::var("X").unwrap_or_default(), ())
        .await
        .expect("call");
    assert!(seen.starts_with("$(touch "), "{seen}");
    assert!(!witness.exists(), "a shell ran a word of the prefix");
}

fn libcless_tunnel(root: &ChrootRoot, bundle: bool) -> Tunnel {
    let chroot = root.path().display().to_string();
    Tunnel::builder(Exec::new(["chroot".to_string(), chroot]).named("libcless"))
        .stderr(chopsticks::stderr::discard())
        .connect_timeout(Duration::from_secs(60))
        .bundle_libraries(bundle)
        .build()
}

#[tokio::test]
async fn a_host_without_any_c_library_runs_the_bundled_agent() {
    let Some(root) =
        chopsticks_testkit::require(ChrootRoot::without_c_library("bundled"), "exec::libcless")
    else {
        return;
    };
    let tun = libcless_tunnel(&root, true);
    assert_eq!(tun.call_async(ticks, (4,)).await.expect("async call"), 4);
    crate::support::exercise_without_c_library(&tun, &root, "bundled\n").await;
    tun.close().await.expect("close");

    // Warm: nothing is sent again. A corrupted library in the cache is
    // deleted and sent again, never executed.
    let cache = root.path().join("tmp/chopsticks-0");
    let bundle = std::fs::read_dir(&cache)
        .expect("cache")
        .flatten()
        .find(|entry| entry.file_name().to_string_lossy().starts_with("bundle-"))
        .expect("a bundle in the cache")
        .path();
    let libc = std::fs::read_dir(bundle.join("lib"))
        .expect("lib")
        .flatten()
        .find(|entry| entry.file_name().to_string_lossy().starts_with("libc.so"))
        .expect("libc in the bundle")
        .path();
    std::fs::write(&libc, b"not a library").expect("corrupt");
    let again = libcless_tunnel(&root, true);
    assert_eq!(again.call(add, (1, 1)).await.expect("call after repair"), 2);
    assert_ne!(std::fs::read(&libc).expect("read"), b"not a library");
    again.close().await.expect("close");
}

#[tokio::test]
async fn without_the_bundle_the_missing_loader_is_named() {
    let Some(root) =
        chopsticks_testkit::require(ChrootRoot::without_c_library("alone"), "exec::libcless")
    else {
        return;
    };
    let error = libcless_tunnel(&root, false)
        .call(add, (1, 1))
        .await
        .expect_err("no loader on the target");
    let text = error.to_string();
    assert_eq!(error.host(), "libcless", "{text}");
    assert!(text.contains("ld-linux"), "{text}");
    assert!(text.contains("bundle_libraries"), "{text}");
}

#[tokio::test]
async fn by_default_a_host_that_cannot_run_the_program_alone_gets_the_bundle() {
    let Some(root) =
        chopsticks_testkit::require(ChrootRoot::without_c_library("auto"), "exec::libcless")
    else {
        return;
    };
    let (sink, lines) = crate::support::capture_stderr();
    let chroot = root.path().display().to_string();
    let tun = Tunnel::builder(Exec::new(["chroot".to_string(), chroot]).named("auto"))
        .stderr(sink)
        .build();
    assert_eq!(
        tun.call(add, (1, 2))
            .await
            .expect("the bundle after the program alone failed"),
        3
    );
    tun.close().await.expect("close");
    assert_eq!(tun.call(add, (3, 4)).await.expect("reconnect"), 7);
    tun.close().await.expect("close");
    let failed_alone = lines
        .lock()
        .expect("lines")
        .iter()
        .filter(|line| line.contains("not found"))
        .count();
    assert_eq!(
        failed_alone, 1,
        "the tunnel tried the program alone once, then kept the bundle"
    );
}

#[tokio::test]
async fn a_host_with_an_older_c_library_gets_the_loaders_words_or_the_bundle() {
    let Some(root) = chopsticks_testkit::require(
        ChrootRoot::without_c_library("old").and_then(ChrootRoot::with_old_c_library),
        "exec::old_c_library",
    ) else {
        return;
    };
    let error = libcless_tunnel(&root, false)
        .call(add, (1, 1))
        .await
        .expect_err("the C library is too old");
    let text = error.to_string();
    assert_eq!(error.host(), "libcless", "{text}");
    assert_eq!(error.phase(), chopsticks::Phase::Connect, "{text}");
    assert!(
        text.contains("version `GLIBC_") && text.contains("not found"),
        "the loader's own message: {text}"
    );
    assert!(text.contains("bundle_libraries"), "{text}");
    // By default the tunnel falls back to the bundle, whose C library is ours.
    let chroot = root.path().display().to_string();
    let tun = Tunnel::builder(Exec::new(["chroot".to_string(), chroot]).named("old"))
        .stderr(chopsticks::stderr::discard())
        .build();
    assert_eq!(tun.call(add, (2, 2)).await.expect("through the bundle"), 4);
    tun.close().await.expect("close");
}
