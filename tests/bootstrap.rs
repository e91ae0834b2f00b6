//! The shell bootstrap and its content-addressed agent cache, run for real through `sh`.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use chopsticks::{Error, Local, Tunnel};

fn pid() -> u32 {
    std::process::id()
}

fn cached_agent(dir: &Path) -> PathBuf {
    let hash = &chopsticks_core::__private::identity::agent_file()
        .expect("hash")
        .sha256;
    dir.join(format!("agent-{hash}"))
}

fn bootstrapped(cache: &Path, tmp: &Path) -> Tunnel {
    Tunnel::builder(
        Local::named("booted")
            .shell_bootstrap(true)
            .env("XDG_CACHE_HOME", cache.display().to_string())
            .env("TMPDIR", tmp.display().to_string()),
    )
    .stderr(chopsticks::stderr::discard())
    .build()
}

fn uid() -> u32 {
    // SAFETY: getuid has no preconditions.
    unsafe { libc::getuid() }
}

fn same_as_this_program(path: &Path) -> bool {
    std::fs::read(path).ok() == std::fs::read("/proc/self/exe").ok()
}

#[tokio::test]
async fn uploads_on_a_miss_and_reuses_the_cache_afterwards() {
    let root = tempfile::tempdir().expect("tempdir");
    let cache = root.path().join("cache");
    let tun = bootstrapped(&cache, root.path());
    let first = tun.call(pid, ()).await.expect("first connect uploads");
    let agent = cached_agent(&cache.join("chopsticks"));
    let metadata = std::fs::metadata(&agent).expect("the agent file is cached");
    assert_eq!(metadata.permissions().mode() & 0o777, 0o700);
    let dir_mode = std::fs::metadata(cache.join("chopsticks"))
        .expect("dir")
        .permissions()
        .mode();
    assert_eq!(dir_mode & 0o777, 0o700);
    assert!(same_as_this_program(&agent));
    let leftovers: Vec<_> = std::fs::read_dir(cache.join("chopsticks"))
        .expect("list")
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.file_name().to_string_lossy().starts_with(".agent"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "temporary files left behind: {leftovers:?}"
    );

    tun.close().await.expect("close");
    let second = tun
        .call(pid, ())
        .await
        .expect("second connect uses the cache");
    assert_ne!(first, second);
    let again = std::fs::metadata(&agent).expect("still cached");
    assert_eq!(
        (again.ino(), again.mtime_nsec()),
        (metadata.ino(), metadata.mtime_nsec()),
        "re-uploaded"
    );
}

#[tokio::test]
async fn a_corrupted_cache_entry_is_replaced_not_executed() {
    let root = tempfile::tempdir().expect("tempdir");
    let cache = root.path().join("cache");
    let dir = cache.join("chopsticks");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let agent = cached_agent(&dir);
    let size = chopsticks_core::__private::identity::agent_file()
        .expect("hash")
        .size as usize;
    // Same size, wrong content, executable: a script that would leave a trace if run.
    let trace = root.path().join("executed");
    let mut evil = format!("#!/bin/sh\ntouch '{}'\n", trace.display()).into_bytes();
    evil.resize(size, b'#');
    std::fs::write(&agent, &evil).expect("plant");
    std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o700)).expect("chmod");

    let tun = bootstrapped(&cache, root.path());
    tun.call(pid, ())
        .await
        .expect("connects after replacing the entry");
    assert!(!trace.exists(), "the corrupted cache entry was executed");
    assert!(same_as_this_program(&agent), "the entry was not replaced");
}

#[tokio::test]
async fn an_unsafe_cache_directory_is_not_used() {
    let root = tempfile::tempdir().expect("tempdir");
    let cache = root.path().join("cache");
    let shared = cache.join("chopsticks");
    std::fs::create_dir_all(&shared).expect("mkdir");
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let tmp = root.path().join("tmp");
    std::fs::create_dir(&tmp).expect("mkdir");

    let tun = bootstrapped(&cache, &tmp);
    tun.call(pid, ())
        .await
        .expect("falls back to a private directory");
    assert!(
        !cached_agent(&shared).exists(),
        "used a world-writable cache directory"
    );
    let fallback = tmp.join(format!("chopsticks-{}", uid()));
    assert!(same_as_this_program(&cached_agent(&fallback)));
    let mode = std::fs::metadata(&fallback)
        .expect("fallback")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
}

#[tokio::test]
async fn a_relative_cache_directory_is_not_used() {
    let root = tempfile::tempdir().expect("tempdir");
    let relative = PathBuf::from(format!("relative-cache-{}", std::process::id()));
    let tmp = root.path().join("tmp");
    std::fs::create_dir(&tmp).expect("mkdir");

    let tun = bootstrapped(&relative, &tmp);
    tun.call(pid, ())
        .await
        .expect("falls back to a private directory");
    let created = relative.exists();
    let _ = std::fs::remove_dir_all(&relative);
    assert!(!created, "created a cache under the working directory");
    let fallback = tmp.join(format!("chopsticks-{}", uid()));
    assert!(same_as_this_program(&cached_agent(&fallback)));
}

