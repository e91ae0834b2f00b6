//! The conversation with `sudo` or `doas` on the process's stderr, before
//! the agent starts.
//!
//! The command is `sudo [-S -p PROMPT | -n] ... -- sh -c 'printf MARKER >&2;
//! exec "$@"' ...`: both tokens are random, so neither `sudo`'s language
//! nor anything else on stderr can be mistaken for them. The prompt is
//! answered once with the password; a second prompt means it was wrong,
//! and is never answered. The marker says the target user's shell runs:
//! whatever follows it on stderr belongs to the agent.

use std::time::Duration;

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
    /// Something asked a question that is not the password prompt (a
    /// one-time code, an expired password) and waited.
    ForeignPrompt { question: String },
    /// Stdout carried more than a tool's start ever does.
    StdoutFlood,
    /// The process's stderr ended first; what it said there, and whether a
    /// password had been given.
    Ended { said: String, answered: bool },
}

/// What stderr may hold of the tool's words for an error message: this
/// much of the start, and as much of the end.
const SAID_HEAD: usize = 2 * 1024;
const SAID_TAIL: usize = 6 * 1024;
/// How long an unfinished line may wait before it counts as a question.
const QUESTION_WAIT: Duration = Duration::from_secs(5);

/// The tool's words so far: the start and the end, for error messages.
#[derive(Default)]
struct Said {
    head: Vec<u8>,
    tail: Vec<u8>,
    skipped: bool,
}

impl Said {
    fn keep(&mut self, more: &[u8]) {
        let into_head = (SAID_HEAD - self.head.len()).min(more.len());
        self.head.extend_from_slice(&more[..into_head]);
        self.tail.extend_from_slice(&more[into_head..]);
        if self.tail.len() > SAID_TAIL {
            self.tail.drain(..self.tail.len() - SAID_TAIL);
            self.skipped = true;
        }
    }

    fn text(&self) -> String {
        let mut text = String::from_utf8_lossy(&self.head).into_owned();
        if self.skipped {
            text.push_str("\n...\n");
        }
        text.push_str(&String::from_utf8_lossy(&self.tail));
        text.trim().to_string()
    }
}

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
///
/// A token counts only at the start of a line (or right after the prompt
/// that was answered): a command line echoed by a login script carries
/// both tokens in its middle.
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
    // Bytes not yet judged; `line_start` says whether seen[0] starts a line.
    let mut seen: Vec<u8> = Vec::new();
    let mut line_start = true;
    let mut said = Said::default();
    let mut answered = false;
    let mut buffer = vec![0u8; 4096];
    loop {
        // What came so far, token by token, in order.
        loop {
            let at_marker = find_at_line_start(&seen, &marker_line, line_start);
            let at_prompt = find_at_line_start(&seen, prompt, line_start);
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
            said.keep(&seen[..prompt_at]);
            seen.drain(..prompt_at + prompt.len());
            line_start = true;
            if answered {
                return Err(Stop::Rejected);
            }
            answer(stdin, password, host, user).await?;
            answered = true;
        }
        // Keep only what may be the start of a token (and the byte before it).
        let keep = marker_line.len().max(prompt.len());
        if seen.len() > keep {
            let done = seen.len() - keep;
            said.keep(&seen[..done]);
            line_start = seen[done - 1] == b'\n';
            seen.drain(..done);
        }
        let quiet = tokio::time::sleep(QUESTION_WAIT);
        let read = tokio::select! {
            read = stderr.read(&mut buffer) => read.unwrap_or(0),
            read = stdout.read(&mut stdout_buffer), if stdout_open => {
                match read.unwrap_or(0) {
                    0 => stdout_open = false,
                    count if early_stdout.len() + count <= EARLY_STDOUT_LIMIT => {
                        early_stdout.extend_from_slice(&stdout_buffer[..count]);
                    }
                    _ => return Err(Stop::StdoutFlood),
                }
                continue;
            }
            () = quiet => {
                if let Some(question) = open_question(&seen, &said, prompt, &marker_line) {
                    return Err(Stop::ForeignPrompt { question });
                }
                continue;
            }
        };
        if read == 0 {
            said.keep(&seen);
            return Err(Stop::Ended {
                said: said.text(),
                answered,
            });
        }
        seen.extend_from_slice(&buffer[..read]);
    }
}

