//! The shared payload volume: the agent's files, placed once per Engine and
//! program, mounted read-only into every container [`Docker::new`] creates.
//!
//! Uploading the payload (this program, its loader and libraries: tens of
//! MiB) into each new container cost about a third of a `docker run`. So the
//! files go once into the named volume `chopsticks-agent-<sha>`, through a
//! helper container that is created from the same image, never started, and
//! removed. Only after that upload succeeded is a second, empty volume
//! `chopsticks-agent-<sha>.complete` created: its existence marks the payload
//! volume complete, and costs one inspect to check. Both carry the label
//! `chopsticks=payload`.
//!
//! Containers mount the payload volume read-only, so code in one container
//! cannot change the agent that another one runs. When the volume cannot be
//! used (a volume policy, an Engine that refuses), the caller uploads the
//! payload into the container itself, as [`Docker::exec`] does.
//!
//! [`Docker::new`]: crate::Docker::new
//! [`Docker::exec`]: crate::Docker::exec

use std::collections::HashMap;

use bollard::errors::Error;
use bollard::models::{ContainerCreateBody, HostConfig, VolumeCreateOptions};
use bollard::query_parameters::{
    CreateContainerOptions, RemoveContainerOptions, UploadToContainerOptions,
};

use crate::docker::LABEL;
use crate::payload::Payload;

/// The value of [`LABEL`] on payload volumes.
pub(crate) const PAYLOAD_LABEL: &str = "payload";

/// The payload volume for `payload`.
pub(crate) fn volume_name(payload: &Payload) -> String {
    format!("chopsticks-agent-{}", payload.program_id())
}

/// The volume whose existence marks the payload volume complete.
fn marker_name(payload: &Payload) -> String {
    format!("{}.complete", volume_name(payload))
}

/// Payload volumes known complete in this process, by Engine address.
static KNOWN: std::sync::Mutex<Vec<(Option<String>, String)>> = std::sync::Mutex::new(Vec::new());

fn known(engine: Option<&str>, volume: &str) -> bool {
    KNOWN
        .lock()
        .unwrap_or_else(|poison| poison.into_inner())
        .iter()
        .any(|(address, known)| address.as_deref() == engine && known == volume)
}

fn remember(engine: Option<&str>, volume: &str) {
    let mut known = KNOWN.lock().unwrap_or_else(|poison| poison.into_inner());
    if known.len() >= 64 {
        known.remove(0);
    }
    known.push((engine.map(str::to_string), volume.to_string()));
}

/// Makes sure the payload volume is complete, filling it through a helper
/// container from `image` if needed; returns its name.
pub(crate) async fn ensure(
    engine: &bollard::Docker,
    address: Option<&str>,
    image: &str,
    payload: &Payload,
) -> Result<String, Error> {
    // Tunnels of one process fill the volume one at a time; the others then find it complete.
    static FILLING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let volume = volume_name(payload);
    if known(address, &volume) {
        return Ok(volume);
    }
    if is_complete(engine, payload).await? {
        remember(address, &volume);
        return Ok(volume);
    }
    let _filling = FILLING.lock().await;
    if is_complete(engine, payload).await? {
        remember(address, &volume);
        return Ok(volume);
    }
    engine
        .create_volume(VolumeCreateOptions {
            name: Some(volume.clone()),
            labels: Some(labels(payload)),
            ..VolumeCreateOptions::default()
        })
        .await?;
    fill(engine, image, &volume, payload).await?;
    engine
        .create_volume(VolumeCreateOptions {
            name: Some(marker_name(payload)),
            labels: Some(labels(payload)),
            ..VolumeCreateOptions::default()
        })
        .await?;
    remember(address, &volume);
    Ok(volume)
}

fn labels(payload: &Payload) -> HashMap<String, String> {
    HashMap::from([
        (LABEL.to_string(), PAYLOAD_LABEL.to_string()),
        (format!("{LABEL}.program"), payload.program_id().to_string()),
    ])
}

/// Whether both the marker and the payload volume exist (a payload volume
/// removed on its own is filled again rather than mounted empty).
async fn is_complete(engine: &bollard::Docker, payload: &Payload) -> Result<bool, Error> {
    let (marker, volume) = (marker_name(payload), volume_name(payload));
    let (marker, volume) = tokio::join!(
        engine.inspect_volume(&marker),
        engine.inspect_volume(&volume)
    );
    let exists = |inspected: Result<_, Error>| match inspected {
        Ok(_) => Ok(true),
        Err(Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(false),
        Err(error) => Err(error),
    };
    Ok(exists(marker)? && exists(volume)?)
}

/// Uploads the payload into `volume` through a helper container that never starts.
async fn fill(
    engine: &bollard::Docker,
    image: &str,
    volume: &str,
    payload: &Payload,
) -> Result<(), Error> {
    let helper = ContainerCreateBody {
        image: Some(image.to_string()),
        cmd: Some(payload.command.clone()),
        entrypoint: Some(Vec::new()),
        labels: Some(HashMap::from([(LABEL.to_string(), "helper".to_string())])),
        network_disabled: Some(true),
        host_config: Some(HostConfig {
            binds: Some(vec![format!("{volume}:{}", payload.dir)]),
            network_mode: Some("none".into()),
            ..HostConfig::default()
        }),
        ..ContainerCreateBody::default()
    };
    let created = engine
        .create_container(None::<CreateContainerOptions>, helper)
        .await?;
    let options = UploadToContainerOptions {
        path: "/".into(),
        ..UploadToContainerOptions::default()
    };
    let uploaded = engine
        .upload_to_container(
            &created.id,
            Some(options),
            bollard::body_try_stream(payload.tar()),
        )
        .await;
    let options = RemoveContainerOptions {
        force: true,
        ..RemoveContainerOptions::default()
    };
    let _ = engine.remove_container(&created.id, Some(options)).await;
    uploaded
}
