//! What the container and volume code share about the Engine: the label on
//! everything chopsticks creates, and removing a container.

use bollard::query_parameters::RemoveContainerOptions;

/// The label every container and volume chopsticks creates carries, so
/// leftovers can be found (`docker ps -a --filter label=chopsticks`): `agent`
/// on containers running the agent, `payload` on the agent's volumes
/// (`docker volume ls --filter label=chopsticks=payload`).
pub const LABEL: &str = "chopsticks";

/// Removes a container, forcing it to stop first, with its anonymous volumes
/// (as `docker run --rm` does).
pub(crate) async fn remove(engine: &bollard::Docker, id: &str) {
    let options = RemoveContainerOptions {
        force: true,
        v: true,
        ..RemoveContainerOptions::default()
    };
    let _ = engine.remove_container(id, Some(options)).await;
}
