//! [`Docker`]: the agent in a new container, or in a running one.

use std::collections::HashMap;
use std::io;

use bollard::models::{ContainerCreateBody, ExecConfig, HostConfig};
use bollard::query_parameters::{
    AttachContainerOptions, CreateContainerOptions, DownloadFromContainerOptions,
    UploadToContainerOptions, WaitContainerOptions,
};
use chopsticks_core::{
    AgentCommand, AgentLaunch, AgentProcess, BoxError, ExitReport, Pipes, Transport, async_trait,
};
use futures_util::StreamExt;

use crate::DockerError;
use crate::attach::pipes;
use crate::engine::{LABEL, remove};
use crate::payload::Payload;
use crate::remembered::Remembered;

#[derive(Debug, Clone)]
enum Target {
    /// A new container from this image.
    Create { image: String },
    /// A running container.
    Exec,
}

/// Runs the agent in a Docker container, through the Engine API only (no
/// `docker` CLI, no shell in the image).
///
/// [`Docker::new`] creates a container from an image, mounts the agent into
/// it read-only from a volume filled once per program through the archive
/// API (`chopsticks-agent-<sha>`, label `chopsticks=payload`), starts it
/// attached to stdin, stdout and stderr, and removes it when the tunnel
/// closes (unless [`keep`](Self::keep)). The Engine itself removes it when
/// the agent ends (`AutoRemove`), so a controller that is killed, or whose
/// connection to the Engine breaks, leaves no container behind: the attach
/// ends, the agent's stdin closes, the agent exits. The volumes stay for
/// the next container; `docker volume rm` removes them.
/// [`Docker::exec`] runs the agent in a running container and leaves the
/// container as it was. The agent brings its own dynamic loader and shared
/// libraries, so any image of the same architecture works, even `FROM scratch`.
///
/// ```no_run
/// use chopsticks_core::Tunnel;
/// use chopsticks_docker::Docker;
/// # use chopsticks_agent as _;
///
/// # async fn demo() -> chopsticks_core::Result<()> {
/// let tun = Tunnel::new(Docker::new("build-1").image("debian:bookworm").env("LANG", "C.UTF-8"));
/// let release: String = tun.call(|| std::fs::read_to_string("/etc/os-release").unwrap_or_default(), ()).await?;
/// tun.close().await?; // the container is removed
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Docker {
    name: String,
    target: Target,
    engine: Option<String>,
    user: Option<String>,
    env: Vec<(String, String)>,
    working_dir: Option<String>,
    network: Option<String>,
    mounts: Vec<String>,
    labels: Vec<(String, String)>,
    keep: bool,
}

impl Docker {
    /// A new container named `name`; set its [`image`](Self::image).
    pub fn new(name: impl Into<String>) -> Docker {
        Docker {
            name: name.into(),
            target: Target::Create {
                image: String::new(),
            },
            engine: None,
            user: None,
            env: Vec::new(),
            working_dir: None,
            network: None,
            mounts: Vec::new(),
            labels: Vec::new(),
            keep: false,
        }
    }

    /// The running container `container` (name or id), entered with `docker exec`.
    pub fn exec(container: impl Into<String>) -> Docker {
        Docker {
            target: Target::Exec,
            ..Docker::new(container)
        }
    }

    /// The image a new container is created from (it must be present locally).
    pub fn image(mut self, image: impl Into<String>) -> Docker {
        self.target = Target::Create {
            image: image.into(),
        };
        self
    }

    /// The Engine to talk to: `unix:///path`, `tcp://host:port` or
    /// `http://host:port` (default: `DOCKER_HOST`, else the local socket).
    pub fn engine(mut self, address: impl Into<String>) -> Docker {
        self.engine = Some(address.into());
        self
    }

    /// Runs the agent as this user (`uid`, `uid:gid` or a name the image knows).
    pub fn user(mut self, user: impl Into<String>) -> Docker {
        self.user = Some(user.into());
        self
    }

