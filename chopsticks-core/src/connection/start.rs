//! Starting an agent: the launch command (direct exec or the shell
//! bootstrap), the transport's spawn, the bootstrap dialogue, the agent's
//! hello and its checks; and the supervisor that owns the process after.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::codec::FramedRead;

use super::{ConnectOptions, Connection, EXPLAIN_WAIT, Ending, Frames, Shared};
use crate::agent_env::{self, AGENT_DEPTH, AGENT_HEARTBEAT, AGENT_MARKER, MAX_DEPTH};
use crate::bootstrap::{self, Bundle, OtherBuild, Outcome, Shipment};
use crate::descriptor_limit;
use crate::error::{Error, Phase, Result};
use crate::identity::{self, hex};
use crate::protocol::{Hello, Message, PROTOCOL_VERSION};
use crate::stderr::{self, StderrTail};
use crate::transport::{AgentCommand, AgentLaunch, AgentProcess, Pipes, Transport};
use crate::wire::{Frame, FrameDecoder};

/// Starts the agent through `transport`, runs the bootstrap if needed, and checks its hello.
///
/// Unless the tunnel chose, a dynamically linked program goes alone first;
/// if it dies before its hello (no loader, an older C library), the
/// connect starts again with the bundle, and the tunnel keeps the bundle.
pub(crate) async fn connect(
    transport: &dyn Transport,
    options: &ConnectOptions,
) -> Result<Connection> {
    let (os, arch) = identity::uname();
    let own_platform = format!("{os} {arch}");
    let choice = match options.program_for(&own_platform) {
        Some(program) => Choice::Other {
            platform: own_platform.clone(),
            program,
        },
        None => Choice::Own {
            platform: own_platform.clone(),
            bundle: options
                .bundle_libraries
                .unwrap_or_else(|| options.bundle_learned.load(Ordering::Relaxed)),
        },
    };
    match connect_once(transport, options, &choice).await {
        Ok(connection) => Ok(connection),
        Err(Attempt::Failed(error)) => Err(error),
        Err(Attempt::WrongPlatform { platform, error }) => match options.program_for(&platform) {
            Some(program) => connect_once(transport, options, &Choice::Other { platform, program })
                .await
                .map_err(Attempt::into_error),
            None => Err(error),
        },
        Err(Attempt::DiedBeforeHello(error)) => {
            let dynamic = matches!(
                tokio::task::spawn_blocking(Bundle::of_this_program).await,
                Ok(Ok(Some(_)))
            );
            if options.bundle_libraries.is_some() || !dynamic {
                return Err(with_loader_hint(error));
            }
            options.bundle_learned.store(true, Ordering::Relaxed);
            let retry = Choice::Own {
                platform: own_platform,
                bundle: true,
            };
            connect_once(transport, options, &retry)
                .await
                .map_err(Attempt::into_error)
        }
    }
}

/// Which program an attempt starts, for which platform (`uname -sm`, which
/// the bootstrap compares with the target's).
enum Choice {
    /// This program, bundled with its libraries or not.
    Own { platform: String, bundle: bool },
    /// Another build of it, for `platform`.
    Other { platform: String, program: PathBuf },
}

impl Choice {
    fn platform(&self) -> &str {
        match self {
            Choice::Own { platform, .. } | Choice::Other { platform, .. } => platform,
        }
    }
}

/// How one attempt to connect failed.
enum Attempt {
    /// This program went alone, was started, and ended before its hello.
    DiedBeforeHello(Error),
    /// The target runs another platform (`uname -sm`).
    WrongPlatform {
        platform: String,
        error: Error,
    },
    Failed(Error),
}

impl Attempt {
    fn into_error(self) -> Error {
        match self {
            Attempt::DiedBeforeHello(error)
            | Attempt::WrongPlatform { error, .. }
            | Attempt::Failed(error) => error,
        }
    }
}

impl From<Error> for Attempt {
    fn from(error: Error) -> Attempt {
        Attempt::Failed(error)
    }
}