/// An unfinished last line that is not the start of a token: a question
/// someone waits to have answered.
fn open_question(seen: &[u8], said: &Said, prompt: &[u8], marker: &[u8]) -> Option<String> {
    let last_line = seen
        .rsplit(|&byte| byte == b'\n')
        .next()
        .unwrap_or_default();
    let mut line = last_line.to_vec();
    if !seen.contains(&b'\n') {
        // The line may have begun before what is kept unjudged.
        let kept = [said.head.as_slice(), said.tail.as_slice()].concat();
        let before = kept
            .rsplit(|&byte| byte == b'\n')
            .next()
            .unwrap_or_default();
        line = [before, last_line].concat();
    }
    let text = String::from_utf8_lossy(&line).trim().to_string();
    let token_start = prompt.starts_with(&line) || marker.starts_with(&line);
    (!text.is_empty() && !token_start).then_some(text)
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

/// The first place `needle` starts a line in `haystack`; `line_start` says
/// whether `haystack[0]` starts one.
fn find_at_line_start(haystack: &[u8], needle: &[u8], line_start: bool) -> Option<usize> {
    haystack
        .windows(needle.len())
        .enumerate()
        .find(|&(at, window)| {
            window == needle
                && if at == 0 {
                    line_start
                } else {
                    haystack[at - 1] == b'\n'
                }
        })
        .map(|(at, _)| at)
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
    async fn tokens_count_only_at_the_start_of_a_line() {
        // A login script echoing the command line carries both tokens.
        let (outcome, stdin) = run(b"+ sudo -p P: sh -c M\nP:M\nrest", Some("pw")).await;
        assert_eq!(outcome.expect("became"), b"rest");
        assert_eq!(stdin, b"pw\n");
    }

    #[tokio::test]
    async fn tokens_split_across_reads_are_found() {
        for split in 0..=7 {
            let whole = b"x\nP:M\nafter";
            let (first, second) = whole.split_at(split);
            let mut stderr = reader_of(vec![first.to_vec(), second.to_vec()]);
            let mut stdout: &[u8] = b"";
            let mut stdin = Vec::new();
            let source = PasswordSource::Given(Password::new("pw"));
            let talk = Talk {
                stdin: &mut stdin,
                stdout: &mut stdout,
                stderr: &mut stderr,
            };
            let became = converse(talk, &tokens(), Some(&source), ("h", "u"))
                .await
                .expect("became");
            let mut after = became.stderr;
            stderr.read_to_end(&mut after).await.expect("rest");
            assert_eq!(after, b"after", "split at {split}");
            assert_eq!(stdin, b"pw\n", "split at {split}");
        }
    }

    /// A reader that returns `pieces` one read at a time.
    fn reader_of(pieces: Vec<Vec<u8>>) -> impl AsyncRead + Send + Unpin {
        let (mut writer, reader) = tokio::io::duplex(64);
        tokio::spawn(async move {
            for piece in pieces {
                let _ = writer.write_all(&piece).await;
                tokio::task::yield_now().await;
            }
        });
        reader
    }

    #[tokio::test]
    async fn a_long_refusal_keeps_its_start_and_its_end() {
        let mut stderr = b"Sorry, user a is not allowed to execute '".to_vec();
        stderr.extend(std::iter::repeat_n(b'x', 20_000));
        stderr.extend_from_slice(b"' as b on h.\n");
        let (outcome, _) = run(&stderr, None).await;
        match outcome {
            Err(Stop::Ended { said, .. }) => {
                assert!(said.starts_with("Sorry, user a"), "{said}");
                assert!(said.ends_with("as b on h."), "{said}");
                assert!(said.len() < 9000);
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_question_that_is_not_the_prompt_is_not_waited_on() {
        let (mut writer, mut stderr) = tokio::io::duplex(64);
        writer
            .write_all(b"Verification code: ")
            .await
            .expect("write");
        let mut stdout = tokio::io::empty();
        let mut stdin = Vec::new();
        let talk = Talk {
            stdin: &mut stdin,
            stdout: &mut stdout,
            stderr: &mut stderr,
        };
        match converse(talk, &tokens(), None, ("h", "u")).await {
            Err(Stop::ForeignPrompt { question }) => assert_eq!(question, "Verification code:"),
            other => panic!("{other:?}"),
        }
        drop(writer);
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
