//! The Docker transport for chopsticks, over the Engine API ([bollard]).
//!
//! [`Docker::new`] runs the agent in a new container from any local image and
//! removes the container when the tunnel closes; [`Docker::exec`] runs it in a
//! container that is already running. No `docker` CLI and nothing in the
//! image are needed: the agent is placed through the archive API together
//! with its dynamic loader and shared libraries (a static program goes
//! alone), so images built `FROM scratch` work too.
//!
//! Every container chopsticks creates carries the label `chopsticks=agent`,
//! so leftovers can be listed with `docker ps -a --filter label=chopsticks`.
//!
//! ```
//! use chopsticks_docker::Docker;
//! use chopsticks_core::Transport;
//!
//! let docker = Docker::new("worker-1").image("debian:bookworm").keep(false);
//! assert_eq!(docker.host(), "worker-1");
//! ```

mod attach;
mod docker;
mod engine;
mod payload;
mod remembered;
mod volume;

pub use docker::Docker;
pub use engine::LABEL;

/// Why a container could not carry an agent. Every variant names the container.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DockerError {
    /// The Docker Engine could not be reached or answered with nonsense.
    #[error(
        "the Docker Engine is unreachable for container {container}: {message}; is dockerd \
         running, and is DOCKER_HOST right?"
    )]
    Engine {
        /// The container.
        container: String,
        /// What went wrong.
        message: String,
    },
    /// The image is not present locally.
    #[error(
        "container {container} cannot be created: image {image} is not present locally ({message}); \
         build, load or pull it first"
    )]
    ImageMissing {
        /// The container.
        container: String,
        /// The image.
        image: String,
        /// What the Engine said.
        message: String,
    },
    /// A container of that name exists already.
    #[error(
        "a container named {container} exists already ({message}); pick another name or remove it"
    )]
    NameConflict {
        /// The container.
        container: String,
        /// What the Engine said.
        message: String,
    },
    /// The container to exec into does not exist.
    #[error("there is no container {container} ({message})")]
    NoSuchContainer {
        /// The container.
        container: String,
        /// What the Engine said.
        message: String,
    },
    /// The container to exec into exists but is not running.
    #[error("container {container} is not running; start it before an exec ({message})")]
    NotRunning {
        /// The container.
        container: String,
        /// What the Engine said.
        message: String,
    },
    /// `Docker::new` without `.image(...)`.
    #[error("container {container} needs an image: use Docker::new(name).image(image)")]
    NoImage {
        /// The container.
        container: String,
    },
    /// A new container was asked to run another command than the agent (a
    /// `Become` around `Docker::new`); only an exec runs one.
    #[error(
        "a new container ({container}) runs only the agent, not `{program}`: wrap \
         Docker::exec of a running container instead"
    )]
    OnlyTheAgent {
        /// The container.
        container: String,
        /// The program that was to run.
        program: String,
    },
    /// The Engine refused a step.
    #[error(
        "the Docker Engine refused {phase} for container {container}{}: {message}",
        image_clause(image)
    )]
    Refused {
        /// The container.
        container: String,
        /// The image, when one was given.
        image: String,
        /// The step.
        phase: &'static str,
        /// What the Engine said.
        message: String,
    },
    /// The agent was placed but could not start in the container.
    #[error(
        "the agent cannot start in container {container}{}: {detail}; the image \
         must be for this machine's architecture, and the container must allow executing \
         files under /.chopsticks",
        image_clause(image)
    )]
    CannotStart {
        /// The container.
        container: String,
        /// The image, when one was given.
        image: String,
        /// What the container printed.
        detail: String,
    },
    /// The agent's files could not be gathered on this machine.
    #[error("the agent for container {container} cannot be prepared: {message}")]
    Payload {
        /// The container.
        container: String,
        /// What went wrong.
        message: String,
    },
}

/// ` (image NAME)`, or nothing for an exec, which has no image of its own.
fn image_clause(image: &str) -> String {
    if image.is_empty() {
        String::new()
    } else {
        format!(" (image {image})")
    }
}
