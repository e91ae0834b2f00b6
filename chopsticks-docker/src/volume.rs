//! The shared payload volume: the agent's files, placed once per Engine and
//! program, mounted read-only into every container [`Docker::new`] creates.
//!
//! Uploading the payload (this program, its loader and libraries: tens of
//! MiB) into each new container cost about a third of a `docker run`. So the
//! files go once into the named volume `chopsticks-agent-<sha>`, through a
//! helper container that is created from the same image, never started, and
//! removed. Only after that upload succeeded is a second, empty volume
//! `chopsticks-agent-<sha>.complete` created: its existence marks the payload
//! volume complete, and costs one inspect to check: it records when the
//! payload volume was created, so a payload volume removed and created again
//! (by hand, or empty by a later bind) is filled again, never mounted empty.
//! Both carry the label `chopsticks=payload`.
//!
//! The helper container has a fixed name, `chopsticks-fill-<id>`, so two
//! processes never fill the same volume at once: the one that cannot create
//! the helper uploads into its own container instead. The fill runs as its
//! own task, so a connect that is cancelled half-way still removes the helper.
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
use bollard::models::{ContainerCreateBody, HostConfig, Volume, VolumeCreateOptions};
use bollard::query_parameters::{
    CreateContainerOptions, InspectContainerOptions, RemoveVolumeOptions, UploadToContainerOptions,
};

use crate::engine::{LABEL, remove};
use crate::payload::Payload;
use crate::remembered::Remembered;

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

/// Engines (by address, "" for the default) that refused a payload volume
/// in this process, and payload volumes known complete: later tunnels skip
/// the requests.
static REFUSED: Remembered = Remembered::new(64);
static KNOWN: Remembered = Remembered::new(64);

/// The label on the marker naming when the payload volume it vouches for was created.
fn created_label() -> String {
    format!("{LABEL}.payload-created")
}

/// A helper older than this is taken for the leftover of a process that died filling.
const STALE_HELPER_SECS: u64 = 600;

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or_default()
}

/// Makes sure the payload volume is complete, filling it through a helper
/// container from `image` if needed; returns its name. An error means the
/// payload should be uploaded into the container instead.
pub(crate) async fn ensure(
    engine: &bollard::Docker,
    address: Option<&str>,
    image: &str,
    payload: &Payload,
) -> Result<String, Error> {
    // Tunnels of one process fill one at a time; the others then find the volume complete.
    static FILLING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let volume = volume_name(payload);
    let address = address.unwrap_or_default();
    if KNOWN.contains(address, &volume) {
        return Ok(volume);
    }
    if REFUSED.contains(address, &volume) {
        return Err(Error::DockerResponseServerError {
            status_code: 403,
            message: "this Engine refused a payload volume before".into(),
        });
    }
    if is_complete(engine, payload).await? {
        KNOWN.insert(address, &volume);
        return Ok(volume);
    }
    let _filling = FILLING.lock().await;
    if is_complete(engine, payload).await? {
        KNOWN.insert(address, &volume);
        return Ok(volume);
    }
    // Its own task: a cancelled connect must not leave the helper behind.
    let filled = tokio::spawn(fill(engine.clone(), image.to_string(), payload.clone()));
    match filled.await {
        Ok(Ok(())) => {
            KNOWN.insert(address, &volume);
            Ok(volume)
        }
        Ok(Err(error)) => {
            // Another process filling right now is no reason to give up for good.
            let busy = matches!(
                error,
                Error::DockerResponseServerError {
                    status_code: 409,
                    ..
                }
            );
            if !busy {
                REFUSED.insert(address, &volume);
            }
            Err(error)
        }
        Err(join) => Err(Error::IOError {
            err: std::io::Error::other(join.to_string()),
        }),
    }
}

fn labels(payload: &Payload) -> HashMap<String, String> {
    HashMap::from([
        (LABEL.to_string(), PAYLOAD_LABEL.to_string()),
        (format!("{LABEL}.program"), payload.program_id().to_string()),
    ])
}

/// How the payload volume was created, as the marker records it.
fn creation(volume: &Volume) -> String {
    volume
        .created_at
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default()
}

