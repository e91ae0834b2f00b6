//! Accounts and rules for tests that become another user: three accounts
//! and a sudoers file (and a `doas.conf` where `doas` is installed).
//!
//! - [`OPERATOR`] may become root and [`APP`] without a password
//!   (`NOPASSWD`; `permit nopass` for doas);
//! - [`PASSWORD_USER`] may become root with its password, [`PASSWORD`],
//!   asked every time (`timestamp_timeout=0`);
//! - [`APP`] has no rule.
//!
//! All three log in to the test kit's sshd with its client key
//! (`Ssh::new(alias).user(OPERATOR)`), and have `/bin/sh` and a home.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// May become root and [`APP`] without a password.
pub const OPERATOR: &str = "chopsticks-ops";
/// May become root with [`PASSWORD`].
pub const PASSWORD_USER: &str = "chopsticks-pw";
/// Has no rule; [`OPERATOR`] may become it.
pub const APP: &str = "chopsticks-app";
/// [`PASSWORD_USER`]'s password: quotes, spaces and shell words.
pub const PASSWORD: &str = "it's a \"pass\" word; $(touch /tmp/chopsticks-pwned) `x`";

/// Where the rules go.
pub const SUDOERS_FILE: &str = "/etc/sudoers.d/chopsticks-testkit";
/// doas reads one file; the test kit writes it when it is absent or its own.
pub const DOAS_CONF: &str = "/etc/doas.conf";

const DOAS_HEADER: &str = "# written by chopsticks-testkit\n";

/// Creates the accounts and writes the rules (as root); says why not otherwise.
pub fn prepare() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("becoming another user needs the tests to run as root".into());
    }
    for tool in ["sudo", "useradd", "chpasswd", "visudo"] {
        if !crate::tool_exists(tool) {
            return Err(format!(
                "{tool} is not installed (scripts/test.sh installs sudo and passwd)"
            ));
        }
    }
    let lock = crate::exclusive("chopsticks-testkit-sudoers")?;
    for user in [OPERATOR, PASSWORD_USER, APP] {
        account(user)?;
    }
    // sshd (without PAM) refuses a locked account: "*" allows key logins.
    for user in [OPERATOR, APP] {
        crate::run(Command::new("usermod").args(["-p", "*", user]))?;
    }
    set_password(PASSWORD_USER, PASSWORD)?;
    write_sudoers()?;
    if crate::tool_exists("doas") {
        write_doas_conf()?;
    }
    drop(lock);
    Ok(())
}

/// Whether `doas` is installed and configured by [`prepare`].
pub fn has_doas() -> bool {
    crate::tool_exists("doas")
        && std::fs::read_to_string(DOAS_CONF).is_ok_and(|conf| conf.starts_with(DOAS_HEADER))
}

fn account(user: &str) -> Result<(), String> {
    let exists = Command::new("id")
        .arg("-u")
        .arg(user)
        .output()
        .is_ok_and(|output| output.status.success());
    if !exists {
        crate::run(Command::new("useradd").args(["--create-home", "--shell", "/bin/sh", user]))?;
    }
    let home = Path::new("/home").join(user);
    let _ = std::fs::create_dir_all(&home);
    crate::run(
        Command::new("chown")
            .arg("-R")
            .arg(format!("{user}:"))
            .arg(&home),
    )
}

fn set_password(user: &str, password: &str) -> Result<(), String> {
    let mut chpasswd = Command::new("chpasswd")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("chpasswd: {e}"))?;
    chpasswd
        .stdin
        .take()
        .ok_or("chpasswd has no stdin")?
        .write_all(format!("{user}:{password}\n").as_bytes())
        .map_err(|e| format!("chpasswd: {e}"))?;
    let output = chpasswd
        .wait_with_output()
        .map_err(|e| format!("chpasswd: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "chpasswd failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

fn write_sudoers() -> Result<(), String> {
    let rules = format!(
        "# written by chopsticks-testkit\n\
         {OPERATOR} ALL=(root,{APP}) NOPASSWD: ALL\n\
         {PASSWORD_USER} ALL=(root) ALL\n\
         Defaults:{PASSWORD_USER} timestamp_timeout=0\n"
    );
    // Checked before it is in place: a broken sudoers file breaks sudo.
    let staged = std::env::temp_dir().join(format!("chopsticks-sudoers-{}", std::process::id()));
    std::fs::write(&staged, &rules).map_err(|e| format!("writing {}: {e}", staged.display()))?;
    let check = Command::new("visudo")
        .arg("-c")
        .arg("-q")
        .arg("-f")
        .arg(&staged)
        .output()
        .map_err(|e| format!("visudo: {e}"));
    let _ = std::fs::remove_file(&staged);
    let check = check?;
    if !check.status.success() {
        return Err(format!(
            "visudo rejected the test rules: {}",
            String::from_utf8_lossy(&check.stderr).trim()
        ));
    }
    install(SUDOERS_FILE, &rules, 0o440)
}

fn write_doas_conf() -> Result<(), String> {
    if let Ok(existing) = std::fs::read_to_string(DOAS_CONF)
        && !existing.starts_with(DOAS_HEADER)
    {
        // Someone else's configuration stays; the doas tests say so.
        return Ok(());
    }
    let rules = format!(
        "{DOAS_HEADER}permit nopass {OPERATOR} as root\npermit nopass {OPERATOR} as {APP}\n"
    );
    install(DOAS_CONF, &rules, 0o600)
}

/// Writes `path` whole: a new file beside it, renamed over it.
fn install(path: &str, contents: &str, mode: u32) -> Result<(), String> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let staged = format!("{path}.chopsticks-{}", std::process::id());
    let _ = std::fs::remove_file(&staged);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&staged)
        .map_err(|e| format!("creating {staged}: {e}"))?;
    file.write_all(contents.as_bytes())
        .map_err(|e| format!("writing {staged}: {e}"))?;
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))
        .map_err(|e| e.to_string())?;
    std::fs::rename(&staged, path).map_err(|e| format!("installing {path}: {e}"))
}
