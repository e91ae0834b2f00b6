//! Docker fixtures: the Engine check and locally built test images (no image
//! can be pulled here).

use std::process::{Command, Stdio};

/// An image with nothing in it but an empty `/tmp`.
pub const SCRATCH_IMAGE: &str = "chopsticks-test/scratch:1";
/// An image with `sh`, `sleep`, `cat` and `true` and their libraries, copied
/// from this machine, for containers that must keep running.
pub const TOOLS_IMAGE: &str = "chopsticks-test/tools:1";
/// An image with the shell bootstrap's tools and the libraries of the
/// running test program, so the bootstrap can start an agent in it.
pub const BOOTSTRAP_IMAGE: &str = "chopsticks-test/bootstrap:2";
/// The bootstrap image with `sudo` added: a sudoers file that lets root
/// become anyone, and a PAM stack of `pam_rootok` (built by [`sudo_image`]).
pub const SUDO_IMAGE: &str = "chopsticks-test/sudo:1";
/// The label on every container the tests start themselves.
pub const TEST_LABEL: &str = "chopsticks-test";

fn docker(args: &[&str]) -> Result<String, String> {
    let output = Command::new("docker")
        .args(args)
        .output()
        .map_err(|e| format!("docker {}: {e}", args.join(" ")))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    } else {
        Err(format!(
            "docker {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Checks the Engine and builds the test images if they are missing.
pub fn prepare() -> Result<(), String> {
    docker(&["info", "--format", "{{.ServerVersion}}"]).map_err(|e| {
        format!("the Docker Engine is not available ({e}); scripts/test.sh starts it")
    })?;
    let _lock = crate::exclusive("chopsticks-testkit-docker")?;
    if docker(&["image", "inspect", SCRATCH_IMAGE]).is_err() {
        import(SCRATCH_IMAGE, &[])?;
    }
    if docker(&["image", "inspect", TOOLS_IMAGE]).is_err() {
        import(
            TOOLS_IMAGE,
            &["/bin/sh", "/bin/sleep", "/bin/cat", "/bin/true"],
        )?;
    }
    if docker(&["image", "inspect", BOOTSTRAP_IMAGE]).is_err() {
        import_root(BOOTSTRAP_IMAGE, crate::rootfs::bootstrap_root)?;
    }
    remove_stale_payload_volumes();
    Ok(())
}

/// Builds [`SUDO_IMAGE`] if it is missing (after [`prepare`]).
pub fn sudo_image() -> Result<&'static str, String> {
    let _lock = crate::exclusive("chopsticks-testkit-docker")?;
    if docker(&["image", "inspect", SUDO_IMAGE]).is_err() {
        import_root(SUDO_IMAGE, |root| {
            crate::rootfs::bootstrap_root(root)?;
            crate::rootfs::sudo_root(root)
        })?;
    }
    Ok(SUDO_IMAGE)
}

/// The payload volumes on this Engine (`chopsticks-agent-<id>` and its
/// `.complete` marker), one pair per program.
pub fn payload_volumes() -> Vec<String> {
    docker(&["volume", "ls", "-q", "--filter", "label=chopsticks=payload"])
        .map(|list| list.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Containers left by chopsticks with label `chopsticks=VALUE`.
pub fn labelled_containers(value: &str) -> Vec<String> {
    docker(&[
        "ps",
        "-aq",
        "--filter",
        &format!("label=chopsticks={value}"),
    ])
    .map(|list| list.split_whitespace().map(str::to_string).collect())
    .unwrap_or_default()
}

/// Each test build is a new program with its own payload volumes; those of
/// earlier builds are removed once per process, before any test uses the Engine.
fn remove_stale_payload_volumes() {
    static ONCE: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        for volume in payload_volumes() {
            // A volume in use by a running container stays.
            let _ = docker(&["volume", "rm", &volume]);
        }
    });
}

/// Imports a root filesystem holding `programs` (with their libraries) and an empty `/tmp`.
fn import(image: &str, programs: &[&str]) -> Result<(), String> {
    let programs: Vec<std::path::PathBuf> = programs.iter().map(Into::into).collect();
    import_root(image, |root| crate::rootfs::populate(root, &programs, &[]))
}

/// Imports the root filesystem `fill` makes as `image`.
fn import_root(
    image: &str,
    fill: impl FnOnce(&std::path::Path) -> Result<(), String>,
) -> Result<(), String> {
    let root = std::env::temp_dir().join(format!("chopsticks-image-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    fill(&root)?;
    let tar = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .args(["-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("tar: {e}"))?;
    let status = Command::new("docker")
        .args(["import", "-", image])
        .stdin(tar.stdout.ok_or("tar has no stdout")?)
        .stdout(Stdio::null())
        .status()
        .map_err(|e| format!("docker import: {e}"))?;
    let _ = std::fs::remove_dir_all(&root);
    if status.success() {
        Ok(())
    } else {
        Err(format!("docker import of {image} failed"))
    }
}

/// Docker is ready, or `None` with a note — except under `CI=true`, where it is a failure.
pub fn docker_or_skip() -> Option<()> {
    crate::require(prepare(), "a docker test")
}

/// Starts a container from the tools image that sleeps until removed; returns its id.
pub fn running_container(name: &str) -> Result<String, String> {
    running_container_of(name, TOOLS_IMAGE)
}

/// A running container of `image` (one of the test images), sleeping.
pub fn running_container_of(name: &str, image: &str) -> Result<String, String> {
    let _ = docker(&["rm", "-f", name]);
    docker(&[
        "run",
        "-d",
        "--name",
        name,
        "--label",
        TEST_LABEL,
        image,
        "/bin/sleep",
        "3600",
    ])
}

/// Whether a container of this name or id exists.
pub fn container_exists(name: &str) -> bool {
    docker(&["container", "inspect", name]).is_ok()
}

/// Removes a container, ignoring whether it existed.
pub fn remove_container(name: &str) {
    let _ = docker(&["rm", "-f", name]);
}

/// Kills a container's main process.
pub fn kill_container(name: &str) -> Result<(), String> {
    docker(&["kill", name]).map(drop)
}
