//! What goes into a container: this program, and for a dynamically linked
//! program its dynamic loader and shared libraries, so that it runs in any
//! image of the same architecture, even one built `FROM scratch`.
//!
//! The files travel as a tar stream through the Engine's archive API, into
//! `/.chopsticks/<sha256>/`; the agent runs as
//! `lib/<loader> --library-path lib agent` (or `agent` itself when the
//! program is static), so nothing from the image is used. The marker
//! file, written last, carries the time of placing; an exec's agent keeps
//! the three most recently placed payloads and removes older ones
//! (`chopsticks-agent`'s `evict`).

use std::io::Read;
use std::path::PathBuf;

use chopsticks_core::__private::program_files::ProgramFiles;

use bytes::Bytes;
use futures_util::Stream;

/// Where the payload lives in a container.
pub(crate) const ROOT: &str = "/.chopsticks";

/// One file of the payload: core's description of the program's files.
pub(crate) use chopsticks_core::__private::program_files::ProgramFile as Entry;

/// The files, and how to start the agent from them.
#[derive(Debug, Clone)]
pub(crate) struct Payload {
    /// `/.chopsticks/<sha256 of this program>`.
    pub(crate) dir: String,
    pub(crate) entries: Vec<Entry>,
    /// The command that starts the agent in the container.
    pub(crate) command: Vec<String>,
}

impl Payload {
    /// The file written last: its presence means the whole payload arrived.
    pub(crate) const MARKER: &'static str = "complete";

    /// The marker's path in the container.
    pub(crate) fn marker(&self) -> String {
        format!("{}/{}", self.dir, Self::MARKER)
    }

    /// What the marker holds: the program's id.
    pub(crate) fn marker_content(&self) -> Vec<u8> {
        self.program_id().as_bytes().to_vec()
    }

    /// The program's id: the first 32 hex digits of its SHA-256, as in [`dir`](Self::dir).
    pub(crate) fn program_id(&self) -> &str {
        self.dir.rsplit('/').next().unwrap_or_default()
    }

    /// The payload for this program: the files core gathers (the program,
    /// and for a dynamically linked one its loader and libraries).
    pub(crate) fn for_this_program() -> std::io::Result<Payload> {
        let file = chopsticks_core::__private::identity::agent_file()?;
        let dir = format!("{ROOT}/{}", &file.sha256[..32]);
        let program = ProgramFiles::of_this_program()?;
        let command = match &program.loader {
            None => vec![format!("{dir}/agent")],
            Some(loader) => vec![
                format!("{dir}/lib/{loader}"),
                "--library-path".into(),
                format!("{dir}/lib"),
                format!("{dir}/agent"),
            ],
        };
        Ok(Payload {
            dir,
            entries: program.files,
            command,
        })
    }

    /// The agent's program file inside the container.
    pub(crate) fn program(&self) -> String {
        format!("{}/agent", self.dir)
    }

    /// The payload as a tar stream, read from the files as it goes.
    pub(crate) fn tar(&self) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
        let relative = self.dir.trim_start_matches('/').to_string();
        let mut items: Vec<(String, Option<Entry>)> = Vec::new();
        let mut path = String::new();
        for part in relative.split('/') {
            if !path.is_empty() {
                path.push('/');
            }
            path.push_str(part);
            items.push((format!("{path}/"), None));
        }
        items.push((format!("{relative}/lib/"), None));
        for entry in &self.entries {
            items.push((format!("{relative}/{}", entry.name), Some(entry.clone())));
        }
        let marker = self.marker_content();
        items.push((
            format!("{relative}/{}", Self::MARKER),
            Some(Entry {
                source: PathBuf::new(),
                name: Self::MARKER.into(),
                size: marker.len() as u64,
            }),
        ));
        futures_util::stream::unfold(
            TarState {
                items: items.into_iter(),
                current: None,
                finished: false,
            },
            |mut state| async move {
                let next = tokio::task::spawn_blocking(move || {
                    let chunk = state.next_chunk();
                    (chunk, state)
                })
                .await;
                match next {
                    Ok((Some(chunk), state)) => Some((chunk, state)),
                    Ok((None, _)) => None,
                    Err(error) => Some((
                        Err(std::io::Error::other(error.to_string())),
                        TarState {
                            items: Vec::new().into_iter(),
                            current: None,
                            finished: true,
                        },
                    )),
                }
            },
        )
    }
}

struct TarState {
    items: std::vec::IntoIter<(String, Option<Entry>)>,
    current: Option<(std::fs::File, u64)>,
    finished: bool,
}

const BLOCK: usize = 512;
const READ_CHUNK: usize = 1 << 20;

