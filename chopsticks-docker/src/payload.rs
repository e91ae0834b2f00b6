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

use std::ffi::CStr;
use std::io::Read;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures_util::Stream;

/// Where the payload lives in a container.
pub(crate) const ROOT: &str = "/.chopsticks";

/// One file of the payload.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// Where it comes from on this machine (empty for [`Payload::MARKER`], written from memory).
    pub(crate) source: PathBuf,
    /// Its path inside the payload directory.
    pub(crate) name: String,
    pub(crate) size: u64,
}

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

    /// The payload for this program.
    pub(crate) fn for_this_program() -> std::io::Result<Payload> {
        let file = chopsticks_core::__private::identity::agent_file()?;
        let dir = format!("{ROOT}/{}", &file.sha256[..32]);
        let exe = PathBuf::from(chopsticks_core::__private::identity::SELF_EXE);
        let mut entries = vec![Entry {
            size: std::fs::metadata(&exe)?.len(),
            source: exe.clone(),
            name: "agent".into(),
        }];
        let command = match interpreter(&exe)? {
            None => vec![format!("{dir}/agent")],
            Some(loader) => {
                let loader_name = file_name(&loader);
                for library in loaded_objects() {
                    let name = file_name(&library);
                    if entries
                        .iter()
                        .any(|entry| entry.name == format!("lib/{name}"))
                    {
                        continue;
                    }
                    if let Ok(metadata) = std::fs::metadata(&library)
                        && metadata.is_file()
                    {
                        entries.push(Entry {
                            source: library,
                            name: format!("lib/{name}"),
                            size: metadata.len(),
                        });
                    }
                }
                if !entries
                    .iter()
                    .any(|entry| entry.name == format!("lib/{loader_name}"))
                {
                    entries.push(Entry {
                        size: std::fs::metadata(&loader)?.len(),
                        source: loader,
                        name: format!("lib/{loader_name}"),
                    });
                }
                vec![
                    format!("{dir}/lib/{loader_name}"),
                    "--library-path".into(),
                    format!("{dir}/lib"),
                    format!("{dir}/agent"),
                ]
            }
        };
        Ok(Payload {
            dir,
            entries,
            command,
        })
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

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// An unsigned little-endian integer of up to 8 bytes.
fn little_endian(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .rev()
        .fold(0, |value, byte| (value << 8) | u64::from(*byte))
}

/// The ELF interpreter (dynamic loader) of `exe`, or `None` for a static program.
fn interpreter(exe: &Path) -> std::io::Result<Option<PathBuf>> {
    let mut file = std::fs::File::open(exe)?;
    let mut header = [0u8; 64];
    file.read_exact(&mut header)?;
    if &header[..4] != b"\x7fELF" || header[4] != 2 || header[5] != 1 {
        return Err(std::io::Error::other(
            "this program is not a 64-bit little-endian ELF file",
        ));
    }
    let (table, entry_size, count) = (
        little_endian(&header[0x20..0x28]),
        little_endian(&header[0x36..0x38]),
        little_endian(&header[0x38..0x3a]),
    );
    let mut table_bytes = vec![0u8; (entry_size * count) as usize];
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(table))?;
    file.read_exact(&mut table_bytes)?;
    for entry in table_bytes.chunks(entry_size as usize) {
        const PT_INTERP: u64 = 3;
        if little_endian(&entry[0..4]) == PT_INTERP {
            let (offset, size) = (little_endian(&entry[8..16]), little_endian(&entry[32..40]));
            let mut path = vec![0u8; size as usize];
            std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(offset))?;
            file.read_exact(&mut path)?;
            let path = CStr::from_bytes_until_nul(&path)
                .map_err(|error| std::io::Error::other(error.to_string()))?;
            return Ok(Some(PathBuf::from(path.to_string_lossy().into_owned())));
        }
    }
    Ok(None)
}

/// The shared objects the loader opened for this process, by the names it looked up.
fn loaded_objects() -> Vec<PathBuf> {
    unsafe extern "C" fn visit(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: dl_iterate_phdr passes a valid info pointer, and `data` is the
        // `Vec` handed to it below, used only during the call.
        let (info, objects) = unsafe { (&*info, &mut *data.cast::<Vec<PathBuf>>()) };
        if !info.dlpi_name.is_null() {
            // SAFETY: dlpi_name is a NUL-terminated string owned by the loader.
            let name = unsafe { CStr::from_ptr(info.dlpi_name) };
            if !name.to_bytes().is_empty() {
                objects.push(PathBuf::from(name.to_string_lossy().into_owned()));
            }
        }
        0
    }
    let mut objects: Vec<PathBuf> = Vec::new();
    // SAFETY: the callback only reads the info it is given and appends to `objects`.
    unsafe {
        libc::dl_iterate_phdr(Some(visit), (&mut objects as *mut Vec<PathBuf>).cast());
    }
    objects
        .into_iter()
        .filter(|path| path.is_absolute())
        .collect()
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
