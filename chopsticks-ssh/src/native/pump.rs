//! The pump thread: owns the libssh2 session once connected and moves bytes
//! between the channel and the pipes that are the tunnel's stdin, stdout and
//! stderr, waiting in `poll(2)` on the socket, the pipes and a kill pipe.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use chopsticks_core::ExitReport;
use ssh2::{BlockDirections, Session};

/// Both ends of the four pipes between the tunnel and the pump.
pub(super) struct PumpEnds {
    pub(super) stdin_read: OwnedFd,
    pub(super) stdin_write: OwnedFd,
    pub(super) stdout_read: OwnedFd,
    pub(super) stdout_write: OwnedFd,
    pub(super) stderr_read: OwnedFd,
    pub(super) stderr_write: OwnedFd,
    pub(super) kill_read: OwnedFd,
    pub(super) kill_write: OwnedFd,
    /// The enlarged pipes' shares of the controller's pipe budget.
    pub(super) shares: Vec<crate::pipes::Share>,
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

impl PumpEnds {
    pub(super) fn new() -> io::Result<PumpEnds> {
        let (stdin_read, stdin_write) = pipe()?;
        let (stdout_read, stdout_write) = pipe()?;
        let (stderr_read, stderr_write) = pipe()?;
        let (kill_read, kill_write) = pipe()?;
        // Larger pipes, within the budget every tunnel of this controller shares.
        let shares = [&stdin_read, &stdout_write]
            .into_iter()
            .filter_map(crate::pipes::enlarge)
            .collect();
        Ok(PumpEnds {
            stdin_read,
            stdin_write,
            stdout_read,
            stdout_write,
            stderr_read,
            stderr_write,
            kill_read,
            kill_write,
            shares,
        })
    }
}

/// Bytes read but not yet written on.
struct Pending {
    buffer: Vec<u8>,
    start: usize,
    end: usize,
}

impl Pending {
    fn new() -> Pending {
        Pending {
            buffer: vec![0; 256 * 1024],
            start: 0,
            end: 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    fn data(&self) -> &[u8] {
        &self.buffer[self.start..self.end]
    }

    fn consumed(&mut self, count: usize) {
        self.start += count;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Fills the empty buffer from `source`; `Ok(0)` is the end of input.
    fn fill(&mut self, source: &mut impl Read) -> io::Result<usize> {
        let read = source.read(&mut self.buffer)?;
        self.start = 0;
        self.end = read;
        Ok(read)
    }
}

/// Owns the session and moves bytes until the remote command ends.
pub(super) struct Pump {
    pub(super) session: Session,
    pub(super) channel: ssh2::Channel,
    pub(super) stdin: OwnedFd,
    pub(super) stdout: OwnedFd,
    pub(super) stderr: OwnedFd,
    pub(super) kill: OwnedFd,
    /// Held while the pump owns the enlarged pipe ends.
    pub(super) _pipe_shares: Vec<crate::pipes::Share>,
}

fn would_block(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::WouldBlock
}

fn raw_read(fd: &OwnedFd, buffer: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buffer` is writable for its length.
    let read = unsafe { libc::read(fd.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len()) };
    if read < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(read as usize)
    }
}

fn raw_write(fd: &OwnedFd, bytes: &[u8]) -> io::Result<usize> {
    // SAFETY: `bytes` is readable for its length.
    let written = unsafe { libc::write(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
    if written < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(written as usize)
    }
}

struct FdReader<'a>(&'a OwnedFd);

impl Read for FdReader<'_> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        raw_read(self.0, buffer)
    }
}

impl Pump {
    /// Moves bytes until the channel ends; returns how the remote command
    /// ended, or, when the connection broke first, an error saying so (no
    /// exit status ever came, and none is made up).
    pub(super) fn run(mut self) -> io::Result<ExitReport> {
        self.session.set_blocking(false);
        self.session.set_keepalive(false, 15);
        let (mut input, mut output, mut errors) = (Pending::new(), Pending::new(), Pending::new());
        let (mut input_done, mut eof_sent, mut output_done, mut errors_done) =
            (false, false, false, false);
        let mut stdout = Some(&self.stdout);
        let mut stderr = Some(&self.stderr);
        let mut rechecks = 0;
        let mut broken: Option<String> = None;
        loop {
            let mut progress = false;
            // Controller → channel.
            if input.is_empty() && !input_done {
                match input.fill(&mut FdReader(&self.stdin)) {
                    Ok(0) => input_done = true,
                    Ok(_) => progress = true,
                    Err(error) if would_block(&error) => {}
                    Err(_) => input_done = true,
                }
            }
            if !input.is_empty() {
                match self.channel.write(input.data()) {
                    Ok(written) => {
                        input.consumed(written);
                        progress |= written > 0;
                    }
                    Err(error) if would_block(&error) => {}
                    Err(error) => {
                        broken = Some(format!("writing to it failed: {error}"));
                        break;
                    }
                }
            }
            if input_done && input.is_empty() && !eof_sent {
                match self.channel.send_eof() {
                    Ok(()) => eof_sent = true,
                    Err(error) if error.code() == ssh2::ErrorCode::Session(-37) => {}
                    Err(_) => eof_sent = true,
                }
            }
            // Channel → controller, stdout and stderr.
            for (pending, done, sink, stream) in [
                (&mut output, &mut output_done, &mut stdout, 0),
                (&mut errors, &mut errors_done, &mut stderr, 1),
            ] {
                if pending.is_empty() && !*done {
                    let read = if stream == 0 {
                        pending.fill(&mut self.channel)
                    } else {
                        pending.fill(&mut self.channel.stderr())
                    };
                    match read {
                        Ok(0) => {
                            *done = self.channel.eof();
                        }
                        Ok(_) => progress = true,
                        Err(error) if would_block(&error) => {}
                        Err(error) => {
                            broken
                                .get_or_insert_with(|| format!("reading from it failed: {error}"));
                            *done = true;
                        }
                    }
                }
                if !pending.is_empty() {
                    match sink.map(|fd| raw_write(fd, pending.data())) {
                        Some(Ok(written)) => {
                            pending.consumed(written);
                            progress |= written > 0;
                        }
                        Some(Err(error)) if would_block(&error) => {}
                        // Nobody reads any more: drop what comes.
                        _ => pending.consumed(pending.data().len()),
                    }
                }
                if *done && pending.is_empty() {
                    *sink = None;
                }
            }
            if output_done && errors_done && output.is_empty() && errors.is_empty() {
                break;
            }
            if progress {
                rechecks = 0;
                continue;
            }
            // libssh2 reads every packet the socket holds on any call: a
            // stderr read or a write can take in stdout data, or the window
            // a blocked write waits for, after this pass looked for it. Then
            // the socket stays quiet and poll would sleep on work already
            // here, so look again first (a few times at most: data of a
            // kind no read takes must not make this spin).
            if rechecks < 3 && self.holds_work(&input, &output, &errors) {
                rechecks += 1;
                continue;
            }
            rechecks = 0;
            if !self.wait(&input, input_done, &output, &errors) {
                break;
            }
        }
        let report = self.finish();
        match broken {
            Some(what) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!("the ssh connection broke ({what}) and no exit status came"),
            )),
            None => Ok(report),
        }
    }

    /// Whether libssh2 already holds what another pass could move: channel
    /// data read off the socket, or window for input waiting to be written.
    fn holds_work(&self, input: &Pending, output: &Pending, errors: &Pending) -> bool {
        let readable =
            output.is_empty() && errors.is_empty() && self.channel.read_window().available > 0;
        let writable = !input.is_empty() && self.channel.write_window().remaining > 0;
        readable || writable
    }

    /// Waits in poll(2) until the socket or a pipe can move data; false when killed.
    fn wait(&self, input: &Pending, input_done: bool, output: &Pending, errors: &Pending) -> bool {
        let socket = self.session_fd();
        let mut socket_events = libc::POLLIN;
        if matches!(
            self.session.block_directions(),
            BlockDirections::Outbound | BlockDirections::Both
        ) {
            socket_events |= libc::POLLOUT;
        }
        let mut fds = [
            libc::pollfd {
                fd: socket,
                events: socket_events,
                revents: 0,
            },
            libc::pollfd {
                fd: self.kill.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: if input.is_empty() && !input_done {
                    self.stdin.as_raw_fd()
                } else {
                    -1
                },
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: if output.is_empty() {
                    -1
                } else {
                    self.stdout.as_raw_fd()
                },
                events: libc::POLLOUT,
                revents: 0,
            },
            libc::pollfd {
                fd: if errors.is_empty() {
                    -1
                } else {
                    self.stderr.as_raw_fd()
                },
                events: libc::POLLOUT,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is an array of pollfd of the length given.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 15_000) };
        if ready == 0 {
            let _ = self.session.keepalive_send();
        }
        fds[1].revents == 0
    }

    fn session_fd(&self) -> i32 {
        self.session.as_raw_fd()
    }

    fn finish(mut self) -> ExitReport {
        self.session.set_blocking(true);
        self.session.set_timeout(2000);
        let _ = self.channel.close();
        let _ = self.channel.wait_close();
        let code = self.channel.exit_status().ok();
        let signal = self
            .channel
            .exit_signal()
            .ok()
            .and_then(|signal| signal.exit_signal)
            .and_then(|name| signal_number(&name));
        let _ = self
            .session
            .disconnect(None, "chopsticks tunnel closed", None);
        match (code, signal) {
            (_, Some(signal)) => ExitReport {
                code: None,
                signal: Some(signal),
            },
            (code, None) => ExitReport { code, signal: None },
        }
    }
}

fn signal_number(name: &str) -> Option<i32> {
    Some(match name.trim_start_matches("SIG") {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "ABRT" => libc::SIGABRT,
        "KILL" => libc::SIGKILL,
        "SEGV" => libc::SIGSEGV,
        "PIPE" => libc::SIGPIPE,
        "TERM" => libc::SIGTERM,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipes::{BUDGET_BYTES, BUDGET_TESTS, PIPE_BYTES, enlarged_bytes};

    fn pipe_size(fd: &OwnedFd) -> usize {
        // SAFETY: F_GETPIPE_SZ on an open pipe has no memory-safety preconditions.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETPIPE_SZ) as usize }
    }

    #[test]
    fn pump_pipes_are_enlarged_within_the_shared_budget() {
        let _serial = BUDGET_TESTS.lock();
        let tunnels: Vec<PumpEnds> = (0..BUDGET_BYTES / PIPE_BYTES)
            .map(|_| PumpEnds::new().expect("pipes"))
            .collect();
        let enlarged = tunnels
            .iter()
            .flat_map(|ends| [&ends.stdin_read, &ends.stdout_write])
            .filter(|fd| pipe_size(fd) >= PIPE_BYTES)
            .count();
        let shares: usize = tunnels.iter().map(|ends| ends.shares.len()).sum();
        assert!(shares > 0, "the first tunnels get larger pipes");
        assert_eq!(enlarged, shares, "only pipes holding a share are enlarged");
        assert!(
            enlarged * PIPE_BYTES <= BUDGET_BYTES,
            "{enlarged} pipes enlarged"
        );
        drop(tunnels);
        assert_eq!(enlarged_bytes(), 0, "the budget is given back");
    }
}
