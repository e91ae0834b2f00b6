//! The Docker transport against the real Engine, with images built here.

use std::time::{Duration, Instant};

use crate::support::pending_call_error_after;
use chopsticks::{Docker, DockerError, Error, Group, Tunnel};
use chopsticks_testkit::docker::{
    SCRATCH_IMAGE, TOOLS_IMAGE, container_exists, docker_or_skip, kill_container,
    labelled_containers, payload_volumes, remove_container, running_container,
};

fn unique(name: &str) -> String {
    format!("chopsticks-test-{name}-{}", std::process::id())
}

fn tunnel(docker: Docker) -> Tunnel {
    Tunnel::builder(docker.label("chopsticks-test", "1"))
        .stderr(chopsticks::stderr::discard())
        .build()
}

fn docker_error(error: &Error) -> &DockerError {
    match error {
        Error::Spawn {
            cause: Some(cause), ..
        } => cause
            .downcast_ref::<DockerError>()
            .unwrap_or_else(|| panic!("not a DockerError: {error:?}")),
        other => panic!("expected Error::Spawn with a DockerError, got {other:?}"),
    }
}

fn facts() -> (u32, bool, String) {
    (
        std::process::id(),
        std::path::Path::new("/bin").exists(),
        std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default(),
    )
}

fn add(a: u64, b: u64) -> u64 {
    a + b
}

