//! The controller's side of a command: the events of the streaming call
//! become an [`Output`], lines for the callback and the echo, or an error.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chopsticks_core::{Group, GroupResult, StderrSink, Tunnel};
use futures_util::StreamExt;

use crate::cmd::{Cmd, LineCallback};
use crate::error::CmdError;
use crate::output::{Capture, Captured, ExitStatus, Line, LineCutter, Output, OutputKind};
use crate::remote::{self, Event, Refusal};

/// Runs `cmd` on `tunnel`.
pub(crate) async fn run_on(tunnel: &Tunnel, mut cmd: Cmd) -> Result<Output, CmdError> {
    let mut collector = Collector::new(tunnel.host(), &cmd, tunnel.stderr_sink());
    let stdin = cmd.stdin_stream.take();
    let spec = cmd.spec;
    let mut events = match stdin {
        Some(input) => tunnel.call_stream_with_input(remote::run_command_fed, (spec,), input),
        None => tunnel.call_stream(remote::run_command, (spec,)),
    };
    while let Some(event) = events.next().await {
        collector.event(event?);
    }
    collector.finish()
}

/// Runs `cmd` on every host of `group` at once, under its `max_parallel`.
pub(crate) async fn run_on_group(group: &Group, cmd: Cmd) -> GroupResult<Output, CmdError> {
    if cmd.stdin_stream.is_some() {
        return group
            .hosts()
            .map(|host| (host.to_string(), Err(CmdError::StreamForGroup)))
            .collect();
    }
    let mut collectors: HashMap<String, Collector> = group
        .tunnels()
        .map(|tunnel| {
            let host = tunnel.host().to_string();
            (
                host,
                Collector::new(tunnel.host(), &cmd, tunnel.stderr_sink()),
            )
        })
        .collect();
    let mut events = group.call_stream(remote::run_command, (cmd.spec.clone(),));
    while let Some((host, event)) = events.next().await {
        if let Some(collector) = collectors.get_mut(host) {
            match event {
                Ok(event) => collector.event(event),
                Err(error) => collector.failed(CmdError::Tunnel(error)),
            }
        }
    }
    collectors
        .into_iter()
        .map(|(host, collector)| (host, collector.finish()))
        .collect()
}

/// One host's run, as its events come.
struct Collector {
    host: String,
    command: String,
    program: String,
    dir: Option<String>,
    timeout: Option<Duration>,
    check: bool,
    live: bool,
    /// Live runs capture here; quiet ones get the agent's capture.
    captures: [Capture; 2],
    captured: [Option<Captured>; 2],
    cutters: [LineCutter; 2],
    echo: Option<StderrSink>,
    on_line: Option<Arc<LineCallback>>,
    ended: Option<Result<Ended, CmdError>>,
}

struct Ended {
    status: ExitStatus,
    timed_out: bool,
    stdin_unread: u64,
}

impl Collector {
    fn new(host: &str, cmd: &Cmd, sink: &StderrSink) -> Collector {
        let limit = usize::try_from(cmd.spec.capture_limit).unwrap_or(usize::MAX);
        Collector {
            host: host.to_string(),
            command: cmd.words(),
            program: cmd.spec.program.clone(),
            dir: cmd.spec.current_dir.clone(),
            timeout: cmd.spec.timeout_ms.map(Duration::from_millis),
            check: cmd.check,
            live: cmd.spec.live,
            captures: [Capture::new(limit), Capture::new(limit)],
            captured: [None, None],
            cutters: [LineCutter::new(cmd.max_line), LineCutter::new(cmd.max_line)],
            echo: cmd.echo.then(|| sink.clone()),
            on_line: cmd.on_line.clone(),
            ended: None,
        }
    }

    fn event(&mut self, event: Event) {
        match event {
            Event::Tick => {}
            Event::Data { kind, bytes } => {
                self.captures[kind.index()].push(&bytes);
                let (echo, on_line, host) = (&self.echo, &self.on_line, &self.host);
                self.cutters[kind.index()].feed(&bytes, &mut |text, complete| {
                    deliver(echo, on_line, host, kind, text, complete);
                });
            }
            Event::Captured { kind, captured } => self.captured[kind.index()] = Some(captured),
            Event::Refused { why, message } => {
                let (host, command) = (self.host.clone(), self.command.clone());
                self.ended = Some(Err(match why {
                    Refusal::NotFound => CmdError::NotFound {
                        program: self.program.clone(),
                        host,
                        command,
                        message,
                    },
                    Refusal::BadDirectory => CmdError::BadDirectory {
                        host,
                        command,
                        dir: self.dir.clone().unwrap_or_default(),
                        message,
                    },
                    Refusal::NoSuchUser => CmdError::NoSuchUser {
                        host,
                        command,
                        message,
                    },
                    Refusal::Other => CmdError::Spawn {
                        host,
                        command,
                        message,
                    },
                }));
            }
            Event::Exited {
                status,
                timed_out,
                stdin_unread,
            } => {
                self.ended = Some(Ok(Ended {
                    status,
                    timed_out,
                    stdin_unread,
                }));
            }
        }
    }

    fn failed(&mut self, error: CmdError) {
        if !matches!(self.ended, Some(Err(_))) {
            self.ended = Some(Err(error));
        }
    }

    fn finish(mut self) -> Result<Output, CmdError> {
        for kind in [OutputKind::Stdout, OutputKind::Stderr] {
            let (echo, on_line, host) = (&self.echo, &self.on_line, &self.host);
            self.cutters[kind.index()].finish(&mut |text, complete| {
                deliver(echo, on_line, host, kind, text, complete);
            });
        }
        let (host, command) = (self.host, self.command);
        let ended = match self.ended {
            None => return Err(CmdError::Incomplete { host, command }),
            Some(Err(error)) => return Err(error),
            Some(Ok(ended)) => ended,
        };
        let [out, err] = if self.live {
            self.captures
                .map(|capture| capture.into_parts().into_bytes())
        } else {
            self.captured
                .map(|captured| captured.unwrap_or_default().into_bytes())
        };
        let output = Output {
            status: ended.status,
            stdout: out.0,
            stderr: err.0,
            dropped: [out.1, err.1],
        };
        if ended.timed_out {
            return Err(CmdError::TimedOut {
                host,
                command,
                after: self.timeout.unwrap_or_default(),
                output: Box::new(output),
            });
        }
        if ended.stdin_unread > 0 {
            return Err(CmdError::StdinNotRead {
                host,
                command,
                unread: ended.stdin_unread,
                output: Box::new(output),
            });
        }
        if self.check && !output.status.success() {
            return Err(CmdError::Failed {
                host,
                command,
                output: Box::new(output),
            });
        }
        Ok(output)
    }
}

/// Hands one line to the echo and the callback.
fn deliver(
    echo: &Option<StderrSink>,
    on_line: &Option<Arc<LineCallback>>,
    host: &str,
    kind: OutputKind,
    text: &[u8],
    complete: bool,
) {
    if let Some(sink) = echo {
        let marker = match kind {
            OutputKind::Stdout => "out",
            OutputKind::Stderr => "err",
        };
        sink(
            host,
            &format!("{marker}: {}", String::from_utf8_lossy(text)),
        );
    }
    if let Some(each) = on_line {
        each(&Line {
            host,
            kind,
            text,
            complete,
        });
    }
}
