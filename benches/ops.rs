//! The operator kit beside its floors, side by side in one run:
//!
//! - `run/true`: `tun.run(Cmd::new("true"))` on a connected tunnel, beside
//!   spawning `true` with `std::process::Command` here; with `--features
//!   ssh`, over the test kit's sshd beside `ssh HOST true` on a
//!   ControlMaster connection;
//! - `output/cat_1g_lines`: `cat` of a 1 GiB text file (80-byte lines)
//!   through `run` with a line callback, beside reading the same `cat`
//!   through a pipe here;
//! - `facts`: `tun.facts()` beside a trivial call;
//! - `dirs`: a first `put_dir` of 10,000 files of 4 KiB into an empty
//!   directory (without flushing, as `tar x` does not), beside `tar c | tar
//!   x` (over ssh: `tar c | ssh HOST tar x`), and the unchanged re-sync.
//!
//! ```text
//! taskset -c 0 cargo bench --features ops --bench ops -- --warm-up-time 1 --measurement-time 5
//! cargo bench --features ops,ssh --bench ops -- ssh/
//! ```

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use std::future::IntoFuture;

use chopsticks::ops::{Cmd, TunnelOps};
use chopsticks::{Local, Tunnel};
use criterion::{BatchSize, Criterion, Throughput};

const TEXT_LEN: u64 = 1 << 30;

fn noop() {}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn quiet(transport: impl chopsticks::Transport) -> Tunnel {
    Tunnel::builder(transport)
        .stderr(chopsticks::stderr::discard())
        .build()
}

/// A file of 80-byte lines.
fn text_file(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("text");
    let mut file = std::io::BufWriter::new(std::fs::File::create(&path).expect("create"));
    let line = [b"0123456789abcdef".repeat(5)[..79].to_vec(), b"\n".to_vec()].concat();
    for _ in 0..TEXT_LEN / line.len() as u64 {
        file.write_all(&line).expect("write");
    }
    file.flush().expect("flush");
    path
}

fn local(c: &mut Criterion, rt: &tokio::runtime::Runtime) {
    let tun = quiet(Local::named("ops-bench"));
    rt.block_on(tun.connect()).expect("connect");
    let mut group = c.benchmark_group("local/run");
    group.bench_function("true", |b| {
        b.iter(|| rt.block_on(tun.run(Cmd::new("true"))).expect("run"))
    });
    group.bench_function("std_command_true", |b| {
        b.iter(|| Command::new("true").status().expect("true"))
    });
    group.finish();

    let dir = tempfile::tempdir().expect("tempdir");
    let text = text_file(dir.path());
    let text_arg = text.display().to_string();
    let mut group = c.benchmark_group("local/output");
    group
        .throughput(Throughput::Bytes(TEXT_LEN))
        .sample_size(10);
    group.bench_function("cat_1g_lines", |b| {
        b.iter(|| {
            let bytes = Arc::new(AtomicU64::new(0));
            let counted = bytes.clone();
            let cmd = Cmd::new("cat").arg(&text_arg).on_line(move |line| {
                counted.fetch_add(line.text.len() as u64 + 1, Ordering::Relaxed);
            });
            rt.block_on(tun.run(cmd)).expect("cat");
            assert_eq!(bytes.load(Ordering::Relaxed), TEXT_LEN / 80 * 80);
        })
    });
    group.bench_function("pipe_cat_1g", |b| {
        b.iter(|| {
            let mut child = Command::new("cat")
                .arg(&text)
                .stdout(Stdio::piped())
                .spawn()
                .expect("cat");
            let mut stdout = child.stdout.take().expect("stdout");
            let mut buffer = vec![0u8; 64 << 10];
            let mut total = 0u64;
            loop {
                let count = stdout.read(&mut buffer).expect("read");
                if count == 0 {
                    break;
                }
                total += count as u64;
            }
            child.wait().expect("wait");
            assert_eq!(total, TEXT_LEN / 80 * 80);
        })
    });
    group.finish();

    let mut group = c.benchmark_group("local/facts");
    group.bench_function("facts", |b| {
        b.iter(|| rt.block_on(tun.facts()).expect("facts"))
    });
    group.bench_function("trivial_call", |b| {
        b.iter(|| rt.block_on(tun.call(noop, ())).expect("call"))
    });
    group.finish();
}