#[tokio::test]
async fn a_fallback_directory_with_a_loose_mode_is_refused() {
    let root = tempfile::tempdir().expect("tempdir");
    // XDG_CACHE_HOME is a file, so the usual cache directory cannot be made.
    let not_a_dir = root.path().join("file");
    std::fs::write(&not_a_dir, b"").expect("file");
    let fallback = root.path().join(format!("chopsticks-{}", uid()));
    std::fs::create_dir(&fallback).expect("mkdir");
    std::fs::set_permissions(&fallback, std::fs::Permissions::from_mode(0o755)).expect("chmod");

    let tun = bootstrapped(&not_a_dir, root.path());
    let error = tun.connect().await.expect_err("must refuse");
    assert!(matches!(error, Error::Bootstrap { .. }), "{error:?}");
    assert!(error.to_string().contains("mode 0700"), "{error}");
    assert!(error.to_string().contains("booted"), "{error}");
}

#[tokio::test]
async fn a_target_of_another_architecture_gets_a_clear_error() {
    let root = tempfile::tempdir().expect("tempdir");
    let bin = root.path().join("bin");
    std::fs::create_dir(&bin).expect("mkdir");
    let uname = bin.join("uname");
    std::fs::write(
        &uname,
        "#!/bin/sh\ncase $1 in -s) echo Linux;; -m) echo riscv64;; -sm) echo Linux riscv64;; esac\n",
    )
    .expect("write");
    std::fs::set_permissions(&uname, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let tun = Tunnel::builder(
        Local::named("riscv")
            .shell_bootstrap(true)
            .env("PATH", path),
    )
    .stderr(chopsticks::stderr::discard())
    .build();
    let error = tun.connect().await.expect_err("must refuse");
    let text = error.to_string();
    assert!(matches!(error, Error::Bootstrap { .. }), "{error:?}");
    assert!(
        text.contains("riscv64") && text.contains(std::env::consts::ARCH),
        "{text}"
    );
    assert!(text.contains("build the program"), "{text}");
}

/// Links each of `tools` (from /usr/bin or /bin) into `bin`.
fn link_tools(bin: &Path, tools: &[&str]) {
    for tool in tools {
        let real = ["/usr/bin", "/bin"]
            .iter()
            .map(|dir| Path::new(dir).join(tool))
            .find(|path| path.exists())
            .unwrap_or_else(|| panic!("{tool} is not installed"));
        std::os::unix::fs::symlink(real, bin.join(tool)).expect("symlink");
    }
}

/// A bootstrapped tunnel named `name` whose PATH holds only `tools` (links to
/// the real ones), with its cache under `root`.
fn with_only_tools(root: &Path, name: &str, tools: &[&str]) -> Tunnel {
    let bin = root.join("restricted-bin");
    std::fs::create_dir_all(&bin).expect("mkdir");
    link_tools(&bin, tools);
    Tunnel::builder(
        Local::named(name)
            .shell_bootstrap(true)
            .env("PATH", bin.display().to_string())
            .env("XDG_CACHE_HOME", root.join("cache").display().to_string()),
    )
    .stderr(chopsticks::stderr::discard())
    .build()
}

const BOOTSTRAP_TOOLS: [&str; 10] = [
    "sh", "uname", "ls", "head", "mktemp", "id", "mkdir", "rm", "chmod", "mv",
];

#[tokio::test]
async fn without_openssl_the_bootstrap_verifies_with_sha256sum() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut tools = BOOTSTRAP_TOOLS.to_vec();
    tools.push("sha256sum");
    let tun = with_only_tools(root.path(), "no-openssl", &tools);
    let first = tun
        .call(pid, ())
        .await
        .expect("upload, verified by sha256sum");
    tun.close().await.expect("close");
    let second = tun
        .call(pid, ())
        .await
        .expect("cached, verified by sha256sum");
    assert_ne!(first, second);

    // A corrupted entry is refused on this path too: replaced, never run.
    tun.close().await.expect("close");
    let agent = cached_agent(&root.path().join("cache/chopsticks"));
    let size = std::fs::metadata(&agent).expect("cached").len() as usize;
    let trace = root.path().join("executed");
    let mut evil = format!("#!/bin/sh\ntouch '{}'\n", trace.display()).into_bytes();
    evil.resize(size, b'#');
    std::fs::write(&agent, &evil).expect("corrupt");
    tun.call(pid, ())
        .await
        .expect("connects after replacing the entry");
    assert!(!trace.exists(), "the corrupted cache entry was executed");
    assert!(same_as_this_program(&agent), "the entry was not replaced");
}

