//! Who this process is: its binary id, the agent file's content hash, its OS and architecture.

use std::ffi::CStr;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use sha2::{Digest, Sha256};

/// The path through which a process reaches its own executable, even after the file was replaced.
pub const SELF_EXE: &str = "/proc/self/exe";

/// The identity of the running binary: its GNU build-id when the linker
/// wrote one, otherwise the SHA-256 of its file. Computed once.
pub fn binary_id() -> &'static [u8] {
    static ID: OnceLock<Vec<u8>> = OnceLock::new();
    ID.get_or_init(|| {
        build_id()
            .or_else(|| {
                agent_file()
                    .ok()
                    .map(|file| file.sha256.as_bytes().to_vec())
            })
            .unwrap_or_default()
    })
}

/// The agent file the shell bootstrap uploads: this program's bytes, their length and SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentFile {
    /// Length in bytes.
    pub size: u64,
    /// Lowercase hex SHA-256 of the content.
    pub sha256: String,
}

/// This program's file, when a loader started it and `/proc/self/exe` names
/// the loader instead (set by the agent runtime from `CHOPSTICKS_PROGRAM`).
static PROGRAM: OnceLock<PathBuf> = OnceLock::new();

/// Records where this program's file is, for a process that a dynamic
/// loader started (`ld.so --library-path lib agent`).
pub fn set_program_path(path: PathBuf) {
    let _ = PROGRAM.set(path);
}

/// This program's file: `/proc/self/exe`, unless a loader started it.
pub fn program_path() -> PathBuf {
    PROGRAM
        .get()
        .cloned()
        .unwrap_or_else(|| PathBuf::from(SELF_EXE))
}

/// Hashes this program's file once per process, remembering the digest
/// across runs (see [`file_digest`]).
pub fn agent_file() -> io::Result<&'static AgentFile> {
    static FILE: OnceLock<AgentFile> = OnceLock::new();
    if let Some(file) = FILE.get() {
        return Ok(file);
    }
    let digest = file_digest(&program_path())?;
    Ok(FILE.get_or_init(|| digest))
}

/// The size and SHA-256 of the file at `path`, remembered across runs in
/// the controller's cache directory, keyed by the file's identity and
/// times (see `digest_cache`).
pub fn file_digest(path: &Path) -> io::Result<AgentFile> {
    let mut reader = std::fs::File::open(path)?;
    let size = reader.metadata()?.len();
    // The cache knows a program by its path; /proc/self/exe names the link.
    let program = match path == Path::new(SELF_EXE) {
        true => std::fs::read_link(path).unwrap_or_else(|_| path.to_path_buf()),
        false => path.to_path_buf(),
    };
    let cache = crate::digest_cache::directory();
    if let Some(sha256) = cache
        .as_deref()
        .and_then(|cache| crate::digest_cache::recall(cache, &program, &reader))
    {
        return Ok(AgentFile { size, sha256 });
    }
    let sha256 = match system_sha256(&mut reader, size) {
        Some(sha256) => sha256,
        None => {
            std::io::Seek::rewind(&mut reader)?;
            sha256_in_process(&mut reader, size)?
        }
    };
    if let Some(cache) = &cache {
        crate::digest_cache::remember(cache, &program, &reader, &sha256);
    }
    Ok(AgentFile { size, sha256 })
}

/// The SHA-256 of `size` bytes from `reader`, computed here.
fn sha256_in_process(reader: &mut std::fs::File, size: u64) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut hashed = 0u64;
    loop {
        let read = reader.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
        hashed += read as u64;
    }
    if hashed != size {
        return Err(io::Error::other(format!(
            "this program's file changed while it was hashed ({size} bytes, then {hashed})"
        )));
    }
    Ok(hex(&hasher.finalize()))
}

/// The SHA-256 of the file `reader` reads, from the system's `openssl` or
/// `sha256sum` (the tools the bootstrap uses on targets), used in builds
/// with debug assertions (unoptimised, as a rule) and only for a large
/// program.
///
/// Unoptimised, the `sha2` crate hashes about 12 MB/s, and a debug build
/// is 40–70 MB: seconds on the first run after every build. The tools are
/// compiled optimised and read the same open file as their input. Any
/// failure (no such tool, odd output, more than 30 s) gives `None`, and
/// the caller hashes in process.
fn system_sha256(reader: &mut std::fs::File, size: u64) -> Option<String> {
    const WORTH_IT: u64 = 4 << 20;
    if !cfg!(debug_assertions) || size < WORTH_IT {
        return None;
    }
    let tools: [(&str, &[&str]); 2] = [("openssl", &["dgst", "-sha256", "-r"]), ("sha256sum", &[])];
    tools.iter().find_map(|(tool, args)| {
        // The tool reads through a descriptor that shares this one's offset.
        std::io::Seek::rewind(reader).ok()?;
        digest_with(tool, args, reader)
    })
}

/// Runs `tool args` with `input` as its standard input, and takes the
/// 64 hex digits it prints first; at most 30 s.
fn digest_with(tool: &str, args: &[&str], input: &std::fs::File) -> Option<String> {
    let mut child = std::process::Command::new(tool)
        .args(args)
        .stdin(input.try_clone().ok()?)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    };
    let mut output = String::new();
    child
        .stdout
        .take()?
        .take(256)
        .read_to_string(&mut output)
        .ok()?;
    let digest = output.split_whitespace().next()?;
    let valid = status.success()
        && digest.len() == 64
        && digest
            .bytes()
            .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte));
    valid.then(|| digest.to_string())
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(text, "{byte:02x}");
    }
    text
}

