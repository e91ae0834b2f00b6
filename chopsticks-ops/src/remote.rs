//! The agent's side of a command: [`Running`], an iterator of [`Event`]s
//! that a streaming call carries back.
//!
//! The command runs in a process group of its own. One `poll` loop reads
//! both outputs, so pieces come in the order the agent sees them, and the
//! iterator blocks only in that loop: a slow consumer holds it back, which
//! holds the command back once its pipes fill. A quiet tick every
//! [`TICK`] lets a dropped stream stop the iterator, and the iterator's
//! drop kills the group. On a timeout the group is killed, and the pipes
//! are read for [`DRAIN`] more at most (a process that left the group may
//! hold them).

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, ChildStderr, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use chopsticks_core::ByteReceiver;
use serde::{Deserialize, Serialize};

use crate::cmd::CmdSpec;
use crate::output::{Capture, Captured, ExitStatus, OutputKind};

/// How long the iterator waits in silence before a tick.
const TICK: Duration = Duration::from_millis(250);
/// How long the pipes are read after a timeout's kill.
const DRAIN: Duration = Duration::from_secs(1);
/// How long the stdin writer is waited for once the command is gone.
const STDIN_WAIT: Duration = Duration::from_secs(1);
/// One read from a pipe.
const READ_SIZE: usize = 64 * 1024;

/// What crosses from the agent while a command runs.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Event {
    /// Nothing happened for a while.
    Tick,
    /// A piece of output, as read (live output only).
    Data {
        kind: OutputKind,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// An output's bounded capture, at the end (quiet runs only).
    Captured {
        kind: OutputKind,
        captured: Captured,
    },
    /// The command could not start.
    Refused { why: Refusal, message: String },
    /// The command ended.
    Exited {
        status: ExitStatus,
        timed_out: bool,
        /// Bytes of stdin it left unread.
        stdin_unread: u64,
    },
}

/// Why a command could not start.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) enum Refusal {
    NotFound,
    BadDirectory,
    NoSuchUser,
    Other,
}

/// Runs `spec` with its stdin from the arguments (or empty).
pub(crate) fn run_command(mut spec: CmdSpec) -> Running {
    let stdin = std::mem::take(&mut spec.stdin);
    Running::start(spec, StdinSource::Bytes(stdin))
}

/// Runs `spec` with its stdin fed from the controller while it runs.
pub(crate) fn run_command_fed(input: ByteReceiver, spec: CmdSpec) -> Running {
    Running::start(spec, StdinSource::Stream(input))
}

enum StdinSource {
    Bytes(Vec<u8>),
    Stream(ByteReceiver),
}

/// A running command, as an iterator of events.
pub(crate) struct Running {
    queue: VecDeque<Event>,
    state: State,
    /// When the last event left.
    last_event: Instant,
}

enum State {
    Running(Box<Started>),
    Done,
}

/// The parts of a started command.
struct Started {
    child: Child,
    outputs: [Option<Pipe>; 2],
    live: bool,
    captures: [Capture; 2],
    deadline: Option<Instant>,
    /// When the group was killed for running past its deadline.
    killed_at: Option<Instant>,
    stdin: Option<mpsc::Receiver<u64>>,
    reaped: bool,
    /// Readable once the command has exited, where the kernel has pidfds.
    pidfd: Option<std::os::fd::OwnedFd>,
    /// When the command was seen to exit while its pipes were still open.
    exited_at: Option<Instant>,
    /// Where pipes are read into, reused.
    buffer: Vec<u8>,
}

/// A descriptor that becomes readable when process `pid` exits.
fn pidfd_open(pid: u32) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor
    // or -1; it touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_long, 0) };
    let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    Some(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

enum Pipe {
    Stdout(ChildStdout),
    Stderr(ChildStderr),
}

impl Pipe {
    fn fd(&self) -> i32 {
        match self {
            Pipe::Stdout(pipe) => pipe.as_raw_fd(),
            Pipe::Stderr(pipe) => pipe.as_raw_fd(),
        }
    }

    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Pipe::Stdout(pipe) => pipe.read(buffer),
            Pipe::Stderr(pipe) => pipe.read(buffer),
        }
    }
}

impl Running {
    fn refused(why: Refusal, message: String) -> Running {
        Running {
            queue: VecDeque::from([Event::Refused { why, message }]),
            state: State::Done,
            last_event: Instant::now(),
        }
    }

