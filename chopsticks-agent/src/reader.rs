//! Blocking frame reading from the protocol input, for the leader thread.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use bytes::BytesMut;
use chopsticks_core::__private::heartbeat::InputWatch;
use chopsticks_core::__private::wire::{Frame, FrameDecoder};
use tokio_util::codec::Decoder;

/// What the reader reports to the agent's heartbeat: waiting for the
/// controller, or input came.
pub(crate) static INPUT: InputWatch = InputWatch::new();

/// How much room each read asks for.
const READ_SIZE: usize = 256 * 1024;

/// The protocol input, read with blocking `read(2)` calls by whichever pool thread leads.
pub(crate) struct Reader {
    fd: OwnedFd,
    buffer: BytesMut,
    decoder: FrameDecoder,
    ended: bool,
}

impl Reader {
    /// Takes the input descriptor and puts it in blocking mode.
    pub(crate) fn new(fd: OwnedFd) -> io::Result<Reader> {
        // SAFETY: F_GETFL/F_SETFL on an open descriptor have no memory-safety preconditions.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Reader {
            fd,
            buffer: BytesMut::with_capacity(READ_SIZE),
            decoder: FrameDecoder::default(),
            ended: false,
        })
    }

    /// The next frame, blocking until one is complete; `None` at a clean end of input.
    /// Malformed input is an `InvalidData` error; input that ends mid-frame is an error too.
    pub(crate) fn next_frame(&mut self) -> io::Result<Option<Frame>> {
        loop {
            if self.ended {
                return self.decoder.decode_eof(&mut self.buffer);
            }
            if let Some(frame) = self.decoder.decode(&mut self.buffer)? {
                return Ok(Some(frame));
            }
            self.fill()?;
        }
    }

    /// Whether another complete frame is already buffered, so the caller knows
    /// more work follows without reading.
    pub(crate) fn more_buffered(&self) -> bool {
        let Some(prefix) = self.buffer.get(..4) else {
            return false;
        };
        let length = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        self.buffer.len() - 4 >= length
    }

    fn fill(&mut self) -> io::Result<()> {
        if self.buffer.capacity() - self.buffer.len() < READ_SIZE {
            self.buffer.reserve(READ_SIZE);
        }
        let spare = self.buffer.spare_capacity_mut();
        loop {
            INPUT.waiting();
            // SAFETY: `spare` is writable memory of `spare.len()` bytes owned by the buffer.
            let read =
                unsafe { libc::read(self.fd.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len()) };
            INPUT.received();
            if read < 0 {
                let error = io::Error::last_os_error();
                if error.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(error);
            }
            if read == 0 {
                self.ended = true;
            } else {
                let filled = self.buffer.len() + read as usize;
                // SAFETY: read(2) initialised `read` bytes right after the current length.
                unsafe { self.buffer.set_len(filled) };
            }
            return Ok(());
        }
    }
}