    /// Sets an environment variable for the agent.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Docker {
        self.env.push((key.into(), value.into()));
        self
    }

    /// The agent's working directory.
    pub fn working_dir(mut self, dir: impl Into<String>) -> Docker {
        self.working_dir = Some(dir.into());
        self
    }

    /// Attaches a new container to this network (`bridge`, `host`, `none` or a name).
    pub fn network(mut self, network: impl Into<String>) -> Docker {
        self.network = Some(network.into());
        self
    }

    /// Mounts into a new container, in `docker run -v` form: `/host:/container[:ro]`
    /// or `volume:/container`.
    pub fn mount(mut self, bind: impl Into<String>) -> Docker {
        self.mounts.push(bind.into());
        self
    }

    /// Adds a label to a new container (it always carries `chopsticks=agent`).
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Docker {
        self.labels.push((key.into(), value.into()));
        self
    }

    /// Keeps a new container after the tunnel closes (stopped, not removed),
    /// even when its controller dies.
    pub fn keep(mut self, keep: bool) -> Docker {
        self.keep = keep;
        self
    }

    fn image_name(&self) -> &str {
        match &self.target {
            Target::Create { image } => image,
            Target::Exec => "",
        }
    }

    /// A client for the Engine, with the API version negotiated once per
    /// address and process.
    async fn client(&self) -> Result<bollard::Docker, DockerError> {
        static CLIENTS: std::sync::Mutex<Vec<(Option<String>, bollard::Docker)>> =
            std::sync::Mutex::new(Vec::new());
        let lock = || CLIENTS.lock().unwrap_or_else(|poison| poison.into_inner());
        if let Some((_, client)) = lock().iter().find(|(address, _)| *address == self.engine) {
            return Ok(client.clone());
        }
        let client = self
            .connect_engine()?
            .negotiate_version()
            .await
            .map_err(|error| DockerError::Engine {
                container: self.name.clone(),
                message: format!("the Engine did not answer: {error}"),
            })?;
        lock().push((self.engine.clone(), client.clone()));
        Ok(client)
    }

    fn connect_engine(&self) -> Result<bollard::Docker, DockerError> {
        let unreachable = |error: bollard::errors::Error| DockerError::Engine {
            container: self.name.clone(),
            message: error.to_string(),
        };
        match &self.engine {
            None => bollard::Docker::connect_with_defaults().map_err(unreachable),
            Some(address) if address.starts_with("unix://") => {
                bollard::Docker::connect_with_unix(address, 120, bollard::API_DEFAULT_VERSION)
                    .map_err(unreachable)
            }
            Some(address) => {
                bollard::Docker::connect_with_http(address, 120, bollard::API_DEFAULT_VERSION)
                    .map_err(unreachable)
            }
        }
    }

    /// Maps an Engine error to what it means for this container.
    fn explain(&self, phase: &'static str, error: bollard::errors::Error) -> DockerError {
        use bollard::errors::Error;
        match error {
            Error::DockerResponseServerError {
                status_code: 404,
                message,
            } if phase == "creating the container" => DockerError::ImageMissing {
                container: self.name.clone(),
                image: self.image_name().to_string(),
                message,
            },
            Error::DockerResponseServerError {
                status_code: 404,
                message,
            } => DockerError::NoSuchContainer {
                container: self.name.clone(),
                message,
            },
            Error::DockerResponseServerError {
                status_code: 409,
                message,
            } if phase == "creating the container" => DockerError::NameConflict {
                container: self.name.clone(),
                message,
            },
            Error::DockerResponseServerError {
                status_code: 409,
                message,
            } if matches!(self.target, Target::Exec) && message.contains("is not running") => {
                DockerError::NotRunning {
                    container: self.name.clone(),
                    message,
                }
            }
            Error::DockerResponseServerError { message, .. } => DockerError::Refused {
                container: self.name.clone(),
                image: self.image_name().to_string(),
                phase,
                message,
            },
            other => DockerError::Engine {
                container: self.name.clone(),
                message: format!("{phase}: {other}"),
            },
        }
    }

    async fn create(
        &self,
        engine: &bollard::Docker,
        image: &str,
        payload: &Payload,
        agent_env: Vec<String>,
        payload_volume: Option<&str>,
    ) -> Result<String, DockerError> {
        let mut labels: HashMap<String, String> = self.labels.iter().cloned().collect();
        labels.insert(LABEL.into(), "agent".into());
        let mut binds = self.mounts.clone();
        if let Some(volume) = payload_volume {
            binds.push(format!("{volume}:{}:ro", payload.dir));
        }
        let body = ContainerCreateBody {
            image: Some(image.to_string()),
            cmd: Some(payload.command.clone()),
            entrypoint: Some(Vec::new()),
            env: Some(agent_env),
            user: self.user.clone(),
            working_dir: self.working_dir.clone(),
            labels: Some(labels),
            attach_stdin: Some(true),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            open_stdin: Some(true),
            stdin_once: Some(true),
            tty: Some(false),
            host_config: Some(HostConfig {
                // The Engine removes the container when the agent ends, with
                // or without a surviving controller.
                auto_remove: Some(!self.keep),
                network_mode: self.network.clone(),
                binds: (!binds.is_empty()).then_some(binds),
                ..HostConfig::default()
            }),
            ..ContainerCreateBody::default()
        };
        let options = CreateContainerOptions {
            name: Some(self.name.clone()),
            ..CreateContainerOptions::default()
        };
        // The request runs as its own task: if this connect is cancelled
        // while the Engine creates the container, the task removes it.
        let (reply, created) = tokio::sync::oneshot::channel();
        let requester = engine.clone();
        tokio::spawn(async move {
            let created = requester.create_container(Some(options), body).await;
            if let Err(Ok(orphan)) = reply.send(created) {
                remove(&requester, &orphan.id).await;
            }
        });
        let created = created
            .await
            .map_err(|_| DockerError::Engine {
                container: self.name.clone(),
                message: "the request to create the container was lost".into(),
            })?
            .map_err(|error| self.explain("creating the container", error))?;
        Ok(created.id)
    }

    async fn place(
        &self,
        engine: &bollard::Docker,
        container: &str,
        payload: &Payload,
    ) -> Result<(), DockerError> {
        let options = UploadToContainerOptions {
            path: "/".into(),
            ..UploadToContainerOptions::default()
        };
        engine
            .upload_to_container(
                container,
                Some(options),
                bollard::body_try_stream(payload.tar()),
            )
            .await
            .map_err(|error| self.explain("placing the agent in the container", error))
    }

    /// Whether a complete payload for this program is in the container already.
    async fn placed(
        &self,
        engine: &bollard::Docker,
        container: &str,
        payload: &Payload,
    ) -> Result<bool, DockerError> {
        let options = DownloadFromContainerOptions {
            path: payload.marker(),
        };
        let mut archive = Vec::new();
        let mut download = engine.download_from_container(container, Some(options));
        while let Some(chunk) = download.next().await {
            match chunk {
                Ok(bytes) => archive.extend_from_slice(&bytes),
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404,
                    message,
                }) => {
                    // A missing marker is a miss; a missing container is an error.
                    return if message.contains("No such container") {
                        Err(DockerError::NoSuchContainer {
                            container: self.name.clone(),
                            message,
                        })
                    } else {
                        Ok(false)
                    };
                }
                Err(error) => return Err(self.explain("looking for the agent", error)),
            }
        }
        let marker = payload.marker_content();
        Ok(archive
            .windows(marker.len())
            .any(|window| window == marker.as_slice()))
    }

    fn agent_env(&self, command: &AgentCommand, payload: &Payload) -> Vec<String> {
        let mut env: Vec<String> = self
            .env
            .iter()
            .chain(command.env_vars().iter())
            .map(|(key, value)| format!("{key}={value}"))
            .collect();
        // Its loader starts the agent, so /proc/self/exe names the loader.
        env.push(format!(
            "{}={}",
            chopsticks_core::__private::agent_env::AGENT_PROGRAM,
            payload.program()
        ));
        env
    }

    /// An exec's agent also removes older payloads in the container, keeping
    /// the three most recently placed (its own among them).
    fn exec_env(&self, command: &AgentCommand, payload: &Payload) -> Vec<String> {
        let mut env = self.agent_env(command, payload);
        env.push(format!(
            "{}={}",
            chopsticks_core::__private::agent_env::AGENT_EVICT,
            payload.dir
        ));
        env
    }
}