#[cfg(feature = "ssh")]
fn over_ssh(c: &mut Criterion, rt: &tokio::runtime::Runtime) {
    let sshd = chopsticks_testkit::Sshd::start("bench-ops", 1)
        .expect("an sshd (scripts/test.sh installs openssh-server)");
    let tun = quiet(chopsticks::Ssh::new(sshd.alias(0)).config_file(sshd.client_config()));
    rt.block_on(tun.connect()).expect("connect");
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("master");
    let ssh = |extra: &[&str]| {
        let mut command = Command::new("ssh");
        command
            .arg("-F")
            .arg(sshd.client_config())
            .arg("-S")
            .arg(&socket)
            .args(extra)
            .arg(sshd.alias(0));
        command
    };
    let master = ssh(&["-M", "-f", "-N"]).status().expect("master");
    assert!(master.success());
    let mut group = c.benchmark_group("ssh/run");
    group.bench_function("true", |b| {
        b.iter(|| rt.block_on(tun.run(Cmd::new("true"))).expect("run"))
    });
    group.bench_function("ssh_controlmaster_true", |b| {
        b.iter(|| {
            let status = ssh(&[]).arg("true").status().expect("ssh");
            assert!(status.success());
        })
    });
    group.finish();
    let mut group = c.benchmark_group("ssh/facts");
    group.bench_function("facts", |b| {
        b.iter(|| rt.block_on(tun.facts()).expect("facts"))
    });
    group.bench_function("trivial_call", |b| {
        b.iter(|| rt.block_on(tun.call(noop, ())).expect("call"))
    });
    group.finish();
    let config = sshd.client_config().display().to_string();
    let alias = sshd.alias(0).to_string();
    let untar = |target: &str| {
        format!(
            "ssh -F {} -S {} {} {}",
            chopsticks::shell_quote(&config),
            chopsticks::shell_quote(&socket.display().to_string()),
            chopsticks::shell_quote(&alias),
            chopsticks::shell_quote(&format!("mkdir -p {0} && tar x -C {0}", target))
        )
    };
    let remove = |target: &str| {
        let _ = std::fs::remove_dir_all(target);
    };
    dirs(c, rt, "ssh", &tun, &untar, &remove);
    let _ = ssh(&["-O", "exit"]).stderr(Stdio::null()).status();
}

/// 10,000 files of 4 KiB in 100 directories.
fn small_tree(root: &std::path::Path) {
    for index in 0..10_000 {
        let dir = root.join(format!("d{}", index % 100));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(
            dir.join(format!("f{index}")),
            vec![(index % 251) as u8; 4096],
        )
        .expect("write");
    }
}

fn tar_pipe(source: &std::path::Path, into: &str) -> Command {
    let mut command = Command::new("sh");
    command.arg("-c").arg(format!(
        "tar c -C {} . | {into}",
        chopsticks::shell_quote(&source.display().to_string())
    ));
    command
}

fn dirs(
    c: &mut Criterion,
    rt: &tokio::runtime::Runtime,
    name: &str,
    tun: &Tunnel,
    remote_tar: &dyn Fn(&str) -> String,
    remote_rm: &dyn Fn(&str),
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = dir.path().join("source");
    small_tree(&source);
    let target = format!("/tmp/chopsticks-bench-dirs-{}", std::process::id());
    let mut group = c.benchmark_group(format!("{name}/dirs"));
    group.sample_size(10);
    group.bench_function("put_dir_10k_first", |b| {
        b.iter_batched(
            || remote_rm(&target),
            |()| {
                let summary = rt
                    .block_on(tun.put_dir(&source, &target).sync(false).into_future())
                    .expect("put_dir");
                assert_eq!(summary.files_sent, 10_000);
            },
            BatchSize::PerIteration,
        )
    });
    group.bench_function("tar_pipe_10k", |b| {
        b.iter_batched(
            || remote_rm(&target),
            |()| {
                let status = tar_pipe(&source, &remote_tar(&target))
                    .status()
                    .expect("tar");
                assert!(status.success());
            },
            BatchSize::PerIteration,
        )
    });
    remote_rm(&target);
    rt.block_on(tun.put_dir(&source, &target).sync(false).into_future())
        .expect("fill");
    group.bench_function("put_dir_10k_unchanged", |b| {
        b.iter(|| {
            let summary = rt
                .block_on(tun.put_dir(&source, &target).into_future())
                .expect("resync");
            assert_eq!(summary.files_sent, 0);
        })
    });
    group.finish();
    remote_rm(&target);
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    let rt = runtime();
    local(&mut criterion, &rt);
    {
        let tun = quiet(Local::named("ops-dirs"));
        let untar = |target: &str| {
            format!(
                "{{ mkdir -p {0} && tar x -C {0}; }}",
                chopsticks::shell_quote(target)
            )
        };
        let remove = |target: &str| {
            let _ = std::fs::remove_dir_all(target);
        };
        dirs(&mut criterion, &rt, "local", &tun, &untar, &remove);
    }
    #[cfg(feature = "ssh")]
    over_ssh(&mut criterion, &rt);
    criterion.final_summary();
}
