//! Root filesystems made from this machine's programs and their libraries:
//! for images (`docker import`) and for `chroot`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// What the shell bootstrap uses on a target, and `sleep` and `cat` to keep
/// a container running.
pub const BOOTSTRAP_TOOLS: &[&str] = &[
    "sh",
    "uname",
    "ls",
    "head",
    "mktemp",
    "sha256sum",
    "id",
    "mkdir",
    "chmod",
    "mv",
    "rm",
    "cat",
    "sleep",
    "env",
    "true",
];

/// Copies `programs` and the shared objects `ldd` lists for them (and for
/// `libraries_of`) into `root` at the same paths, and makes an empty `/tmp`.
pub fn populate(root: &Path, programs: &[PathBuf], libraries_of: &[PathBuf]) -> Result<(), String> {
    std::fs::create_dir_all(root.join("tmp")).map_err(|e| e.to_string())?;
    let mut files: Vec<PathBuf> = programs.to_vec();
    for program in programs.iter().chain(libraries_of) {
        let ldd = Command::new("ldd")
            .arg(program)
            .output()
            .map_err(|e| format!("ldd: {e}"))?;
        for line in String::from_utf8_lossy(&ldd.stdout).lines() {
            if let Some(path) = line.split_whitespace().find(|word| word.starts_with('/')) {
                files.push(PathBuf::from(path));
            }
        }
    }
    for file in &files {
        let real = std::fs::canonicalize(file).map_err(|e| format!("{}: {e}", file.display()))?;
        let target = root.join(file.strip_prefix("/").unwrap_or(file));
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
        }
        std::fs::copy(&real, &target).map_err(|e| format!("copying {}: {e}", file.display()))?;
    }
    Ok(())
}

/// The path of `tool` on this machine's `PATH`.
pub fn which(tool: &str) -> Result<PathBuf, String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| format!("{tool} is not on PATH"))
}

/// A root holding the bootstrap's tools and the libraries this program
/// (the agent) needs, so that a shell-bootstrap agent can start in it.
pub fn bootstrap_root(root: &Path) -> Result<(), String> {
    // Each tool goes where PATH finds it here and, where this machine has
    // one, as /bin/TOOL too (commands name /bin/sh and /bin/sleep).
    let mut programs = Vec::new();
    for tool in BOOTSTRAP_TOOLS {
        programs.push(which(tool)?);
        let in_bin = Path::new("/bin").join(tool);
        if in_bin.is_file() {
            programs.push(in_bin);
        }
    }
    let this_program = std::env::current_exe().map_err(|e| e.to_string())?;
    populate(root, &programs, &[this_program])
}

/// Adds `sudo` to a root: the program and its plugin, a sudoers file that
/// lets root become anyone, a PAM stack of `pam_rootok` and `pam_unix`, and
/// this machine's users and groups.
pub fn sudo_root(root: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let security = Path::new("/lib/x86_64-linux-gnu/security");
    let mut files: Vec<PathBuf> = vec![which("sudo")?];
    for entry in
        std::fs::read_dir("/usr/libexec/sudo").map_err(|e| format!("sudo's plugins: {e}"))?
    {
        let path = entry.map_err(|e| e.to_string())?.path();
        if path.extension().is_some_and(|ext| ext == "so") {
            files.push(path);
        }
    }
    for module in ["pam_rootok.so", "pam_unix.so", "pam_permit.so"] {
        files.push(security.join(module));
    }
    populate(root, &files, &[])?;
    let sudo = root.join(
        which("sudo")?
            .strip_prefix("/")
            .map_err(|e| e.to_string())?,
    );
    std::fs::set_permissions(&sudo, std::fs::Permissions::from_mode(0o4755))
        .map_err(|e| e.to_string())?;
    std::fs::create_dir_all(root.join("etc/pam.d")).map_err(|e| e.to_string())?;
    std::fs::write(root.join("etc/sudoers"), "root ALL=(ALL:ALL) ALL\n")
        .map_err(|e| e.to_string())?;
    std::fs::set_permissions(
        root.join("etc/sudoers"),
        std::fs::Permissions::from_mode(0o440),
    )
    .map_err(|e| e.to_string())?;
    std::fs::write(
        root.join("etc/pam.d/sudo"),
        "auth sufficient pam_rootok.so\nauth required pam_unix.so\n\
         account required pam_permit.so\nsession required pam_permit.so\n",
    )
    .map_err(|e| e.to_string())?;
    // Other users keep their agent cache under /tmp.
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777))
        .map_err(|e| e.to_string())?;
    for file in ["etc/passwd", "etc/group"] {
        std::fs::copy(Path::new("/").join(file), root.join(file))
            .map_err(|e| format!("copying /{file}: {e}"))?;
    }
    Ok(())
}