#[async_trait]
impl Transport for Docker {
    fn host(&self) -> &str {
        &self.name
    }

    fn launch(&self) -> AgentLaunch {
        // The agent is placed through the archive API, not by a shell script.
        AgentLaunch::Direct
    }

    fn diagnose(&self, stderr_tail: &[String]) -> Option<BoxError> {
        cannot_start(&self.name, self.image_name(), stderr_tail)
            .map(|error| Box::new(error) as BoxError)
    }

    async fn spawn(&self, command: &AgentCommand) -> Result<Pipes, BoxError> {
        let engine = self.client().await?;
        if !is_the_agent(command) {
            // A wrapper's command (`Become`'s sudo before the shell
            // bootstrap): run as given, in the running container.
            return match &self.target {
                Target::Exec => self.spawn_command(&engine, command).await,
                Target::Create { .. } => Err(Box::new(DockerError::OnlyTheAgent {
                    container: self.name.clone(),
                    program: command.program().to_string(),
                })),
            };
        }
        let payload = tokio::task::spawn_blocking(Payload::for_this_program)
            .await
            .map_err(|error| io::Error::other(error.to_string()))?
            .map_err(|error| DockerError::Payload {
                container: self.name.clone(),
                message: error.to_string(),
            })?;
        match &self.target {
            Target::Create { image } => self.spawn_new(&engine, command, &payload, image).await,
            Target::Exec => self.spawn_exec(&engine, command, &payload).await,
        }
    }
}