async fn connect_once(
    transport: &dyn Transport,
    options: &ConnectOptions,
    choice: &Choice,
) -> std::result::Result<Connection, Attempt> {
    let host: Arc<str> = transport.host().into();
    let (command, shipment) = launch_command(transport, &host, options, choice).await?;
    let Pipes {
        mut stdin,
        mut stdout,
        stderr,
        process,
    } = transport
        .spawn(&command)
        .await
        .map_err(|source| Error::Spawn {
            host: host.to_string(),
            message: match descriptor_limit::exhaustion(source.as_ref()) {
                Some(limit) => format!("{}: {limit}", chain_text(source.as_ref())),
                None => chain_text(source.as_ref()),
            },
            cause: Some(source),
        })?;
    let shared = supervise_process(&host, options, stderr, process);
    if let Some(shipment) = &shipment {
        bootstrap(
            transport,
            &shared,
            shipment.clone(),
            &mut stdout,
            &mut stdin,
        )
        .await?;
    }
    let mut frames: Frames = FramedRead::new(stdout, FrameDecoder::default());
    let hello = read_hello(transport, &shared, &mut frames)
        .await
        .map_err(|error| match (&shipment, &error) {
            (Some(Shipment::Program(_)), Error::Spawn { .. } | Error::Bootstrap { .. }) => {
                Attempt::DiedBeforeHello(error)
            }
            _ => Attempt::Failed(error),
        })?;
    let other_build = matches!(choice, Choice::Other { .. });
    let foreign = check_hello(&host, &hello, other_build)?;
    Ok(Connection::start(
        shared,
        frames,
        stdin,
        hello,
        options.heartbeat_timeout,
        foreign,
    ))
}

/// The command that starts the agent (direct, or through the shell
/// bootstrap with the agent file to send); refuses a program without the
/// agent runtime and nesting past the limit.
async fn launch_command(
    transport: &dyn Transport,
    host: &str,
    options: &ConnectOptions,
    choice: &Choice,
) -> Result<(AgentCommand, Option<Shipment>)> {
    let spawn_error = |message: String| Error::Spawn {
        host: host.to_string(),
        message,
        cause: None,
    };
    if !agent_env::runtime_linked() {
        return Err(spawn_error(
            "this program cannot become an agent: depend on the `chopsticks` crate (which links \
             `chopsticks-agent`), or add `use chopsticks_agent as _;` to a crate the program links"
                .into(),
        ));
    }
    let depth = agent_env::depth().saturating_add(1);
    if depth > MAX_DEPTH {
        return Err(spawn_error(format!(
            "tunnels are nested {depth} agents deep, over the limit of {MAX_DEPTH}; a remote function \
             that opens tunnels is probably recursing without end"
        )));
    }
    descriptor_limit::raise_soft_limit();
    let heartbeat_ms = options.heartbeat_timeout.as_millis().to_string();
    match transport.launch() {
        AgentLaunch::ShellBootstrap => {
            let platform = choice.platform().to_string();
            let choice = match choice {
                Choice::Own { bundle, .. } => Ok(*bundle),
                Choice::Other { program, .. } => Err(program.clone()),
            };
            let shipment = tokio::task::spawn_blocking(move || match choice {
                Ok(bundle) => {
                    if bundle && let Some(bundle) = Bundle::of_this_program()? {
                        return Ok(Shipment::Bundle(bundle));
                    }
                    identity::agent_file().map(Shipment::Program)
                }
                Err(program) => identity::file_digest(&program).map(|file| {
                    Shipment::Other(Arc::new(OtherBuild {
                        file,
                        source: program,
                    }))
                }),
            })
            .await
            .map_err(|error| spawn_error(format!("hashing this program failed: {error}")))?
            .map_err(|error| Error::Io {
                host: host.to_string(),
                phase: Phase::Bootstrap,
                error,
            })?;
            let command = bootstrap::command(shipment.clone(), depth, &heartbeat_ms, &platform);
            Ok((command, Some(shipment)))
        }
        _ => {
            let command = AgentCommand::new(format!("/proc/{}/exe", std::process::id()))
                .env(AGENT_MARKER, PROTOCOL_VERSION.to_string())
                .env(AGENT_DEPTH, depth.to_string())
                .env(AGENT_HEARTBEAT, heartbeat_ms);
            Ok((command, None))
        }
    }
}

