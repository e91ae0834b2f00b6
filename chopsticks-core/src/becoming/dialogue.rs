//! The conversation with `sudo` or `doas` on the process's stderr, before
//! the agent starts.
//!
//! The command is `sudo [-S -p PROMPT | -n] ... -- sh -c 'printf MARKER >&2;
//! exec "$@"' ...`: both tokens are random, so neither `sudo`'s language
//! nor anything else on stderr can be mistaken for them. The prompt is
//! answered once with the password; a second prompt means it was wrong,
//! and is never answered. The marker says the target user's shell runs:
//! whatever follows it on stderr belongs to the agent.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::password::PasswordSource;

/// The random prompt and marker of one start.
#[derive(Debug)]
pub(super) struct Tokens {
    /// What `sudo -p` prints when it wants the password.
    pub(super) prompt: String,
    /// What the target user's shell prints, on a line of its own, once it runs.
    pub(super) marker: String,
}

impl Tokens {
    pub(super) fn new() -> std::io::Result<Tokens> {
        let mut random = [0u8; 16];
        getrandom::fill(&mut random).map_err(std::io::Error::other)?;
        let hex: String = random.iter().map(|byte| format!("{byte:02x}")).collect();
        Ok(Tokens {
            // Hex only: `sudo -p` expands `%` escapes.
            prompt: format!("chopsticks-password-{hex}:"),
            marker: format!("chopsticks-became-{hex}"),
        })
    }
}

/// How the conversation ended, when the agent's command did not start.
#[derive(Debug)]
pub(super) enum Stop {
    /// A second prompt: the password was wrong.
    Rejected,
    /// A prompt, and no password to give.
    NoSource,
    /// The password source gave none.
    NoPassword,
    /// The password has a line break or NUL, and was not sent.
    Unusable,
    /// The process's stderr ended first; what it said there, and whether a
    /// password had been given.
    Ended { said: String, answered: bool },
}

/// What stderr may hold of `sudo`'s words for an error message.
const SAID_LIMIT: usize = 8 * 1024;

/// The process's pipes, as the conversation uses them.
pub(super) struct Talk<'p> {
    pub(super) stdin: &'p mut (dyn AsyncWrite + Send + Unpin),
    /// Read too, and kept: some transports (Docker's multiplexed stream)
    /// move stderr only while stdout is read.
    pub(super) stdout: &'p mut (dyn AsyncRead + Send + Unpin),
    pub(super) stderr: &'p mut (dyn AsyncRead + Send + Unpin),
}

/// What came after the marker: the rest of the last stderr read, and
/// whatever stdout carried meanwhile (nothing, from sudo or doas).
#[derive(Debug, Default)]
pub(super) struct Became {
    pub(super) stderr: Vec<u8>,
    pub(super) stdout: Vec<u8>,
}

/// The most stdout may carry before the marker.
const EARLY_STDOUT_LIMIT: usize = 64 * 1024;

/// Reads stderr until the marker, answering one prompt on stdin.
pub(super) async fn converse(
    pipes: Talk<'_>,
    tokens: &Tokens,
    password: Option<&PasswordSource>,
    (host, user): (&str, &str),
) -> Result<Became, Stop> {
    let Talk {
        stdin,
        stdout,
        stderr,
    } = pipes;
    let mut early_stdout = Vec::new();
    let mut stdout_open = true;
    let mut stdout_buffer = vec![0u8; 4096];
    let marker_line = format!("{}\n", tokens.marker).into_bytes();
    let prompt = tokens.prompt.as_bytes();
    let mut seen: Vec<u8> = Vec::new();
    let mut said: Vec<u8> = Vec::new();
    let mut answered = false;
    let mut buffer = vec![0u8; 4096];
    loop {
        // What came so far, token by token, in order.
        loop {
            let at_marker = find(&seen, &marker_line);
            let at_prompt = find(&seen, prompt);
            let prompt_at = match (at_marker, at_prompt) {
                (Some(marker), Some(prompt)) if prompt < marker => prompt,
                (Some(marker), _) => {
                    return Ok(Became {
                        stderr: seen.split_off(marker + marker_line.len()),
                        stdout: early_stdout,
                    });
                }
                (None, Some(prompt)) => prompt,
                (None, None) => break,
            };
            keep_said(&mut said, &seen[..prompt_at]);
            seen.drain(..prompt_at + prompt.len());
            if answered {
                return Err(Stop::Rejected);
            }
            answer(stdin, password, host, user).await?;
            answered = true;
        }
        // Keep only what may be the start of a token.
        let keep = marker_line.len().max(prompt.len()) - 1;
        if seen.len() > keep {
            let done = seen.len() - keep;
            keep_said(&mut said, &seen[..done]);
            seen.drain(..done);
        }
        let read = tokio::select! {
            read = stderr.read(&mut buffer) => read.unwrap_or(0),
            read = stdout.read(&mut stdout_buffer), if stdout_open => {
                match read.unwrap_or(0) {
                    0 => stdout_open = false,
                    count if early_stdout.len() + count <= EARLY_STDOUT_LIMIT => {
                        early_stdout.extend_from_slice(&stdout_buffer[..count]);
                    }
                    // Not sudo's: whatever runs there is not what was asked for.
                    _ => stdout_open = false,
                }
                continue;
            }
        };
        if read == 0 {
            keep_said(&mut said, &seen);
            return Err(Stop::Ended {
                said: String::from_utf8_lossy(&said).trim().to_string(),
                answered,
            });
        }
        seen.extend_from_slice(&buffer[..read]);
    }
}