impl Docker {
    /// A new container from `image`, with the agent as its command.
    async fn spawn_new(
        &self,
        engine: &bollard::Docker,
        command: &AgentCommand,
        payload: &Payload,
        image: &str,
    ) -> Result<Pipes, BoxError> {
        if image.is_empty() {
            return Err(Box::new(DockerError::NoImage {
                container: self.name.clone(),
            }));
        }
        // Without the shared volume, the payload is uploaded into the container.
        let mut volume = crate::volume::ensure(engine, self.engine.as_deref(), image, payload)
            .await
            .ok();
        let env = self.agent_env(command, payload);
        let created = self
            .create(engine, image, payload, env.clone(), volume.as_deref())
            .await;
        let id = match created {
            // The Engine took the volume but not the mount (a policy, a
            // clash with the user's mounts): the payload is uploaded instead.
            Err(DockerError::Refused { .. }) if volume.is_some() => {
                volume = None;
                self.create(engine, image, payload, env, None).await?
            }
            created => created?,
        };
        // A connect that times out or is cancelled from here on must
        // not leave the container behind (a later connect would meet
        // its name).
        let mut unfinished = RemoveUnlessStarted {
            engine: Some(engine.clone()),
            id: id.clone(),
        };
        let started = async {
            let attach = AttachContainerOptions {
                stdin: true,
                stdout: true,
                stderr: true,
                stream: true,
                logs: true,
                ..AttachContainerOptions::default()
            };
            // Both must be done before the start; neither needs the other.
            let place = async {
                match volume {
                    Some(_) => Ok(()),
                    None => self.place(engine, &id, payload).await,
                }
            };
            let (placed, attached) =
                tokio::join!(place, engine.attach_container(&id, Some(attach)));
            placed?;
            let attached =
                attached.map_err(|error| self.explain("attaching to the container", error))?;
            engine
                .start_container(
                    &id,
                    None::<bollard::query_parameters::StartContainerOptions>,
                )
                .await
                .map_err(|error| self.explain("starting the container", error))?;
            Ok::<_, DockerError>(attached)
        };
        let attached = match started.await {
            Ok(attached) => attached,
            Err(error) => {
                remove(engine, &id).await;
                unfinished.engine = None;
                return Err(Box::new(error));
            }
        };
        unfinished.engine = None;
        let process = ContainerProcess {
            engine: engine.clone(),
            id: id.clone(),
            exec: None,
            remove: !self.keep,
        };
        Ok(pipes(attached.output, attached.input, Box::new(process)))
    }