/// Starts forwarding the agent's stderr and supervising its process;
/// returns the state the connection shares with both.
fn supervise_process(
    host: &Arc<str>,
    options: &ConnectOptions,
    stderr: Option<Box<dyn AsyncRead + Send + Unpin>>,
    process: Box<dyn AgentProcess>,
) -> Arc<Shared> {
    let tail = StderrTail::new();
    let stderr_task = match stderr {
        Some(pipe) => Some(tokio::spawn(stderr::forward(
            pipe,
            host.clone(),
            tail.clone(),
            options.stderr_sink.clone(),
        ))),
        None => {
            tail.mark_closed();
            None
        }
    };
    let (exit_sender, exit) = watch::channel(None);
    let (kill, kill_requested) = oneshot::channel();
    tokio::spawn(supervise(process, kill_requested, exit_sender, stderr_task));
    Arc::new(Shared::new(host.clone(), tail, exit, kill))
}

/// Runs the shell bootstrap's dialogue until it execs the agent.
async fn bootstrap(
    transport: &dyn Transport,
    shared: &Shared,
    shipment: Shipment,
    stdout: &mut Box<dyn AsyncRead + Send + Unpin>,
    stdin: &mut Box<dyn AsyncWrite + Send + Unpin>,
) -> std::result::Result<(), Attempt> {
    let failed = |message: String| Error::Bootstrap {
        host: shared.host.to_string(),
        message,
    };
    let outcome = bootstrap::dialogue(shipment, stdout, stdin)
        .await
        .map_err(|error| failed(format!("talking to the bootstrap script failed: {error}")))?;
    match outcome {
        Outcome::Exec { .. } => Ok(()),
        Outcome::Failed(message) => Err(failed(message).into()),
        Outcome::WrongPlatform(platform) => {
            let (os, arch) = identity::uname();
            let error = failed(format!(
                "the target runs {platform} but this program is built for {os} {arch}; \
                 build the program for the target's platform and name it with \
                 TunnelBuilder::program_for to call registered functions there"
            ));
            Err(Attempt::WrongPlatform { platform, error })
        }
        Outcome::Ended => Err(ended_early(transport, shared).await.into()),
    }
}

/// An agent that the shell bootstrap started alone and that ended before
/// its hello: for a dynamically linked program, the likely cause is a
/// target without its loader or with an older C library, and the fix is
/// the bundle.
fn with_loader_hint(error: Error) -> Error {
    let loader = crate::program_files::interpreter(&identity::program_path())
        .ok()
        .flatten();
    let Some(loader) = loader else {
        return error;
    };
    let hint = format!(
        "; this program needs the dynamic loader {} and a C library at least as new as its \
         own: if the target lacks them, TunnelBuilder::bundle_libraries(true) ships them with it",
        loader.display()
    );
    match error {
        Error::Spawn {
            host,
            message,
            cause,
        } => Error::Spawn {
            host,
            message: message + &hint,
            cause,
        },
        Error::Bootstrap { host, message } => Error::Bootstrap {
            host,
            message: message + &hint,
        },
        other => other,
    }
}

/// The agent's first frame, which must be its hello.
async fn read_hello(
    transport: &dyn Transport,
    shared: &Shared,
    frames: &mut Frames,
) -> Result<Hello> {
    let handshake = |message: String| Error::Handshake {
        host: shared.host.to_string(),
        message,
    };
    match frames.next().await {
        Some(Ok(Frame::Message(Message::Hello(hello)))) => Ok(hello),
        Some(Ok(other)) => Err(handshake(format!(
            "expected the agent's hello, received {}",
            other.kind()
        ))),
        Some(Err(error)) if error.kind() == std::io::ErrorKind::InvalidData => {
            Err(handshake(format!(
                "expected the agent's hello, but the process wrote something else to stdout ({error})"
            )))
        }
        Some(Err(error)) => Err(match ended_early(transport, shared).await {
            Error::Bootstrap { host, message, .. } => Error::Bootstrap {
                host,
                message: format!("{message} (reading its output failed: {error})"),
            },
            diagnosed => diagnosed,
        }),
        None => Err(ended_early(transport, shared).await),
    }
}

