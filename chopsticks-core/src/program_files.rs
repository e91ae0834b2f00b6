//! The files that make this program runnable on a target whose own
//! libraries cannot run it: the program, and for a dynamically linked one
//! its dynamic loader and the shared objects the loader opened, plus the
//! C library's name-service modules, which it opens only when a lookup
//! needs them. `Docker` places them in containers; the shell bootstrap
//! ships them as a bundle.
//!
//! With them, the agent runs as `lib/LOADER --library-path lib agent`, so
//! nothing from the target's `/lib` is used.

use std::ffi::CStr;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// One file of the program's payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramFile {
    /// Where it is on this machine.
    pub source: PathBuf,
    /// Its path inside the payload directory: `agent` or `lib/NAME`.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
}

/// The program and what it needs to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramFiles {
    /// `agent` first, then the libraries.
    pub files: Vec<ProgramFile>,
    /// The loader's file name in `lib/`, or `None` for a static program.
    pub loader: Option<String>,
}

/// Name-service modules the C library opens on demand (`getpwnam`,
/// `getaddrinfo`); shipped when they sit beside it. Since glibc 2.34 the
/// `files` and `dns` services live in libc itself and these are small.
const ON_DEMAND: [&str; 3] = ["libnss_files.so.2", "libnss_dns.so.2", "libresolv.so.2"];

impl ProgramFiles {
    /// The files of the program at `program` (this process's own, as
    /// [`crate::identity::program_path`] names it).
    pub fn of_this_program() -> io::Result<ProgramFiles> {
        let program = crate::identity::program_path();
        let mut files = vec![ProgramFile {
            size: std::fs::metadata(&program)?.len(),
            source: program.clone(),
            name: "agent".into(),
        }];
        let Some(loader) = interpreter(&program)? else {
            return Ok(ProgramFiles {
                files,
                loader: None,
            });
        };
        let add = |path: PathBuf, files: &mut Vec<ProgramFile>| {
            let name = format!("lib/{}", file_name(&path));
            if files.iter().any(|file| file.name == name) {
                return;
            }
            if let Ok(metadata) = std::fs::metadata(&path)
                && metadata.is_file()
            {
                files.push(ProgramFile {
                    source: path,
                    name,
                    size: metadata.len(),
                });
            }
        };
        let libraries = loaded_objects();
        for library in &libraries {
            add(library.clone(), &mut files);
        }
        if let Some(libc_dir) = libraries
            .iter()
            .find(|path| file_name(path).starts_with("libc.so"))
            .and_then(|libc| libc.parent())
        {
            for name in ON_DEMAND {
                add(libc_dir.join(name), &mut files);
            }
        }
        let loader_name = file_name(&loader);
        add(loader, &mut files);
        if !files
            .iter()
            .any(|file| file.name == format!("lib/{loader_name}"))
        {
            return Err(io::Error::other(format!(
                "the dynamic loader {loader_name} of this program is not a readable file"
            )));
        }
        Ok(ProgramFiles {
            files,
            loader: Some(loader_name),
        })
    }
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
pub fn interpreter(exe: &Path) -> io::Result<Option<PathBuf>> {
    let mut file = std::fs::File::open(exe)?;
    let mut header = [0u8; 64];
    file.read_exact(&mut header)?;
    if &header[..4] != b"\x7fELF" || header[4] != 2 || header[5] != 1 {
        return Err(io::Error::other(
            "this program is not a 64-bit little-endian ELF file",
        ));
    }
    let (table, entry_size, count) = (
        little_endian(&header[0x20..0x28]),
        little_endian(&header[0x36..0x38]),
        little_endian(&header[0x38..0x3a]),
    );
    if entry_size < 40 || count > 4096 {
        return Err(io::Error::other("this program's ELF header is malformed"));
    }
    let mut table_bytes = vec![0u8; (entry_size * count) as usize];
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(table))?;
    file.read_exact(&mut table_bytes)?;
    for entry in table_bytes.chunks(entry_size as usize) {
        const PT_INTERP: u64 = 3;
        if little_endian(&entry[0..4]) == PT_INTERP {
            let (offset, size) = (little_endian(&entry[8..16]), little_endian(&entry[32..40]));
            if size > 4096 {
                return Err(io::Error::other(
                    "this program's ELF interpreter is malformed",
                ));
            }
            let mut path = vec![0u8; size as usize];
            std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(offset))?;
            file.read_exact(&mut path)?;
            let path = CStr::from_bytes_until_nul(&path).map_err(io::Error::other)?;
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
    fn this_program_has_its_loader_its_libraries_and_the_name_services() {
        let program = ProgramFiles::of_this_program().expect("program files");
        assert_eq!(program.files[0].name, "agent");
        let loader = program
            .loader
            .as_deref()
            .expect("a dynamically linked test");
        let names: Vec<&str> = program
            .files
            .iter()
            .map(|file| file.name.as_str())
            .collect();
        assert!(
            names.contains(&format!("lib/{loader}").as_str()),
            "{names:?}"
        );
        assert!(
            names.iter().any(|name| name.starts_with("lib/libc.so")),
            "{names:?}"
        );
        let unique: std::collections::BTreeSet<&&str> = names.iter().collect();
        assert_eq!(unique.len(), names.len(), "{names:?}");
        for file in &program.files {
            assert_eq!(
                std::fs::metadata(&file.source).expect("source").len(),
                file.size
            );
        }
    }
}