#[tokio::test]
async fn without_any_sha256_tool_the_bootstrap_refuses() {
    let root = tempfile::tempdir().expect("tempdir");
    let tun = with_only_tools(root.path(), "no-digest", &BOOTSTRAP_TOOLS);
    let error = tun.connect().await.expect_err("nothing to verify with");
    assert!(matches!(error, Error::Bootstrap { .. }), "{error:?}");
    assert!(error.to_string().contains("sha256sum"), "{error}");
}

/// A target that asks for the agent again after receiving it: the
/// controller refuses at once instead of sending the program over and over.
#[tokio::test]
async fn the_agent_is_sent_at_most_once_per_connection() {
    let root = tempfile::tempdir().expect("tempdir");
    let size = chopsticks_core::__private::identity::agent_file()
        .expect("hash")
        .size;
    let received = root.path().join("received");
    let script = format!(
        "for i in 1 2 3; do echo chopsticks-bootstrap send; head -c {size} >> '{}'; done; \
         cat > /dev/null",
        received.display()
    );
    let tun = Tunnel::builder(crate::support::FakeTarget { script })
        .connect_timeout(std::time::Duration::from_secs(30))
        .stderr(chopsticks::stderr::discard())
        .build();
    let started = std::time::Instant::now();
    let error = tun.connect().await.expect_err("must refuse");
    assert!(matches!(error, Error::Bootstrap { .. }), "{error:?}");
    assert!(error.to_string().contains("second time"), "{error}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    let sent = std::fs::metadata(&received).expect("received").len();
    assert_eq!(sent, size, "the agent was sent more than once");
}

/// What a target writes into its error line reaches the user cut to a bounded length.
#[tokio::test]
async fn a_huge_bootstrap_error_line_is_bounded() {
    let script = format!(
        "echo \"chopsticks-bootstrap error BEGIN{}END\"; exit 111",
        "z".repeat(50_000)
    );
    let tun = Tunnel::builder(crate::support::FakeTarget { script })
        .stderr(chopsticks::stderr::discard())
        .build();
    let error = tun.connect().await.expect_err("must fail");
    let text = error.to_string();
    assert!(matches!(error, Error::Bootstrap { .. }), "{error:?}");
    assert!(text.len() < 6 * 1024, "{} bytes", text.len());
    assert!(
        text.contains("BEGIN") && text.contains("END"),
        "{text:.200}"
    );
}

/// An attacker who can rename paths in the cache swaps the entry for another
/// program between its check and its exec (here the digest tool itself does
/// it, right after hashing): what runs is still the file that was verified.
#[tokio::test]
async fn a_cache_entry_swapped_after_its_check_is_not_what_runs() {
    let root = tempfile::tempdir().expect("tempdir");
    let cache = root.path().join("cache");
    // Fill the cache with the genuine agent.
    let first = bootstrapped(&cache, root.path());
    first.connect().await.expect("upload");
    first.close().await.expect("close");

    let agent = cached_agent(&cache.join("chopsticks"));
    let trace = root.path().join("swapped-program-ran");
    let evil = root.path().join("evil");
    std::fs::write(&evil, format!("#!/bin/sh\ntouch '{}'\n", trace.display())).expect("evil");
    let bin = root.path().join("swapping-bin");
    std::fs::create_dir(&bin).expect("mkdir");
    link_tools(&bin, &BOOTSTRAP_TOOLS);
    let sha256sum = ["/usr/bin/sha256sum", "/bin/sha256sum"]
        .into_iter()
        .find(|path| Path::new(path).exists())
        .expect("sha256sum is installed");
    let swap = format!(
        "#!/bin/sh\n{sha256sum} \"$@\"\nstatus=$?\n\
         /bin/cp '{evil}' '{agent}.swap' && /bin/chmod 700 '{agent}.swap' && \
         /bin/mv -f '{agent}.swap' '{agent}'\nexit $status\n",
        evil = evil.display(),
        agent = agent.display()
    );
    let wrapper = bin.join("sha256sum");
    std::fs::write(&wrapper, swap).expect("wrapper");
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod");

    let tun = Tunnel::builder(
        Local::named("swapped")
            .shell_bootstrap(true)
            .env("PATH", bin.display().to_string())
            .env("XDG_CACHE_HOME", cache.display().to_string()),
    )
    .stderr(chopsticks::stderr::discard())
    .build();
    let agent_pid = tun.call(pid, ()).await.expect("the verified agent runs");
    assert!(
        !trace.exists(),
        "the program swapped in after the check ran"
    );
    assert!(
        !same_as_this_program(&agent),
        "the swap did not happen, so this test proved nothing"
    );
    let descriptors = tun
        .call(descriptors_on_own_executable, ())
        .await
        .expect("list descriptors");
    assert_eq!(
        descriptors,
        Vec::<String>::new(),
        "agent {agent_pid} kept the descriptor it was executed through"
    );
}

/// This process's descriptors that are open on its own executable.
fn descriptors_on_own_executable() -> Vec<String> {
    let exe = std::fs::metadata("/proc/self/exe").expect("exe");
    std::fs::read_dir("/proc/self/fd")
        .expect("fds")
        .filter_map(|entry| entry.ok())
        .filter(|entry| {
            std::fs::metadata(entry.path())
                .is_ok_and(|target| (target.dev(), target.ino()) == (exe.dev(), exe.ino()))
        })
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Without a usable HOME (empty, as under `env -i`, or a directory that does
/// not exist, as Debian's `nobody` has) the agent is cached in the private
/// temporary directory, and no path is created for the missing HOME.
#[tokio::test]
async fn a_missing_home_falls_back_to_the_temporary_directory_and_creates_nothing() {
    let root = tempfile::tempdir().expect("tempdir");
    let missing_home = root.path().join("nonexistent");
    for home in [String::new(), missing_home.display().to_string()] {
        let tun = Tunnel::builder(
            Local::named("homeless")
                .shell_bootstrap(true)
                .env("HOME", home.clone())
                .env("XDG_CACHE_HOME", "")
                .env("TMPDIR", root.path().display().to_string()),
        )
        .stderr(chopsticks::stderr::discard())
        .build();
        tun.call(pid, ())
            .await
            .unwrap_or_else(|error| panic!("HOME={home:?}: {error}"));
        tun.close().await.expect("close");
        assert!(
            !missing_home.exists(),
            "HOME={home:?}: the missing HOME was created"
        );
        let fallback = root.path().join(format!("chopsticks-{}", uid()));
        assert!(
            same_as_this_program(&cached_agent(&fallback)),
            "HOME={home:?}: the agent is not in {}",
            fallback.display()
        );
    }
}

/// Runs the bootstrap in a mount namespace whose `/dev` is an empty tmpfs:
/// a target without `/dev/null`, as a bare chroot or container can be.
struct WithoutDevNull;

#[chopsticks::async_trait]
impl chopsticks::Transport for WithoutDevNull {
    fn host(&self) -> &str {
        "no-dev-null"
    }

    fn launch(&self) -> chopsticks::AgentLaunch {
        chopsticks::AgentLaunch::ShellBootstrap
    }

    async fn spawn(
        &self,
        command: &chopsticks::AgentCommand,
    ) -> Result<chopsticks::Pipes, chopsticks::BoxError> {
        let mut process = tokio::process::Command::new("unshare");
        process
            .args(["--mount", "--", "sh", "-c"])
            .arg(r#"mount -t tmpfs none /dev && exec "$@""#)
            .arg("wrapper")
            .arg(command.program())
            .args(command.args())
            .envs(command.env_vars().iter().map(|(key, value)| (key, value)))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        Ok(chopsticks::Pipes::from_child(process.spawn()?)?)
    }
}

#[tokio::test]
async fn a_target_without_dev_null_is_told_so() {
    if chopsticks_testkit::require(
        if crate::support::is_root() {
            Ok(())
        } else {
            Err("a mount namespace needs root".to_string())
        },
        "the /dev/null test",
    )
    .is_none()
    {
        return;
    }
    let error = Tunnel::builder(WithoutDevNull)
        .stderr(chopsticks::stderr::discard())
        .build()
        .connect()
        .await
        .expect_err("no /dev/null");
    assert!(matches!(error, Error::Bootstrap { .. }), "{error:?}");
    assert!(error.to_string().contains("/dev/null"), "{error}");
    assert!(!error.to_string().contains("uname"), "{error}");
}

/// An upload leaves the three most recently uploaded agents in the cache
/// (one per build) and removes older ones, so rebuilds do not fill the disk.
#[tokio::test]
async fn an_upload_keeps_the_three_newest_agents_and_removes_older_ones() {
    let root = tempfile::tempdir().expect("tempdir");
    let cache = root.path().join("cache");
    let dir = cache.join("chopsticks");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    // Five agents of earlier builds, uploaded one day apart.
    let now = std::time::SystemTime::now();
    let day = std::time::Duration::from_secs(24 * 3600);
    for age in 1..=5u32 {
        let path = dir.join(format!("agent-{age:064x}"));
        let file = std::fs::File::create(&path).expect("plant");
        file.set_modified(now - day * age).expect("age");
    }
    let tun = bootstrapped(&cache, root.path());
    tun.call(pid, ()).await.expect("uploads this build");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("list")
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut expected = vec![
        cached_agent(&dir)
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned(),
        format!("agent-{:064x}", 1),
        format!("agent-{:064x}", 2),
    ];
    expected.sort();
    assert_eq!(names, expected);
}