    /// The agent as an exec in the running container.
    async fn spawn_exec(
        &self,
        engine: &bollard::Docker,
        command: &AgentCommand,
        payload: &Payload,
    ) -> Result<Pipes, BoxError> {
        let config = ExecConfig {
            attach_stdin: Some(true),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            tty: Some(false),
            cmd: Some(payload.command.clone()),
            env: Some(self.exec_env(command, payload)),
            user: self.user.clone(),
            working_dir: self.working_dir.clone(),
            ..ExecConfig::default()
        };
        // The payload stays in the container, so later tunnels skip the
        // upload. Containers already seen by this process (by id) skip
        // even the look, which reads the container's filesystem.
        let (inspected, exec) = tokio::join!(
            engine.inspect_container(
                &self.name,
                None::<bollard::query_parameters::InspectContainerOptions>
            ),
            engine.create_exec(&self.name, config)
        );
        let id = inspected
            .map_err(|error| self.explain("inspecting the container", error))?
            .id
            .unwrap_or_else(|| self.name.clone());
        // A stopped container refuses the exec: say so before placing anything in it.
        let exec = exec.map_err(|error| self.explain("creating the exec", error))?;
        if !PLACED.contains(&id, &payload.dir) {
            if !self.placed(engine, &id, payload).await? {
                self.place(engine, &id, payload).await?;
            }
            PLACED.insert(&id, &payload.dir);
        }
        self.start_exec(engine, exec.id).await
    }

    /// Any other command, as an exec in the running container: its argv
    /// and environment as given, no payload.
    async fn spawn_command(
        &self,
        engine: &bollard::Docker,
        command: &AgentCommand,
    ) -> Result<Pipes, BoxError> {
        let cmd: Vec<String> = std::iter::once(command.program().to_string())
            .chain(command.args().iter().cloned())
            .collect();
        let env: Vec<String> = self
            .env
            .iter()
            .chain(command.env_vars().iter())
            .map(|(key, value)| format!("{key}={value}"))
            .collect();
        let config = ExecConfig {
            attach_stdin: Some(true),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            tty: Some(false),
            cmd: Some(cmd),
            env: Some(env),
            user: self.user.clone(),
            working_dir: self.working_dir.clone(),
            ..ExecConfig::default()
        };
        let exec = engine
            .create_exec(&self.name, config)
            .await
            .map_err(|error| self.explain("creating the exec", error))?;
        self.start_exec(engine, exec.id).await
    }

    /// Starts a created exec, attached.
    async fn start_exec(&self, engine: &bollard::Docker, exec: String) -> Result<Pipes, BoxError> {
        let started = engine
            .start_exec(&exec, None)
            .await
            .map_err(|error| self.explain("starting the exec", error))?;
        let bollard::exec::StartExecResults::Attached { output, input } = started else {
            return Err(Box::new(DockerError::Engine {
                container: self.name.clone(),
                message: "the Engine started the exec detached".into(),
            }));
        };
        let process = ContainerProcess {
            engine: engine.clone(),
            id: self.name.clone(),
            exec: Some(exec),
            remove: false,
        };
        Ok(pipes(output, input, Box::new(process)))
    }
}

/// Whether `command` starts the agent itself (core's direct launch runs
/// this very program), rather than a wrapper's command around the shell
/// bootstrap.
fn is_the_agent(command: &AgentCommand) -> bool {
    command.program() == format!("/proc/{}/exe", std::process::id())
}