/// Whether the marker exists and vouches for the payload volume as it is now.
async fn is_complete(engine: &bollard::Docker, payload: &Payload) -> Result<bool, Error> {
    let (marker, volume) = (marker_name(payload), volume_name(payload));
    let (marker, volume) = tokio::join!(
        engine.inspect_volume(&marker),
        engine.inspect_volume(&volume)
    );
    let found = |inspected: Result<Volume, Error>| match inspected {
        Ok(volume) => Ok(Some(volume)),
        Err(Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(None),
        Err(error) => Err(error),
    };
    Ok(match (found(marker)?, found(volume)?) {
        (Some(marker), Some(volume)) => {
            marker.labels.get(&created_label()) == Some(&creation(&volume))
        }
        _ => false,
    })
}

/// Fills the payload volume through a helper container that never starts,
/// then marks it complete. The helper's fixed name keeps other processes out.
async fn fill(engine: bollard::Docker, image: String, payload: Payload) -> Result<(), Error> {
    let volume = volume_name(&payload);
    let helper_name = format!("chopsticks-fill-{}", payload.program_id());
    let helper = ContainerCreateBody {
        image: Some(image),
        cmd: Some(payload.command.clone()),
        entrypoint: Some(Vec::new()),
        labels: Some(HashMap::from([
            (LABEL.to_string(), "helper".to_string()),
            (format!("{LABEL}.started"), unix_now().to_string()),
        ])),
        network_disabled: Some(true),
        host_config: Some(HostConfig {
            // nocopy: nothing from the image goes into the volume.
            binds: Some(vec![format!("{volume}:{}:nocopy", payload.dir)]),
            network_mode: Some("none".into()),
            ..HostConfig::default()
        }),
        ..ContainerCreateBody::default()
    };
    let options = || CreateContainerOptions {
        name: Some(helper_name.clone()),
        ..CreateContainerOptions::default()
    };
    // The old marker goes first: a fill that dies half-way leaves none.
    match engine
        .remove_volume(&marker_name(&payload), None::<RemoveVolumeOptions>)
        .await
    {
        Ok(())
        | Err(Error::DockerResponseServerError {
            status_code: 404, ..
        }) => {}
        Err(error) => return Err(error),
    }
    // A volume of that name without our label was made by something else (a
    // bind to a missing volume creates an empty one): it is replaced.
    match engine.inspect_volume(&volume).await {
        Ok(found) if found.labels.get(LABEL).map(String::as_str) != Some(PAYLOAD_LABEL) => {
            engine
                .remove_volume(&volume, None::<RemoveVolumeOptions>)
                .await?;
        }
        Ok(_)
        | Err(Error::DockerResponseServerError {
            status_code: 404, ..
        }) => {}
        Err(error) => return Err(error),
    }
    engine
        .create_volume(VolumeCreateOptions {
            name: Some(volume.clone()),
            labels: Some(labels(&payload)),
            ..VolumeCreateOptions::default()
        })
        .await?;
    let created = match engine
        .create_container(Some(options()), helper.clone())
        .await
    {
        Err(Error::DockerResponseServerError {
            status_code: 409, ..
        }) if remove_stale_helper(&engine, &helper_name).await => {
            engine.create_container(Some(options()), helper).await?
        }
        created => created?,
    };
    let filled = async {
        let upload = UploadToContainerOptions {
            path: "/".into(),
            ..UploadToContainerOptions::default()
        };
        engine
            .upload_to_container(
                &created.id,
                Some(upload),
                bollard::body_try_stream(payload.tar()),
            )
            .await?;
        let filled_volume = engine.inspect_volume(&volume).await?;
        let mut marker_labels = labels(&payload);
        marker_labels.insert(created_label(), creation(&filled_volume));
        engine
            .create_volume(VolumeCreateOptions {
                name: Some(marker_name(&payload)),
                labels: Some(marker_labels),
                ..VolumeCreateOptions::default()
            })
            .await?;
        Ok::<_, Error>(())
    }
    .await;
    remove(&engine, &created.id).await;
    filled
}

/// Removes the helper `name` if a process that died filling left it; true if it did.
async fn remove_stale_helper(engine: &bollard::Docker, name: &str) -> bool {
    let Ok(helper) = engine
        .inspect_container(name, None::<InspectContainerOptions>)
        .await
    else {
        return false;
    };
    let started = helper
        .config
        .and_then(|config| config.labels)
        .and_then(|labels| labels.get(&format!("{LABEL}.started")).cloned())
        .and_then(|started| started.parse::<u64>().ok())
        .unwrap_or(0);
    if unix_now().saturating_sub(started) < STALE_HELPER_SECS {
        return false;
    }
    remove(engine, name).await;
    true
}
