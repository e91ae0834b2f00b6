//! [`Password`]: a secret that is zeroed when dropped and never printed.

use std::sync::{Arc, Mutex};

use zeroize::Zeroizing;

/// A password for `sudo`: zeroed in memory when dropped, and shown as
/// `Password(<redacted>)` by `Debug`. It reaches `sudo` only on its
/// standard input, never in an argument, the environment or a message.
///
/// ```
/// use chopsticks_core::Password;
///
/// let password = Password::new("correct horse");
/// assert_eq!(format!("{password:?}"), "Password(<redacted>)");
/// ```
#[derive(Clone)]
pub struct Password(Zeroizing<String>);

impl Password {
    /// Takes `secret`; the `String` given is moved in, not copied.
    pub fn new(secret: impl Into<String>) -> Password {
        Password(Zeroizing::new(secret.into()))
    }

    /// The password followed by the newline that ends it for `sudo -S`, or
    /// `None` when it has a character that would end it early (a line
    /// break or NUL) and so pass the rest to the agent's input.
    pub(super) fn line(&self) -> Option<Zeroizing<Vec<u8>>> {
        if self.0.contains(['\n', '\r', '\0']) {
            return None;
        }
        let mut line = Zeroizing::new(Vec::with_capacity(self.0.len() + 1));
        line.extend_from_slice(self.0.as_bytes());
        line.push(b'\n');
        Some(line)
    }
}

impl From<String> for Password {
    fn from(secret: String) -> Password {
        Password::new(secret)
    }
}

impl From<&str> for Password {
    fn from(secret: &str) -> Password {
        Password::new(secret)
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

/// Asks for the password to become `user` on `host`; `None` gives up.
pub(super) type Ask = dyn Fn(&str, &str) -> Option<Password> + Send + Sync;

/// Where a [`Become`](super::Become) gets its password: a value, or a
/// callback asked once per host (its answer is kept for reconnects, and
/// forgotten when `sudo` rejects it).
#[derive(Clone)]
pub(super) enum PasswordSource {
    Given(Password),
    Asked {
        ask: Arc<Ask>,
        answered: Arc<Mutex<Option<Password>>>,
        /// One question at a time: a second connect waits for the first
        /// answer instead of asking again.
        asking: Arc<tokio::sync::Mutex<()>>,
    },
}

impl PasswordSource {
    pub(super) fn asked(ask: Arc<Ask>) -> PasswordSource {
        PasswordSource::Asked {
            ask,
            answered: Arc::default(),
            asking: Arc::default(),
        }
    }

    /// The same source for another host: a callback is asked afresh.
    pub(super) fn for_another_host(&self) -> PasswordSource {
        match self {
            PasswordSource::Given(password) => PasswordSource::Given(password.clone()),
            PasswordSource::Asked { ask, .. } => PasswordSource::asked(ask.clone()),
        }
    }

    /// The password, asking the callback (on a blocking thread: it may
    /// read a terminal) the first time. The answer is kept as soon as it is
    /// given, even when the connect that asked has given up meanwhile.
    pub(super) async fn get(&self, host: &str, user: &str) -> Option<Password> {
        let (ask, answered, asking) = match self {
            PasswordSource::Given(password) => return Some(password.clone()),
            PasswordSource::Asked {
                ask,
                answered,
                asking,
            } => (ask.clone(), answered.clone(), asking.clone()),
        };
        let _one_at_a_time = asking.lock_owned().await;
        if let Some(password) = lock(&answered).clone() {
            return Some(password);
        }
        let (host, user) = (host.to_string(), user.to_string());
        let keep = answered.clone();
        tokio::task::spawn_blocking(move || {
            let password = ask(&host, &user)?;
            *lock(&keep) = Some(password.clone());
            Some(password)
        })
        .await
        .ok()
        .flatten()
    }

    /// Forgets an asked password that was rejected, so the next connect
    /// asks again.
    pub(super) fn rejected(&self) {
        if let PasswordSource::Asked { answered, .. } = self {
            *lock(answered) = None;
        }
    }
}

impl std::fmt::Debug for PasswordSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PasswordSource::Given(_) => f.write_str("Given(<redacted>)"),
            PasswordSource::Asked { .. } => f.write_str("Asked(<callback>)"),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_break_never_reaches_sudo() {
        assert!(Password::new("a\nb").line().is_none());
        assert!(Password::new("a\rb").line().is_none());
        assert!(Password::new("a\0b").line().is_none());
        let line = Password::new("it's a \"pass\" word")
            .line()
            .expect("usable");
        assert_eq!(&line[..], b"it's a \"pass\" word\n");
    }

    #[test]
    fn debug_never_shows_it() {
        let source = PasswordSource::Given(Password::new("hunter2"));
        assert!(!format!("{source:?}").contains("hunter2"));
        assert!(!format!("{:?}", Password::new("hunter2")).contains("hunter2"));
    }
}