/// Lowercase hex of bytes a peer sent (a binary id, a checksum), at most
/// 64 of them: anything longer is cut and its length given.
pub fn peer_hex(bytes: &[u8]) -> String {
    const SHOWN: usize = 64;
    if bytes.len() <= SHOWN {
        return hex(bytes);
    }
    format!("{}… ({} bytes)", hex(&bytes[..SHOWN]), bytes.len())
}

/// `uname -s` and `uname -m` of this machine, as the bootstrap script sees them.
pub fn uname() -> (String, String) {
    // SAFETY: utsname is plain old data; an all-zero value is valid.
    let mut name: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `name` is a valid, writable utsname.
    if unsafe { libc::uname(&mut name) } != 0 {
        return (std::env::consts::OS.into(), std::env::consts::ARCH.into());
    }
    let field = |chars: &[libc::c_char]| {
        // SAFETY: uname NUL-terminates every field within its array.
        unsafe { CStr::from_ptr(chars.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    };
    (field(&name.sysname), field(&name.machine))
}

/// The GNU build-id note of the main program, read from its loaded program headers.
fn build_id() -> Option<Vec<u8>> {
    let mut found: Option<Vec<u8>> = None;
    // SAFETY: the callback only reads the headers the loader hands it, and
    // `data` points at `found`, which outlives the call.
    unsafe {
        libc::dl_iterate_phdr(
            Some(visit_object),
            (&mut found as *mut Option<Vec<u8>>).cast(),
        );
    }
    found
}

unsafe extern "C" fn visit_object(
    info: *mut libc::dl_phdr_info,
    _size: libc::size_t,
    data: *mut libc::c_void,
) -> libc::c_int {
    // SAFETY: the loader passes a valid info pointer; `data` is the Option from build_id.
    let (info, found) = unsafe { (&*info, &mut *data.cast::<Option<Vec<u8>>>()) };
    // The first object reported is the main program; stop after it.
    for index in 0..usize::from(info.dlpi_phnum) {
        // SAFETY: dlpi_phdr points at dlpi_phnum headers.
        let header = unsafe { &*info.dlpi_phdr.add(index) };
        if header.p_type != libc::PT_NOTE {
            continue;
        }
        let start = (info.dlpi_addr as usize).wrapping_add(header.p_vaddr as usize);
        // SAFETY: a loaded PT_NOTE segment is mapped readable for p_memsz bytes.
        let notes =
            unsafe { std::slice::from_raw_parts(start as *const u8, header.p_memsz as usize) };
        if let Some(id) = find_build_id(notes) {
            *found = Some(id.to_vec());
            break;
        }
    }
    1
}

/// Walks ELF notes looking for `NT_GNU_BUILD_ID` owned by "GNU".
fn find_build_id(mut notes: &[u8]) -> Option<&[u8]> {
    const NT_GNU_BUILD_ID: u32 = 3;
    let align4 = |n: usize| (n + 3) & !3;
    while notes.len() >= 12 {
        let word = |at: usize| {
            u32::from_ne_bytes([notes[at], notes[at + 1], notes[at + 2], notes[at + 3]])
        };
        let (name_len, desc_len, kind) = (word(0) as usize, word(4) as usize, word(8));
        let name_end = 12 + align4(name_len);
        let desc_end = name_end.checked_add(align4(desc_len))?;
        if desc_end > notes.len() {
            return None;
        }
        if kind == NT_GNU_BUILD_ID && &notes[12..12 + name_len] == b"GNU\0" {
            return Some(&notes[name_end..name_end + desc_len]);
        }
        notes = &notes[desc_end..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_id_is_stable_and_nonempty() {
        assert!(!binary_id().is_empty());
        assert_eq!(binary_id(), binary_id());
    }

    #[test]
    fn agent_file_hash_matches_sha256sum_format() {
        let file = agent_file().expect("hash self");
        assert_eq!(file.sha256.len(), 64);
        assert!(file.size > 0);
    }

    #[test]
    fn the_system_tool_and_the_crate_agree() {
        let mut file = std::fs::File::open(SELF_EXE).expect("open self");
        let size = file.metadata().expect("metadata").len();
        assert!(size >= 4 << 20, "a test binary is large");
        let system = system_sha256(&mut file, size).expect("openssl or sha256sum here");
        // The tools read through a shared offset.
        std::io::Seek::rewind(&mut file).expect("rewind");
        let coreutils = digest_with("sha256sum", &[], &file);
        std::io::Seek::rewind(&mut file).expect("rewind");
        assert_eq!(system, sha256_in_process(&mut file, size).expect("hash"));
        assert_eq!(coreutils.as_deref(), Some(system.as_str()));
        assert_eq!(agent_file().expect("agent file").sha256, system);
    }

    #[test]
    fn uname_reports_this_machine() {
        let (os, arch) = uname();
        assert_eq!(os, "Linux");
        assert_eq!(arch, std::env::consts::ARCH);
    }

    #[test]
    fn truncated_notes_do_not_panic() {
        assert_eq!(
            find_build_id(&[4, 0, 0, 0, 255, 255, 255, 255, 3, 0, 0, 0, b'G']),
            None
        );
    }
}