impl TarState {
    /// The next piece of the archive: a header, file data, or the end.
    fn next_chunk(&mut self) -> Option<Result<Bytes, std::io::Error>> {
        if let Some((file, left)) = self.current.as_mut() {
            let want = (*left).min(READ_CHUNK as u64) as usize;
            let mut data = vec![0u8; want];
            if let Err(error) = file.read_exact(&mut data) {
                self.finished = true;
                return Some(Err(error));
            }
            *left -= want as u64;
            if *left == 0 {
                self.current = None;
                let padding = (BLOCK - data.len() % BLOCK) % BLOCK;
                data.resize(data.len() + padding, 0);
            }
            return Some(Ok(Bytes::from(data)));
        }
        if self.finished {
            return None;
        }
        match self.items.next() {
            Some((name, None)) => Some(Ok(Bytes::from(header(&name, 0o755, 0, b'5', 0)))),
            Some((name, Some(entry))) if entry.source.as_os_str().is_empty() => {
                // The marker: its content is the payload directory's name.
                let content = name
                    .rsplit('/')
                    .nth(1)
                    .unwrap_or_default()
                    .as_bytes()
                    .to_vec();
                // Its modification time says when the payload was placed:
                // the agents of later builds keep the newest payloads.
                let placed = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |since| since.as_secs());
                let mut data = header(&name, 0o644, content.len() as u64, b'0', placed);
                data.extend_from_slice(&content);
                data.resize(data.len() + (BLOCK - content.len() % BLOCK) % BLOCK, 0);
                Some(Ok(Bytes::from(data)))
            }
            Some((name, Some(entry))) => {
                let file = match std::fs::File::open(&entry.source) {
                    Ok(file) => file,
                    Err(error) => {
                        self.finished = true;
                        return Some(Err(error));
                    }
                };
                if entry.size > 0 {
                    self.current = Some((file, entry.size));
                }
                Some(Ok(Bytes::from(header(&name, 0o755, entry.size, b'0', 0))))
            }
            None => {
                self.finished = true;
                Some(Ok(Bytes::from(vec![0u8; 2 * BLOCK])))
            }
        }
    }
}

/// A ustar header block.
fn header(name: &str, mode: u32, size: u64, kind: u8, mtime: u64) -> Vec<u8> {
    let mut block = vec![0u8; BLOCK];
    let (prefix, name) = if name.len() > 100 {
        let split = name[..name.len() - 100]
            .rfind('/')
            .or_else(|| name.rfind('/'))
            .unwrap_or(0);
        (&name[..split], &name[split + 1..])
    } else {
        ("", name)
    };
    block[..name.len().min(100)].copy_from_slice(&name.as_bytes()[..name.len().min(100)]);
    let octal = |block: &mut [u8], at: usize, width: usize, value: u64| {
        let text = format!("{value:0width$o}", width = width - 1);
        block[at..at + width - 1].copy_from_slice(&text.as_bytes()[text.len() - (width - 1)..]);
    };
    octal(&mut block, 100, 8, u64::from(mode));
    octal(&mut block, 108, 8, 0);
    octal(&mut block, 116, 8, 0);
    octal(&mut block, 124, 12, size);
    octal(&mut block, 136, 12, mtime);
    block[156] = kind;
    block[257..263].copy_from_slice(b"ustar\0");
    block[263..265].copy_from_slice(b"00");
    block[345..345 + prefix.len().min(155)]
        .copy_from_slice(&prefix.as_bytes()[..prefix.len().min(155)]);
    block[148..156].copy_from_slice(b"        ");
    let checksum: u32 = block.iter().map(|byte| u32::from(*byte)).sum();
    let text = format!("{checksum:06o}\0 ");
    block[148..156].copy_from_slice(text.as_bytes());
    block
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_program_has_its_loader_and_libraries() {
        let payload = Payload::for_this_program().expect("payload");
        assert_eq!(payload.entries[0].name, "agent");
        if payload.command.len() == 4 {
            assert_eq!(payload.command[1], "--library-path");
            assert!(
                payload
                    .entries
                    .iter()
                    .any(|entry| entry.name.contains("libc.so"))
            );
            assert!(payload.command[0].starts_with(&payload.dir));
        }
    }

    #[test]
    fn headers_checksum_and_split_long_names() {
        let block = header("a/b", 0o755, 10, b'0', 0);
        assert_eq!(&block[..3], b"a/b");
        assert_eq!(&block[124..135], b"00000000012");
        let long = format!("{}/{}", "d".repeat(120), "file");
        let block = header(&long, 0o644, 0, b'0', 0);
        assert_eq!(&block[..4], b"file");
        assert_eq!(&block[345..465], "d".repeat(120).as_bytes());
    }
}