/// Writes the password, and the newline that ends it, to `sudo -S`.
async fn answer(
    stdin: &mut (dyn AsyncWrite + Send + Unpin),
    password: Option<&PasswordSource>,
    host: &str,
    user: &str,
) -> Result<(), Stop> {
    let source = password.ok_or(Stop::NoSource)?;
    let password = source.get(host, user).await.ok_or(Stop::NoPassword)?;
    let line = password.line().ok_or(Stop::Unusable)?;
    // A failed write means the process is gone; its stderr says why.
    if stdin.write_all(&line).await.is_ok() {
        let _ = stdin.flush().await;
    }
    Ok(())
}

fn keep_said(said: &mut Vec<u8>, more: &[u8]) {
    said.extend_from_slice(more);
    if said.len() > SAID_LIMIT {
        said.drain(..said.len() - SAID_LIMIT);
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::becoming::password::Password;

    fn tokens() -> Tokens {
        Tokens {
            prompt: "P:".into(),
            marker: "M".into(),
        }
    }

    async fn run(stderr: &[u8], password: Option<&str>) -> (Result<Vec<u8>, Stop>, Vec<u8>) {
        let mut stderr = stderr;
        let mut stdout: &[u8] = b"";
        let mut stdin = Vec::new();
        let source = password.map(|p| PasswordSource::Given(Password::new(p)));
        let talk = Talk {
            stdin: &mut stdin,
            stdout: &mut stdout,
            stderr: &mut stderr,
        };
        let outcome = converse(talk, &tokens(), source.as_ref(), ("h", "u")).await;
        (outcome.map(|became| became.stderr), stdin)
    }

    #[tokio::test]
    async fn the_marker_ends_it_and_what_follows_is_kept() {
        let (outcome, stdin) = run(b"lecture\nM\nagent says\n", None).await;
        assert_eq!(outcome.expect("became"), b"agent says\n");
        assert!(stdin.is_empty());
    }

    #[tokio::test]
    async fn one_prompt_is_answered_once() {
        let (outcome, stdin) = run(b"P:M\nrest", Some("pw")).await;
        assert_eq!(outcome.expect("became"), b"rest");
        assert_eq!(stdin, b"pw\n");
    }

    #[tokio::test]
    async fn a_second_prompt_is_a_rejection_and_is_not_answered() {
        let (outcome, stdin) = run(b"P:Sorry, try again.\nP:", Some("pw")).await;
        assert!(matches!(outcome, Err(Stop::Rejected)));
        assert_eq!(stdin, b"pw\n");
    }

    #[tokio::test]
    async fn a_prompt_without_a_password_is_refused() {
        let (outcome, stdin) = run(b"P:", None).await;
        assert!(matches!(outcome, Err(Stop::NoSource)));
        assert!(stdin.is_empty());
    }

    #[tokio::test]
    async fn a_password_with_a_line_break_is_never_sent() {
        let (outcome, stdin) = run(b"P:", Some("pw\nid")).await;
        assert!(matches!(outcome, Err(Stop::Unusable)));
        assert!(stdin.is_empty());
    }

    #[tokio::test]
    async fn an_early_end_reports_what_was_said() {
        let (outcome, _) = run(b"sudo: a password is required\n", None).await;
        match outcome {
            Err(Stop::Ended { said, answered }) => {
                assert_eq!(said, "sudo: a password is required");
                assert!(!answered);
            }
            other => panic!("{other:?}"),
        }
    }
}