    fn start(spec: CmdSpec, stdin: StdinSource) -> Running {
        if let Some(dir) = &spec.current_dir {
            match std::fs::metadata(dir) {
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => return Running::refused(Refusal::BadDirectory, "not a directory".into()),
                Err(error) => return Running::refused(Refusal::BadDirectory, error.to_string()),
            }
        }
        let mut command = Command::new(&spec.program);
        command.args(&spec.args);
        if spec.env_clear {
            command.env_clear();
        }
        if let Some(user) = &spec.user {
            let account = match crate::account::lookup(user) {
                Ok(account) => account,
                Err(message) => return Running::refused(Refusal::NoSuchUser, message),
            };
            command
                .env("HOME", &account.home)
                .env("USER", user)
                .env("LOGNAME", user);
            let (uid, gid, groups) = (account.uid, account.gid, account.groups);
            // SAFETY: the closure makes only async-signal-safe system calls
            // (setgroups, setgid, setuid) on data prepared before the fork.
            unsafe {
                command.pre_exec(move || crate::account::switch(uid, gid, &groups));
            }
        }
        command.envs(spec.env.iter().map(|(key, value)| (key, value)));
        if let Some(dir) = &spec.current_dir {
            command.current_dir(dir);
        }
        command
            .stdin(if spec.stdin_fed {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(error) => {
                let why = match error.kind() {
                    std::io::ErrorKind::NotFound => Refusal::NotFound,
                    _ => Refusal::Other,
                };
                return Running::refused(why, error.to_string());
            }
        };
        let stdin_done = child.stdin.take().map(|pipe| feed_stdin(pipe, stdin));
        let pid = child.id();
        let outputs = [
            child.stdout.take().map(Pipe::Stdout),
            child.stderr.take().map(Pipe::Stderr),
        ];
        let limit = usize::try_from(spec.capture_limit).unwrap_or(usize::MAX);
        Running {
            queue: VecDeque::new(),
            last_event: Instant::now(),
            state: State::Running(Box::new(Started {
                child,
                outputs,
                live: spec.live,
                captures: [Capture::new(limit), Capture::new(limit)],
                deadline: spec
                    .timeout_ms
                    .and_then(|ms| Instant::now().checked_add(Duration::from_millis(ms))),
                killed_at: None,
                stdin: stdin_done,
                reaped: false,
                pidfd: pidfd_open(pid),
                exited_at: None,
                buffer: vec![0u8; READ_SIZE],
            })),
        }
    }
}

/// Writes the command's stdin on a thread of its own; sends how many bytes
/// were left unwritten when the command stopped reading.
fn feed_stdin(mut pipe: std::process::ChildStdin, source: StdinSource) -> mpsc::Receiver<u64> {
    let (done, result) = mpsc::channel();
    std::thread::spawn(move || {
        let unread = match source {
            StdinSource::Bytes(bytes) => {
                let mut written = 0;
                while written < bytes.len() {
                    match pipe.write(&bytes[written..]) {
                        Ok(0) | Err(_) => break,
                        Ok(count) => written += count,
                    }
                }
                (bytes.len() - written) as u64
            }
            StdinSource::Stream(input) => {
                let mut unread = 0;
                for piece in input {
                    if pipe.write_all(&piece).is_err() {
                        // At least this piece; the rest is not read to count it.
                        unread = piece.len().max(1) as u64;
                        break;
                    }
                }
                unread
            }
        };
        drop(pipe);
        let _ = done.send(unread);
    });
    result
}

impl Iterator for Running {
    type Item = Event;

    fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.queue.pop_front() {
                self.last_event = Instant::now();
                return Some(event);
            }
            if self.last_event.elapsed() >= TICK {
                // Even while a quiet run only captures: a dropped stream is
                // seen at the next item, and this is one.
                self.last_event = Instant::now();
                return Some(Event::Tick);
            }
            let State::Running(command) = &mut self.state else {
                return None;
            };
            if let Some(exited) = command.step(&mut self.queue) {
                self.queue.extend(exited);
                self.state = State::Done;
            }
        }
    }
}

impl Started {
    /// One round: reads what is ready, or ticks; returns the last events
    /// once the command is over.
    fn step(&mut self, queue: &mut VecDeque<Event>) -> Option<Vec<Event>> {
        self.enforce_deadline();
        if self.outputs.iter().any(Option::is_some) {
            self.read_ready(queue);
            return None;
        }
        match self.child.try_wait() {
            Ok(Some(status)) => {
                self.reaped = true;
                Some(self.finish(status))
            }
            Ok(None) => {
                // Its outputs are closed and it runs on (or is just ending):
                // wait for its exit, a tick at most.
                self.wait_for_exit(self.until_deadline());
                if let Ok(Some(status)) = self.child.try_wait() {
                    self.reaped = true;
                    return Some(self.finish(status));
                }
                queue.push_back(Event::Tick);
                None
            }
            Err(error) => {
                self.kill();
                Some(vec![Event::Refused {
                    why: Refusal::Other,
                    message: format!("waiting for the command failed: {error}"),
                }])
            }
        }
    }