/// Waits until the Engine no longer knows the container.
async fn gone(name: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if !container_exists(name) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn calls_and_files_in_a_scratch_container_that_is_removed_afterwards() {
    if docker_or_skip().is_none() {
        return;
    }
    let name = unique("scratch");
    remove_container(&name);
    let tun = tunnel(Docker::new(&name).image(SCRATCH_IMAGE));
    let (pid, has_bin, hostname) = tun.call(facts, ()).await.expect("call in scratch");
    assert_eq!(pid, 1, "the agent is the container's first process");
    assert!(!has_bin, "the scratch image has no /bin");
    assert_ne!(hostname.trim(), "");
    assert_eq!(tun.call(add, (40, 2)).await.expect("call"), 42);

    let dir = crate::support::Scratch::new("docker");
    let data = crate::support::patterned(&dir.path("source"), 3 * 1024 * 1024 + 7);
    tun.put(dir.path("source"), "/tmp/data")
        .await
        .expect("put into the container");
    let back = tun
        .fetch("/tmp/data", dir.path("back"))
        .await
        .expect("fetch from the container");
    assert_eq!(back.size, data.len() as u64);
    assert_eq!(std::fs::read(dir.path("back")).expect("read"), data);
    assert!(!dir.path("source").starts_with("/tmp/data"));

    assert!(container_exists(&name));
    tun.close().await.expect("close");
    assert!(gone(&name).await, "the container was removed on close");
}

/// Tries to write beside the running program, inside the payload directory.
fn write_beside_agent() -> String {
    let exe = std::fs::read_link("/proc/self/exe").unwrap_or_default();
    let dir = exe
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    match std::fs::write(dir.join("tampered"), b"x") {
        Ok(()) => format!("wrote into {}", dir.display()),
        Err(error) => format!("{:?} in {}", error.kind(), dir.display()),
    }
}

#[tokio::test]
async fn new_containers_mount_the_agent_read_only_from_one_shared_volume() {
    if docker_or_skip().is_none() {
        return;
    }
    for name in [unique("volume-a"), unique("volume-b")] {
        let tun = tunnel(Docker::new(&name).image(TOOLS_IMAGE));
        let outcome = tun.call(write_beside_agent, ()).await.expect("call");
        // Code in one container cannot change the agent another one runs.
        assert!(
            outcome.starts_with("ReadOnlyFilesystem in /.chopsticks/"),
            "{outcome}"
        );
        tun.close().await.expect("close");
        assert!(gone(&name).await, "{name} removed");
    }
    let volumes = payload_volumes();
    let complete: Vec<&String> = volumes
        .iter()
        .filter(|v| v.ends_with(".complete"))
        .collect();
    assert!(!complete.is_empty(), "a completeness marker: {volumes:?}");
    for marker in complete {
        let volume = marker.trim_end_matches(".complete");
        assert!(
            volumes.iter().any(|v| v == volume),
            "{volume} in {volumes:?}"
        );
    }
    let helpers = labelled_containers("helper");
    assert!(helpers.is_empty(), "helper containers left: {helpers:?}");
}

#[tokio::test]
async fn a_mount_over_the_agent_path_falls_back_to_uploading_the_agent() {
    if docker_or_skip().is_none() {
        return;
    }
    let id = &chopsticks_core::__private::identity::agent_file()
        .expect("hash")
        .sha256[..32];
    let host_dir = std::env::temp_dir().join(unique("clash"));
    std::fs::create_dir_all(&host_dir).expect("mkdir");
    let name = unique("clash");
    // The Engine refuses the payload volume on a path the user mounts too.
    let tun = tunnel(
        Docker::new(&name)
            .image(TOOLS_IMAGE)
            .mount(format!("{}:/.chopsticks/{id}", host_dir.display())),
    );
    let answer = tun.call(add, (2, 2)).await;
    let uploaded = host_dir.join("agent").exists();
    let closed = tun.close().await;
    let removed = gone(&name).await;
    let _ = std::fs::remove_dir_all(&host_dir);
    assert_eq!(answer.expect("a call through an uploaded agent"), 4);
    assert!(uploaded, "the agent went through the user's mount");
    closed.expect("close");
    assert!(removed, "{name} removed");
}

#[tokio::test]
async fn a_group_of_containers() {
    if docker_or_skip().is_none() {
        return;
    }
    let names: Vec<String> = (0..3).map(|i| unique(&format!("group-{i}"))).collect();
    let group = Group::new(
        names
            .iter()
            .map(|name| tunnel(Docker::new(name).image(SCRATCH_IMAGE))),
    )
    .expect("group");
    let sums = group
        .call(add, (1, 2))
        .await
        .into_result()
        .expect("every container");
    assert_eq!(sums.len(), 3);
    group.close().await;
    for name in &names {
        assert!(gone(name).await, "{name} was removed");
    }
}

#[tokio::test]
async fn exec_into_a_running_container_leaves_it_running() {
    if docker_or_skip().is_none() {
        return;
    }
    let name = unique("exec");
    running_container(&name).expect("start a container");
    let tun = tunnel(Docker::exec(&name));
    let (pid, has_bin, _) = tun.call(facts, ()).await.expect("call through exec");
    assert_ne!(pid, 1, "the container's own process is pid 1");
    assert!(has_bin, "the tools image has /bin");
    tun.close().await.expect("close");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(container_exists(&name), "exec leaves the container");
    remove_container(&name);
}

#[tokio::test]
async fn a_killed_container_fails_pending_calls_fast_and_is_removed() {
    if docker_or_skip().is_none() {
        return;
    }
    let name = unique("killed");
    let tun = tunnel(Docker::new(&name).image(TOOLS_IMAGE));
    let (error, after_kill) =
        pending_call_error_after(&tun, || kill_container(&name).expect("docker kill")).await;
    assert!(error.is_disconnected(), "{error:?}");
    assert!(error.to_string().contains(&name), "{error}");
    assert!(after_kill < Duration::from_secs(5));
    assert!(gone(&name).await, "the dead container was removed");
}

/// Runs on agent A: opens a tunnel to a new container and holds it, with a
/// call in flight, until A dies.
async fn hold_container(name: String, keep: bool) -> Result<(), String> {
    let tunnel = tunnel(Docker::new(&name).image(TOOLS_IMAGE).keep(keep));
    tunnel.connect().await.map_err(|error| error.to_string())?;
    tokio::spawn(async move {
        let _ = tunnel.call(crate::support::sleep_secs, (60,)).await;
        std::future::pending::<()>().await;
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}

#[tokio::test]
async fn a_container_whose_controller_was_killed_is_removed_unless_kept() {
    if docker_or_skip().is_none() {
        return;
    }
    for keep in [false, true] {
        let name = unique(if keep { "orphan-kept" } else { "orphan" });
        remove_container(&name);
        let a = Tunnel::builder(chopsticks::Local::named("a"))
            .stderr(chopsticks::stderr::discard())
            .build();
        a.call_async(hold_container, (name.clone(), keep))
            .await
            .expect("call A")
            .expect("A starts the container");
        assert!(container_exists(&name), "the container runs");
        let a_pid = a.agent_pid().expect("A's pid");
        // SAFETY: kill has no memory-safety preconditions.
        assert_eq!(unsafe { libc::kill(a_pid as i32, libc::SIGKILL) }, 0);
        let killed = Instant::now();
        if keep {
            tokio::time::sleep(Duration::from_secs(2)).await;
            assert!(container_exists(&name), "keep(true) keeps it");
            remove_container(&name);
        } else {
            assert!(
                gone(&name).await,
                "the container outlived its killed controller"
            );
            crate::support::figure(
                "docker: a killed controller's container gone after",
                killed.elapsed(),
            );
        }
    }
}

#[tokio::test]
async fn a_connect_cut_short_at_any_point_leaves_no_container() {
    if docker_or_skip().is_none() {
        return;
    }
    // With the payload volume filled, the cuts fall into creating and starting.
    let warm = unique("cut-warm");
    let tun = tunnel(Docker::new(&warm).image(TOOLS_IMAGE));
    tun.call(add, (1, 2)).await.expect("warm-up connect");
    tun.close().await.expect("close");
    for cut_ms in [5u64, 15, 30, 45, 60, 80, 100, 150] {
        let name = unique(&format!("cut-{cut_ms}"));
        let tun = Tunnel::builder(Docker::new(&name).image(TOOLS_IMAGE))
            .connect_timeout(Duration::from_millis(cut_ms))
            .stderr(chopsticks::stderr::discard())
            .build();
        let outcome = tun.connect().await;
        drop(tun);
        // An Engine still creating the container when the cut came finishes
        // first; the container must be gone and stay gone.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            gone(&name).await,
            "a connect cut at {cut_ms} ms ({outcome:?}) left {name} behind"
        );
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(
            !container_exists(&name),
            "a connect cut at {cut_ms} ms ({outcome:?}) left {name} behind"
        );
    }
}

#[tokio::test]
async fn engine_and_image_problems_are_clear_and_leave_nothing() {
    if docker_or_skip().is_none() {
        return;
    }
    let name = unique("missing-image");
    let error = tunnel(Docker::new(&name).image("chopsticks-test/no-such-image:0"))
        .connect()
        .await
        .expect_err("no such image");
    assert!(
        matches!(docker_error(&error), DockerError::ImageMissing { .. }),
        "{error}"
    );
    let text = error.to_string();
    assert!(
        text.contains(&name) && text.contains("no-such-image"),
        "{text}"
    );
    assert!(!container_exists(&name));

    let taken = unique("taken");
    running_container(&taken).expect("start a container");
    let error = tunnel(Docker::new(&taken).image(SCRATCH_IMAGE))
        .connect()
        .await
        .expect_err("name taken");
    assert!(
        matches!(docker_error(&error), DockerError::NameConflict { .. }),
        "{error}"
    );
    assert!(
        container_exists(&taken),
        "the existing container is untouched"
    );
    remove_container(&taken);

    let error = tunnel(
        Docker::new(unique("unreachable"))
            .image(SCRATCH_IMAGE)
            .engine("unix:///nonexistent/docker.sock"),
    )
    .connect()
    .await
    .expect_err("no engine there");
    assert!(
        matches!(docker_error(&error), DockerError::Engine { .. }),
        "{error}"
    );

    let error = tunnel(Docker::exec(unique("absent")))
        .connect()
        .await
        .expect_err("no such container");
    assert!(
        matches!(docker_error(&error), DockerError::NoSuchContainer { .. }),
        "{error}"
    );
}

/// What the agent sees of its container's settings.
fn settings() -> (u32, String, String, String, Vec<String>) {
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let mut interfaces: Vec<String> = std::fs::read_dir("/sys/class/net")
        .map(|entries| {
            entries
                .flatten()
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    interfaces.sort();
    (
        uid,
        std::env::var("GREETING").unwrap_or_default(),
        std::env::current_dir()
            .map(|dir| dir.display().to_string())
            .unwrap_or_default(),
        std::fs::read_to_string("/data/hello").unwrap_or_default(),
        interfaces,
    )
}

#[tokio::test]
async fn user_env_working_dir_mounts_network_labels_and_keep() {
    if docker_or_skip().is_none() {
        return;
    }
    let shared = crate::support::Scratch::shared("docker-mount");
    std::fs::write(shared.path("hello"), "from the host").expect("write");
    let name = unique("options");
    remove_container(&name);
    let tun = tunnel(
        Docker::new(&name)
            .image(SCRATCH_IMAGE)
            .user("1234:1234")
            .env("GREETING", "hi")
            .working_dir("/tmp")
            .mount(format!("{}:/data:ro", shared.dir().display()))
            .network("none")
            .label("purpose", "options-test")
            .keep(true),
    );
    let (uid, greeting, cwd, data, interfaces) = tun.call(settings, ()).await.expect("call");
    assert_eq!(uid, 1234);
    assert_eq!(greeting, "hi");
    assert_eq!(cwd, "/tmp");
    assert_eq!(data, "from the host");
    assert_eq!(interfaces, ["lo"], "network none leaves only loopback");
    tun.close().await.expect("close");
    let labels = std::process::Command::new("docker")
        .args(["inspect", "--format", "{{json .Config.Labels}}", &name])
        .output()
        .expect("docker inspect");
    let labels = String::from_utf8_lossy(&labels.stdout);
    assert!(labels.contains("\"chopsticks\":\"agent\""), "{labels}");
    assert!(labels.contains("\"purpose\":\"options-test\""), "{labels}");
    assert!(container_exists(&name), "keep(true) keeps the container");
    remove_container(&name);
}

#[tokio::test]
async fn an_exec_into_a_stopped_container_says_it_is_not_running() {
    if docker_or_skip().is_none() {
        return;
    }
    let name = unique("stopped");
    running_container(&name).expect("start a container");
    let stopped = std::process::Command::new("docker")
        .args(["stop", "-t", "0", &name])
        .output()
        .expect("docker stop");
    assert!(stopped.status.success(), "docker stop failed");
    let error = tunnel(Docker::exec(&name))
        .connect()
        .await
        .expect_err("a stopped container runs no exec");
    assert!(
        matches!(docker_error(&error), DockerError::NotRunning { .. }),
        "{error:?}"
    );
    let text = error.to_string();
    assert!(
        text.contains("not running") && !text.contains("(image )"),
        "{text}"
    );
    remove_container(&name);
}

/// Fake payloads of earlier builds in `/.chopsticks`, placed `hours` ago
/// (a directory with its `complete` marker), and one directory that is not
/// a payload; returns the names of the payloads that exist.
fn plant_payloads(hours: Vec<u64>) -> Vec<String> {
    let root = std::path::Path::new("/.chopsticks");
    for (index, age) in hours.iter().enumerate() {
        let dir = root.join(format!("{index:0>32}"));
        std::fs::create_dir_all(dir.join("lib")).expect("plant a payload");
        std::fs::File::create(dir.join("complete"))
            .and_then(|marker| {
                marker.set_modified(std::time::SystemTime::now() - Duration::from_secs(age * 3600))
            })
            .expect("plant a marker");
    }
    std::fs::create_dir_all(root.join("not-a-payload")).expect("plant a stranger");
    payload_names()
}

fn payload_names() -> Vec<String> {
    crate::support::entries(std::path::Path::new("/.chopsticks"))
}

#[tokio::test]
async fn exec_keeps_the_three_newest_payloads_in_the_container() {
    if docker_or_skip().is_none() {
        return;
    }
    let name = unique("evict");
    running_container(&name).expect("start a container");
    let planted = tunnel(Docker::exec(&name))
        .call(plant_payloads, (vec![1, 2, 3, 4],))
        .await
        .expect("plant payloads of earlier builds");
    assert_eq!(planted.len(), 6, "{planted:?}");
    let own = planted
        .iter()
        .find(|name| !name.starts_with("0000") && name.as_str() != "not-a-payload")
        .expect("this build's payload")
        .clone();
    // The next agent in the container (the one that placed the payload may
    // already have removed some) leaves its own, the two newest others and
    // the stranger.
    let tun = tunnel(Docker::exec(&name));
    let expected = {
        let mut names = vec![
            format!("{:0>32}", 0),
            format!("{:0>32}", 1),
            own,
            "not-a-payload".to_string(),
        ];
        names.sort();
        names
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut left = Vec::new();
    while Instant::now() < deadline {
        left = tun.call(payload_names, ()).await.expect("list payloads");
        if left == expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(left, expected);
    tun.close().await.expect("close");
    remove_container(&name);
}