/// The error for an agent that the container could not run, from what it printed.
fn cannot_start(container: &str, image: &str, stderr_tail: &[String]) -> Option<DockerError> {
    const SIGNS: [&str; 4] = [
        "exec format error",
        "no such file or directory",
        "permission denied",
        "cannot execute",
    ];
    stderr_tail
        .iter()
        .rev()
        .find(|line| {
            let line = line.to_ascii_lowercase();
            SIGNS.iter().any(|sign| line.contains(sign))
        })
        .map(|line| DockerError::CannotStart {
            container: container.to_string(),
            image: image.to_string(),
            detail: line.clone(),
        })
}

/// Containers (by id) known to hold a payload directory, in this process.
/// Containers (by id) known to hold the payload (by directory), so a later
/// exec into them skips the look, which reads the container's filesystem.
static PLACED: Remembered = Remembered::new(1024);

/// Removes a created container when dropped armed, in the background: the
/// connect that created it was cancelled before the agent started.
struct RemoveUnlessStarted {
    /// `None` once the container is started (or removed another way).
    engine: Option<bollard::Docker>,
    id: String,
}

impl Drop for RemoveUnlessStarted {
    fn drop(&mut self) {
        if let (Some(engine), Ok(runtime)) =
            (self.engine.take(), tokio::runtime::Handle::try_current())
        {
            let id = std::mem::take(&mut self.id);
            runtime.spawn(async move { remove(&engine, &id).await });
        }
    }
}

/// The agent's container (or exec), as the tunnel's process.
struct ContainerProcess {
    engine: bollard::Docker,
    id: String,
    exec: Option<String>,
    remove: bool,
}

#[async_trait]
impl AgentProcess for ContainerProcess {
    fn id(&self) -> Option<u32> {
        None
    }

    fn start_kill(&mut self) -> io::Result<()> {
        let engine = self.engine.clone();
        let id = self.id.clone();
        match (&self.exec, self.remove) {
            // An exec ends when its stdin closes; the container stays.
            (Some(_), _) => {}
            (None, true) => {
                tokio::spawn(async move { remove(&engine, &id).await });
            }
            (None, false) => {
                tokio::spawn(async move {
                    let _ = engine
                        .kill_container(
                            &id,
                            None::<bollard::query_parameters::KillContainerOptions>,
                        )
                        .await;
                });
            }
        }
        Ok(())
    }

    async fn wait(&mut self) -> io::Result<ExitReport> {
        let report = match &self.exec {
            // The Engine has no wait for an exec: ask, quickly at first (an
            // agent that fails to start ends at once), then every 100 ms, within
            // the time a broken connection waits for the exit status.
            Some(exec) => {
                let mut pause = std::time::Duration::from_millis(20);
                loop {
                    match self.engine.inspect_exec(exec).await {
                        Ok(state) if state.running == Some(false) => {
                            break ExitReport {
                                code: state.exit_code.map(|code| code as i32),
                                signal: None,
                            };
                        }
                        Ok(_) => {
                            tokio::time::sleep(pause).await;
                            pause = (pause * 2).min(std::time::Duration::from_millis(100));
                        }
                        Err(_) => break ExitReport::default(),
                    }
                }
            }
            None => {
                let mut waiting = self
                    .engine
                    .wait_container(&self.id, None::<WaitContainerOptions>);
                let code = match waiting.next().await {
                    Some(Ok(response)) => Some(response.status_code as i32),
                    Some(Err(bollard::errors::Error::DockerContainerWaitError {
                        code, ..
                    })) => Some(code as i32),
                    _ => None,
                };
                if self.remove {
                    remove(&self.engine, &self.id).await;
                }
                ExitReport { code, signal: None }
            }
        };
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_failures_are_recognised() {
        let lines = vec![
            "OCI runtime exec failed: exec failed: unable to start container process: exec: \"/.chopsticks/x/agent\": exec format error: unknown".to_string(),
        ];
        let error = cannot_start("c1", "img", &lines).expect("recognised");
        assert!(matches!(error, DockerError::CannotStart { .. }));
        assert!(error.to_string().contains("c1") && error.to_string().contains("img"));
        assert!(cannot_start("c1", "img", &["all fine".to_string()]).is_none());
    }
}