    /// Returns once the command has exited, or after `bound`: in `poll` on
    /// its pidfd, or (on a kernel without pidfds) looking again and again.
    fn wait_for_exit(&mut self, bound: Duration) {
        if self.pidfd.is_none() {
            self.pidfd = pidfd_open(self.child.id());
        }
        if let Some(pidfd) = &self.pidfd {
            let mut polled = libc::pollfd {
                fd: pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let wait = i32::try_from(bound.as_millis()).unwrap_or(i32::MAX);
            // SAFETY: `polled` is one valid pollfd.
            unsafe { libc::poll(&mut polled, 1, wait) };
            return;
        }
        let until = Instant::now() + bound;
        let mut pause = Duration::from_micros(100);
        while Instant::now() < until {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(pause.min(until.saturating_duration_since(Instant::now())));
            pause = (pause * 2).min(Duration::from_millis(10));
        }
    }

    fn until_deadline(&self) -> Duration {
        match (self.deadline, self.killed_at) {
            (Some(deadline), None) => deadline.saturating_duration_since(Instant::now()).min(TICK),
            _ => TICK,
        }
    }

    /// Notes the command's exit while its pipes are still open (a process
    /// it left behind holds them): they are read for [`DRAIN`] more at most.
    fn notice_exit(&mut self) {
        let exited = self.exited_at.is_none()
            && match &self.pidfd {
                Some(pidfd) => {
                    let mut polled = libc::pollfd {
                        fd: pidfd.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: `polled` is one valid pollfd; a zero timeout.
                    unsafe { libc::poll(&mut polled, 1, 0) > 0 }
                }
                None => matches!(self.child.try_wait(), Ok(Some(_))),
            };
        if exited {
            self.exited_at = Some(Instant::now());
        }
        if let Some(exited) = self.exited_at
            && exited.elapsed() >= DRAIN
        {
            self.outputs = [None, None];
        }
    }

    fn enforce_deadline(&mut self) {
        if let (Some(deadline), None) = (self.deadline, self.killed_at)
            && Instant::now() >= deadline
        {
            self.kill();
            self.killed_at = Some(Instant::now());
        }
        if let Some(killed) = self.killed_at
            && killed.elapsed() >= DRAIN
        {
            // Whatever still holds the pipes left the group: stop reading.
            self.outputs = [None, None];
        }
    }

    fn read_ready(&mut self, queue: &mut VecDeque<Event>) {
        self.notice_exit();
        let mut fds: Vec<libc::pollfd> = self
            .outputs
            .iter()
            .flatten()
            .map(|output| libc::pollfd {
                fd: output.fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        if fds.is_empty() {
            return;
        }
        // The exit wakes the wait too, until it has been seen.
        if self.exited_at.is_none()
            && let Some(pidfd) = &self.pidfd
        {
            fds.push(libc::pollfd {
                fd: pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let wait = i32::try_from(self.until_deadline().as_millis()).unwrap_or(i32::MAX);
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structures.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait) };
        if ready <= 0 {
            // A timeout, or a signal: nothing to read yet.
            queue.push_back(Event::Tick);
            return;
        }
        let buffer = &mut self.buffer;
        for polled in fds.iter().filter(|polled| polled.revents != 0) {
            let Some(index) = self
                .outputs
                .iter()
                .position(|output| output.as_ref().is_some_and(|o| o.fd() == polled.fd))
            else {
                continue;
            };
            let Some(output) = self.outputs[index].as_mut() else {
                continue;
            };
            let kind = if index == 0 {
                OutputKind::Stdout
            } else {
                OutputKind::Stderr
            };
            match output.read(buffer) {
                Ok(0) => self.outputs[index] = None,
                Ok(count) if self.live => queue.push_back(Event::Data {
                    kind,
                    bytes: buffer[..count].to_vec(),
                }),
                Ok(count) => self.captures[index].push(&buffer[..count]),
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => self.outputs[index] = None,
            }
        }
    }

    fn finish(&mut self, status: std::process::ExitStatus) -> Vec<Event> {
        let mut events = Vec::new();
        if !self.live {
            for (index, kind) in [OutputKind::Stdout, OutputKind::Stderr]
                .into_iter()
                .enumerate()
            {
                let capture = std::mem::replace(&mut self.captures[index], Capture::new(0));
                events.push(Event::Captured {
                    kind,
                    captured: capture.into_parts(),
                });
            }
        }
        let stdin_unread = self
            .stdin
            .take()
            .and_then(|done| done.recv_timeout(STDIN_WAIT).ok())
            .unwrap_or(0);
        events.push(Event::Exited {
            status: ExitStatus {
                code: status.code(),
                signal: status.signal(),
            },
            timed_out: self.killed_at.is_some(),
            stdin_unread,
        });
        events
    }

    /// Kills the command's whole process group.
    fn kill(&self) {
        if let Ok(group) = i32::try_from(self.child.id()) {
            // SAFETY: kill has no memory-safety preconditions; a negative
            // pid names the process group the command leads.
            unsafe { libc::kill(-group, libc::SIGKILL) };
        }
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        if !self.reaped {
            // A dropped stream (or a failure) leaves nothing running.
            self.kill();
            let _ = self.child.wait();
        }
    }
}
