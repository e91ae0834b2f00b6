//! Descriptor hygiene: the protocol moves to private descriptors before anything else runs.
//!
//! Afterwards fd 0 is `/dev/null`, fd 1 is a copy of stderr and the
//! descriptor the shell bootstrap executed the agent through is closed, so
//! `println!`, `libc::write(1, ..)` and child processes that write to stdout
//! cannot corrupt the stream.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The controller's pipes, on descriptors nobody else knows about.
pub(crate) struct ProtocolFds {
    pub(crate) input: OwnedFd,
    pub(crate) output: OwnedFd,
}

fn check(result: libc::c_int) -> io::Result<libc::c_int> {
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

fn dup_private(fd: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on an open descriptor returns a new descriptor we own.
    let copy = check(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) })?;
    // SAFETY: `copy` was just created and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(copy) })
}

/// Moves stdin/stdout to private close-on-exec descriptors and points 0 at
/// `/dev/null` and 1 at stderr. Also ignores SIGPIPE, which `main` would have done.
pub(crate) fn take_protocol_fds() -> io::Result<ProtocolFds> {
    // SAFETY: setting a signal disposition to SIG_IGN has no memory-safety preconditions.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    // Before anything can take descriptor 9 for itself.
    close_bootstrap_descriptor();
    let input = dup_private(0)?;
    let output = dup_private(1)?;
    // Enlarged while bulk data moves: the controller keeps writing while a
    // chunk is stored, and chunks leave in fewer steps.
    crate::pipe_size::remember(&[&input, &output]);
    // SAFETY: the path is a valid NUL-terminated string.
    let null = check(unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) })?;
    // SAFETY: `null` is open and owned here.
    let null = unsafe { OwnedFd::from_raw_fd(null) };
    // SAFETY: dup2 onto the standard descriptors; both sources are open.
    check(unsafe { libc::dup2(null.as_raw_fd(), 0) })?;
    if same_file(1, 2) != Some(false) {
        // stderr is the protocol stream itself (a transport merged them) or is
        // closed: anything written to it would corrupt the protocol.
        // SAFETY: dup2 of an open descriptor onto the standard descriptors.
        check(unsafe { libc::dup2(null.as_raw_fd(), 1) })?;
        // SAFETY: as above.
        check(unsafe { libc::dup2(null.as_raw_fd(), 2) })?;
    } else {
        // SAFETY: fd 2 is the agent's own stderr, kept open by the transport.
        check(unsafe { libc::dup2(2, 1) })?;
    }
    Ok(ProtocolFds { input, output })
}

/// The descriptor the shell bootstrap executes the agent through.
const BOOTSTRAP_FD: libc::c_int = 9;

/// Closes the descriptor the shell bootstrap executed this program through
/// (see `chopsticks_core::__private::bootstrap`), if it is there: a descriptor that is
/// open on this very executable. Anything else on that number is left alone.
fn close_bootstrap_descriptor() {
    let Ok(executable) = std::fs::metadata("/proc/self/exe") else {
        return;
    };
    use std::os::unix::fs::MetadataExt;
    if identity(BOOTSTRAP_FD) == Some((executable.dev(), executable.ino())) {
        // SAFETY: the descriptor is open (fstat succeeded) and refers to our
        // own executable; nothing in this process owns or uses it.
        unsafe { libc::close(BOOTSTRAP_FD) };
    }
}

/// The device and inode a descriptor refers to; `None` if it is closed.
fn identity(fd: libc::c_int) -> Option<(u64, u64)> {
    // SAFETY: stat is plain old data; fstat fills it for an open descriptor.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `stat` is writable; fstat fails cleanly on a closed descriptor.
    (unsafe { libc::fstat(fd, &mut stat) } == 0).then_some((stat.st_dev, stat.st_ino))
}

/// Whether two descriptors refer to the same open file; `None` if either is closed.
fn same_file(a: libc::c_int, b: libc::c_int) -> Option<bool> {
    Some(identity(a)? == identity(b)?)
}

fn file_type(fd: &OwnedFd) -> io::Result<libc::mode_t> {
    // SAFETY: stat is plain old data; fstat fills it for an open descriptor.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open and `stat` is writable.
    check(unsafe { libc::fstat(fd.as_raw_fd(), &mut stat) })?;
    Ok(stat.st_mode & libc::S_IFMT)
}

/// Wraps the output descriptor for the runtime: a pipe or a socket.
pub(crate) fn writer(fd: OwnedFd) -> io::Result<crate::output::Sink> {
    match file_type(&fd)? {
        libc::S_IFIFO => Ok(crate::output::Sink::Pipe(
            tokio::net::unix::pipe::Sender::from_owned_fd(fd)?,
        )),
        libc::S_IFSOCK => Ok(crate::output::Sink::Socket(socket(fd)?)),
        _ => Err(io::Error::other(
            "the agent's stdout must be a pipe or a socket",
        )),
    }
}

fn socket(fd: OwnedFd) -> io::Result<tokio::net::UnixStream> {
    let stream = std::os::unix::net::UnixStream::from(fd);
    stream.set_nonblocking(true)?;
    tokio::net::UnixStream::from_std(stream)
}
