//! [`RemoteError`]: an error a remote function can return with `?`.

use std::fmt;

use serde::{Deserialize, Serialize};

/// An error from a remote function that survives the trip to the
/// controller: its message, the messages of its causes, and, for an
/// `std::io::Error`, its kind and OS error number.
///
/// Any `std::error::Error` converts into it, so a remote function can use
/// `?` on `std::io::Error`, parse errors and the like without `map_err`. The
/// function's `Result<T, RemoteError>` arrives whole: a call that ran and
/// failed gives `Ok(Err(error))`, while the outer `Err` is chopsticks' own
/// (the host was unreachable, the agent died).
///
/// ```
/// use chopsticks_core::RemoteError;
///
/// fn read_config(path: String) -> Result<String, RemoteError> {
///     Ok(std::fs::read_to_string(path)?)
/// }
///
/// let error = read_config("/no/such/file".into()).unwrap_err();
/// assert_eq!(error.kind(), Some(std::io::ErrorKind::NotFound));
/// assert_eq!(error.raw_os_error(), Some(2));
/// ```
///
/// Like `anyhow::Error`, it does not implement `std::error::Error` itself
/// (that would clash with the conversion from every error); it displays
/// with its causes, and [`into_io_error`](Self::into_io_error) gives an
/// `std::io::Error` with the same kind where one is needed.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteError {
    message: String,
    causes: Vec<String>,
    os_error: Option<i32>,
    io_kind: Option<String>,
}

impl RemoteError {
    /// An error with this message and no cause.
    pub fn msg(message: impl fmt::Display) -> RemoteError {
        RemoteError {
            message: message.to_string(),
            causes: Vec::new(),
            os_error: None,
            io_kind: None,
        }
    }

    /// The error's own message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The messages of its causes, outermost first.
    pub fn causes(&self) -> &[String] {
        &self.causes
    }

    /// The OS error number, when an `std::io::Error` from the OS was converted.
    pub fn raw_os_error(&self) -> Option<i32> {
        self.os_error
    }

    /// The `std::io::ErrorKind`, when an `std::io::Error` was converted.
    pub fn kind(&self) -> Option<std::io::ErrorKind> {
        if let Some(code) = self.os_error {
            return Some(std::io::Error::from_raw_os_error(code).kind());
        }
        let name = self.io_kind.as_deref()?;
        use std::io::ErrorKind::*;
        Some(
            [
                NotFound,
                PermissionDenied,
                ConnectionRefused,
                ConnectionReset,
                ConnectionAborted,
                NotConnected,
                AddrInUse,
                AddrNotAvailable,
                BrokenPipe,
                AlreadyExists,
                WouldBlock,
                InvalidInput,
                InvalidData,
                TimedOut,
                WriteZero,
                Interrupted,
                Unsupported,
                UnexpectedEof,
                OutOfMemory,
            ]
            .into_iter()
            .find(|kind| format!("{kind:?}") == name)
            .unwrap_or(Other),
        )
    }

    /// An `std::io::Error` with this error's kind (or OS error) and text.
    pub fn into_io_error(self) -> std::io::Error {
        let kind = self.kind().unwrap_or(std::io::ErrorKind::Other);
        std::io::Error::new(kind, self.to_string())
    }
}

impl<E: std::error::Error + 'static> From<E> for RemoteError {
    fn from(error: E) -> RemoteError {
        let mut causes = Vec::new();
        let mut cause = error.source();
        while let Some(next) = cause {
            causes.push(next.to_string());
            cause = next.source();
        }
        let io = (&error as &dyn std::any::Any).downcast_ref::<std::io::Error>();
        RemoteError {
            message: error.to_string(),
            causes,
            os_error: io.and_then(std::io::Error::raw_os_error),
            io_kind: io.map(|io| format!("{:?}", io.kind())),
        }
    }
}

impl fmt::Display for RemoteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        for cause in &self.causes {
            write!(f, ": {cause}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for RemoteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteError")
            .field("message", &self.message)
            .field("causes", &self.causes)
            .field("kind", &self.kind())
            .field("raw_os_error", &self.os_error)
            .finish()
    }
}