/// Checks the agent's hello; `Ok(true)` when it is another build of this
/// program, which the tunnel asked for (`other_build`).
fn check_hello(host: &str, hello: &Hello, other_build: bool) -> Result<bool> {
    if hello.protocol != PROTOCOL_VERSION {
        return Err(Error::Handshake {
            host: host.to_string(),
            message: format!(
                "the agent speaks protocol version {} but this program speaks version {PROTOCOL_VERSION}",
                hello.protocol
            ),
        });
    }
    let ours = identity::binary_id();
    if ours.is_empty() || hello.binary_id.is_empty() {
        return Err(Error::Handshake {
            host: host.to_string(),
            message: "a program without a build-id and unreadable through /proc/self/exe cannot \
                      prove it is the same binary as its agent"
                .into(),
        });
    }
    if hello.binary_id != ours && other_build {
        return Ok(true);
    }
    if hello.binary_id != ours {
        return Err(Error::Handshake {
            host: host.to_string(),
            message: format!(
                "the agent is a different program (binary id {}) than this one ({}); both ends must \
                 run the same binary",
                identity::peer_hex(&hello.binary_id),
                hex(ours)
            ),
        });
    }
    Ok(false)
}

/// An error and its causes, as one sentence: each is shown once, whether
/// a transport's error puts its cause in its own text or returns it as
/// `source()`.
fn chain_text(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(next) = cause {
        let part = next.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = next.source();
    }
    text
}

/// The error for a process that ended before its agent said hello.
async fn ended_early(transport: &dyn Transport, shared: &Shared) -> Error {
    shared.tail.wait_closed(EXPLAIN_WAIT).await;
    if let Some(diagnosis) = transport.diagnose(&shared.tail.snapshot()) {
        return Error::Spawn {
            host: shared.host.to_string(),
            message: chain_text(diagnosis.as_ref()),
            cause: Some(diagnosis),
        };
    }
    let mut exit = shared.exit.clone();
    let ending = tokio::time::timeout(Duration::from_secs(1), exit.wait_for(Option::is_some))
        .await
        .ok()
        .and_then(|ending| ending.ok().and_then(|ending| ending.clone()));
    let mut message = match ending {
        Some(Ending::Exited(status)) => format!("the process {status} before the agent started"),
        Some(Ending::Lost(why)) => format!("{why}, before the agent started"),
        None => "the process closed its output before the agent started".to_string(),
    };
    let tail = shared.tail.snapshot();
    if !tail.is_empty() {
        message.push_str(": ");
        message.push_str(&tail.join(" / "));
    }
    Error::Bootstrap {
        host: shared.host.to_string(),
        message,
    }
}

/// How long a killed agent may take to end before its supervisor stops waiting.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// Owns the process: records how it ended, and kills it when the connection goes away.
async fn supervise(
    mut process: Box<dyn AgentProcess>,
    kill_requested: oneshot::Receiver<()>,
    exit: watch::Sender<Option<Ending>>,
    stderr_task: Option<JoinHandle<()>>,
) {
    let status = tokio::select! {
        status = process.wait() => Some(status),
        _ = kill_requested => {
            let _ = process.start_kill();
            // A transport whose kill cannot be forced (an exec ends when its
            // stdin closes) must not keep this task waiting forever.
            // No exit status is published then: none is known.
            match tokio::time::timeout(KILL_WAIT, process.wait()).await {
                Ok(status) => Some(status),
                Err(_) => {
                    tracing::warn!("the agent did not end within {KILL_WAIT:?} of being killed");
                    None
                }
            }
        }
    };
    if let Some(status) = status {
        let ending = match status {
            Ok(status) => Ending::Exited(status),
            Err(error) => Ending::Lost(error.to_string().into()),
        };
        exit.send_replace(Some(ending));
    }
    if let Some(task) = stderr_task {
        // Give stderr a moment to drain; a grandchild holding it open must not keep the task alive.
        let abort = task.abort_handle();
        if tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .is_err()
        {
            abort.abort();
        }
    }
}
