//! The shell bootstrap: place the agent file on a target that has only a POSIX `sh`.
//!
//! The controller runs `sh -c SCRIPT chopsticks-bootstrap HASH SIZE DEPTH HEARTBEAT_MS "OS ARCH"`.
//! Every value travels as a positional argument, never spliced into the
//! script text, and transports that need one command line quote each word
//! ([`AgentCommand::to_shell_command`]). The script:
//!
//! 1. refuses a target whose `uname -sm` differs from the controller's;
//! 2. picks `${XDG_CACHE_HOME:-$HOME/.cache}/chopsticks` if it is an absolute
//!    path to a directory owned by the user and not writable by group or
//!    others (a `HOME` that is unset, empty or missing is not used, and
//!    nothing is created for it), else a `${TMPDIR:-/tmp}/chopsticks-UID`
//!    directory (absolute, or under `/tmp`) that must be owned by the user
//!    with mode 0700;
//! 3. on a cache hit, verifies size and SHA-256 of `agent-HASH` and execs it;
//!    a corrupt entry is deleted, never executed. The file is hashed and
//!    executed through one descriptor (`/proc/self/fd/9`) opened before the
//!    check, so renaming paths in between cannot swap the program. SHA-256 comes from
//!    `openssl dgst` where installed (it uses the CPU's SHA extensions, several
//!    times faster than coreutils), else `sha256sum`;
//! 4. on a miss, says `send`, reads exactly SIZE bytes into a `mktemp` file
//!    (created exclusively), verifies them, makes the file executable,
//!    renames it into place and execs it, through its descriptor again. The
//!    controller sends the file at most once per connection. The cache keeps
//!    the three most recently uploaded agents (one per build of the
//!    program); an upload removes older ones.
//!
//! The warm path forks only `uname`, one `ls` (directory mode and agent size
//! together) and the digest, so it costs little more than hashing the file.
//!
//! With [`TunnelBuilder::bundle_libraries`](crate::TunnelBuilder::bundle_libraries)
//! a dynamically linked program goes as a *bundle*: the script also gets
//! the loader's name and a manifest (`NAME SIZE SHA256` per line: `agent`,
//! then `lib/NAME` for the loader and every library), and HASH names the
//! manifest. A cached `bundle-HASH/` is checked file by file against the
//! manifest in one digest run before every start; a mismatch deletes it.
//! On a miss the script makes a `mktemp -d` directory, says `send NAME` for
//! each file in turn and reads exactly its size (one file per request, so
//! no reader can take the next file's bytes), checks them all, and renames
//! the directory into place. The agent then runs as `lib/LOADER
//! --library-path lib agent`, with `CHOPSTICKS_PROGRAM` naming its file.
//!
//! Each step reports one line `chopsticks-bootstrap WORD ...` on stdout; the
//! controller sends the file only after `send` and reads frames only after
//! `exec`. Lines without that prefix (noise from shell start-up files) are skipped.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::agent_env::{AGENT_DEPTH, AGENT_HEARTBEAT, AGENT_MARKER};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use sha2::{Digest, Sha256};

use crate::identity::AgentFile;
use crate::program_files::ProgramFiles;
use crate::protocol::PROTOCOL_VERSION;
use crate::transport::AgentCommand;

const SCRIPT: &str = r#"set -u
set -f
hash=$1 size=$2 depth=$3 heartbeat=$4 want=$5 loader=${6:-} manifest=${7:-}
say() { printf 'chopsticks-bootstrap %s\n' "$*"; }
fail() { say error "$*"; exit 111; }
case $hash in ''|*[!0-9a-f]*) fail "invalid agent hash";; esac
case $size in ''|*[!0-9]*) fail "invalid agent size";; esac
case $heartbeat in ''|*[!0-9]*) fail "invalid heartbeat timeout";; esac
case $loader in *[!A-Za-z0-9._+-]*|.*) fail "invalid loader name";; esac
if [ -n "$loader" ]; then
  while read -r name fsize fsum <&3; do
    case $name in agent) ;; lib/*/*|lib/.*) fail "invalid bundle file name";; lib/?*) ;; *) fail "invalid bundle file name";; esac
    case ${name#lib/} in *[!A-Za-z0-9._+-]*) fail "invalid bundle file name";; esac
    case $fsize in ''|*[!0-9]*) fail "invalid bundle file size";; esac
    case $fsum in ''|*[!0-9a-f]*) fail "invalid bundle file hash";; esac
  done 3<<EOF
$manifest
EOF
fi
# Every check below sends its noise to /dev/null; without it they would
# all fail and blame the wrong thing.
[ -c /dev/null ] && [ -w /dev/null ] || fail "the target has no writable /dev/null, which the bootstrap needs"
for tool in uname ls head mktemp; do
  command -v "$tool" >/dev/null 2>&1 || fail "the target has no $tool, which the bootstrap needs"
done
if command -v openssl >/dev/null 2>&1; then digest() { openssl dgst -sha256 -r "$@"; }
elif command -v sha256sum >/dev/null 2>&1; then digest() { sha256sum "$@"; }
else fail "the target has neither openssl nor sha256sum, which the bootstrap needs"; fi
have=$(uname -sm)
[ "$have" = "$want" ] || { say arch "$have"; exit 112; }
inspect() {
  dirmode= filemode= filesize=
  while read -r mode _ _ _ bytes rest; do
    case $rest in
      *"/agent-$hash") filemode=$mode filesize=$bytes;;
      *) dirmode=$mode;;
    esac
  done <<EOF
$(ls -lnd -- "$dir" "$dir/agent-$hash" 2>/dev/null)
EOF
}
owned() { [ -d "$dir" ] && [ ! -L "$dir" ] && [ -O "$dir" ] && [ -w "$dir" ] && [ -x "$dir" ]; }
private() { case $dirmode in d????-??-*) return 0;; esac; return 1; }
# The cache is under a directory the user named: XDG_CACHE_HOME, or a HOME
# that exists (cron, systemd and `env -i` may give none, or /nonexistent).
# Only an absolute path is a cache; anything else falls back below.
if [ -n "${XDG_CACHE_HOME:-}" ]; then dir=$XDG_CACHE_HOME/chopsticks
elif [ -n "${HOME:-}" ] && [ -d "$HOME" ]; then dir=$HOME/.cache/chopsticks
else dir=; fi
case $dir in /*) [ -d "$dir" ] || mkdir -p -m 700 -- "$dir" 2>/dev/null;; *) dir=;; esac
inspect
if ! { owned && private; }; then
  dir=${TMPDIR:-/tmp}/chopsticks-$(id -u)
  case $dir in /*) ;; *) dir=/tmp/chopsticks-$(id -u);; esac
  mkdir -m 700 -- "$dir" 2>/dev/null
  inspect
  owned || fail "cache directory $dir is not a directory owned by $(id -un)"
  case $dirmode in drwx------*) ;; *) fail "cache directory $dir must have mode 0700";; esac
fi
# The file is opened once, hashed through that descriptor, and executed
# through it: a path renamed between the check and the exec cannot swap in
# another program. The agent closes descriptor 9 when it starts.
verify() {
  [ "$2" = "$size" ] || return 1
  exec 9< "$1" || return 1
  sum=$(digest <&9) || return 1
  [ "${sum%% *}" = "$hash" ]
}
run() {
  [ -e /proc/self/fd/9 ] || fail "the target has no /proc, which the agent needs"
  say exec "$1"
  export CHOPSTICKS_AGENT=@VERSION@ CHOPSTICKS_DEPTH="$depth" CHOPSTICKS_HEARTBEAT_MS="$heartbeat"
  trap - EXIT HUP INT TERM
  exec /proc/self/fd/9
}
# The cache keeps the three most recently uploaded agents or bundles (one
# per build); older ones go. A process running one keeps its files until it
# exits, and a bootstrap about to exec a lone agent holds it open on
# descriptor 9.
evict() {
  kept=0
  for old in $(ls -t -- "$dir" 2>/dev/null); do
    case $old in agent-*|bundle-*) kept=$((kept + 1)); [ "$kept" -le 3 ] || rm -rf -- "$dir/$old";; esac
  done
}
if [ -n "$loader" ]; then
  # A bundle: the program, its loader and libraries in bundle-HASH/, every
  # file checked against the manifest (one digest run) before the exec.
  bundle=$dir/bundle-$hash
  paths() { while read -r name _ _ <&3; do printf '%s\n' "$1/$name"; done 3<<EOF
$manifest
EOF
  }
  sums() { while read -r _ _ fsum <&3; do printf '%s\n' "$fsum"; done 3<<EOF
$manifest
EOF
  }
  complete() {
    [ -d "$1" ] && [ ! -L "$1" ] || return 1
    got=$(digest $(paths "$1") 2>/dev/null | while read -r fsum _; do printf '%s\n' "$fsum"; done)
    [ "$got" = "$(sums)" ]
  }
  run_bundle() {
    [ -e /proc/self/fd ] || fail "the target has no /proc, which the agent needs"
    say exec "$1"
    export CHOPSTICKS_AGENT=@VERSION@ CHOPSTICKS_DEPTH="$depth" CHOPSTICKS_HEARTBEAT_MS="$heartbeat" CHOPSTICKS_PROGRAM="$bundle/agent"
    trap - EXIT HUP INT TERM
    exec "$bundle/lib/$loader" --library-path "$bundle/lib" "$bundle/agent"
  }
  complete "$bundle" && run_bundle cached
  rm -rf -- "$bundle"
  tmp=$(mktemp -d -- "$dir/.bundle-$hash.XXXXXX") || fail "cannot create a temporary directory in $dir"
  trap 'rm -rf -- "$tmp"' EXIT HUP INT TERM
  mkdir -- "$tmp/lib" || fail "cannot create a directory in $dir"
  while read -r name fsize _ <&3; do
    say send "$name"
    head -c "$fsize" > "$tmp/$name" || fail "cannot write $name in $dir"
  done 3<<EOF
$manifest
EOF
  complete "$tmp" || fail "the uploaded bundle did not match its checksums"
  chmod 700 -- "$tmp" "$tmp/agent" "$tmp/lib/$loader" || fail "cannot make the bundle executable in $dir"
  [ -d "$bundle" ] || mv -- "$tmp" "$bundle" || fail "cannot install the bundle in $dir"
  evict
  run_bundle uploaded
fi
agent=$dir/agent-$hash
case $filemode in
  -*) verify "$agent" "$filesize" && run cached; rm -f -- "$agent";;
  ?*) rm -f -- "$agent";;
esac
tmp=$(mktemp -- "$dir/.agent-$hash.XXXXXX") || fail "cannot create a temporary file in $dir"
trap 'rm -f -- "$tmp"' EXIT HUP INT TERM
say send
head -c "$size" > "$tmp"
read -r _ _ _ _ received _ <<EOF
$(ls -ln -- "$tmp")
EOF
verify "$tmp" "$received" || { rm -f -- "$tmp"; fail "the uploaded agent did not match its size and checksum"; }
chmod 700 "$tmp" && mv -f -- "$tmp" "$agent" || { rm -f -- "$tmp"; fail "cannot install the agent in $dir"; }
evict
run uploaded
"#;

/// What the bootstrap places on a target.
#[derive(Debug, Clone)]
pub(crate) enum Shipment {
    /// This program alone, cached as `agent-SHA256`.
    Program(&'static AgentFile),
    /// This program with its loader and libraries, cached as `bundle-ID/`.
    Bundle(&'static Bundle),
    /// Another build of this program (`TunnelBuilder::program_for`), alone.
    Other(std::sync::Arc<OtherBuild>),
}

/// Another build of this program and its digest.
#[derive(Debug)]
pub(crate) struct OtherBuild {
    pub(crate) file: AgentFile,
    pub(crate) source: PathBuf,
}

/// This program with its dynamic loader and libraries, and their digests.
#[derive(Debug)]
pub(crate) struct Bundle {
    /// The SHA-256 of the manifest: names the bundle in the cache.
    id: String,
    /// The loader's file name in `lib/`.
    loader: String,
    files: Vec<BundleFile>,
}

#[derive(Debug)]
struct BundleFile {
    /// `agent` or `lib/NAME`.
    name: String,
    size: u64,
    sha256: String,
    source: PathBuf,
}

impl Bundle {
    /// This program's bundle, hashed once per process (each file's digest
    /// is remembered across runs); `None` for a statically linked program,
    /// which goes alone.
    pub(crate) fn of_this_program() -> std::io::Result<Option<&'static Bundle>> {
        static BUNDLE: OnceLock<Option<Bundle>> = OnceLock::new();
        if let Some(bundle) = BUNDLE.get() {
            return Ok(bundle.as_ref());
        }
        let program = ProgramFiles::of_this_program()?;
        let Some(loader) = program.loader else {
            return Ok(BUNDLE.get_or_init(|| None).as_ref());
        };
        let mut files = Vec::with_capacity(program.files.len());
        for file in program.files {
            let shippable = file.name == "agent"
                || file.name.strip_prefix("lib/").is_some_and(|name| {
                    !name.is_empty()
                        && !name.starts_with('.')
                        && name
                            .bytes()
                            .all(|byte| byte.is_ascii_alphanumeric() || b"._+-".contains(&byte))
                });
            if !shippable {
                return Err(std::io::Error::other(format!(
                    "the library {} has a name the bootstrap does not accept",
                    file.source.display()
                )));
            }
            let digest = crate::identity::file_digest(&file.source)?;
            files.push(BundleFile {
                name: file.name,
                size: digest.size,
                sha256: digest.sha256,
                source: file.source,
            });
        }
        let mut bundle = Bundle {
            id: String::new(),
            loader,
            files,
        };
        bundle.id = crate::identity::hex(&Sha256::digest(bundle.manifest().as_bytes()));
        Ok(BUNDLE.get_or_init(|| Some(bundle)).as_ref())
    }

    /// One line `NAME SIZE SHA256` per file, the program first (no
    /// newline after the last: the script reads it through a here-document).
    fn manifest(&self) -> String {
        self.files
            .iter()
            .map(|file| format!("{} {} {}", file.name, file.size, file.sha256))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn size(&self) -> u64 {
        self.files.iter().map(|file| file.size).sum()
    }
}

/// The command that runs the shell bootstrap for `shipment` at nesting
/// `depth`, with a heartbeat timeout of `heartbeat_ms` milliseconds, for a
/// target whose `uname -sm` is `platform`.
pub(crate) fn command(
    shipment: Shipment,
    depth: u32,
    heartbeat_ms: &str,
    platform: &str,
) -> AgentCommand {
    debug_assert_eq!(
        (AGENT_MARKER, AGENT_DEPTH, AGENT_HEARTBEAT),
        (
            "CHOPSTICKS_AGENT",
            "CHOPSTICKS_DEPTH",
            "CHOPSTICKS_HEARTBEAT_MS"
        )
    );
    let (hash, size) = match &shipment {
        Shipment::Program(file) => (file.sha256.clone(), file.size),
        Shipment::Bundle(bundle) => (bundle.id.clone(), bundle.size()),
        Shipment::Other(build) => (build.file.sha256.clone(), build.file.size),
    };
    let command = AgentCommand::new("sh")
        .arg("-c")
        .arg(SCRIPT.replace("@VERSION@", &PROTOCOL_VERSION.to_string()))
        .arg("chopsticks-bootstrap")
        .arg(hash)
        .arg(size.to_string())
        .arg(depth.to_string())
        .arg(heartbeat_ms)
        .arg(platform);
    match shipment {
        Shipment::Program(_) | Shipment::Other(_) => command,
        Shipment::Bundle(bundle) => command.arg(bundle.loader.clone()).arg(bundle.manifest()),
    }
}

/// How the bootstrap ended, as far as the controller can tell.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The agent is starting; frames follow. `true` when the file was uploaded.
    Exec { uploaded: bool },
    /// The script reported an error.
    Failed(String),
    /// The target's `uname -s` and `uname -m`.
    WrongPlatform(String),
    /// The process ended or closed stdout before `exec`.
    Ended,
}

const PREFIX: &str = "chopsticks-bootstrap ";
const MAX_NOISE_BYTES: usize = 64 * 1024;

/// Runs the controller's side of the dialogue: reads status lines, uploads the file when asked.
pub(crate) async fn dialogue<R, W>(
    shipment: Shipment,
    stdout: &mut R,
    stdin: &mut W,
) -> std::io::Result<Outcome>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut noise = 0usize;
    let mut sent: Vec<String> = Vec::new();
    loop {
        let Some(line) = read_line(stdout, &mut noise).await? else {
            return Ok(Outcome::Ended);
        };
        let Some(status) = line.strip_prefix(PREFIX) else {
            continue;
        };
        let (word, rest) = status.split_once(' ').unwrap_or((status, ""));
        match word {
            "exec" => {
                return Ok(Outcome::Exec {
                    uploaded: rest == "uploaded",
                });
            }
            "error" => return Ok(Outcome::Failed(peer_text(rest))),
            "arch" => return Ok(Outcome::WrongPlatform(peer_text(rest))),
            "send" if sent.iter().any(|name| name == rest) => {
                // The script asks once per file; a target asking again only
                // makes this end send the whole program over and over.
                return Ok(Outcome::Failed(
                    "the target asked for the agent a second time after it was sent; \
                     it is sent at most once per connection"
                        .into(),
                ));
            }
            "send" => {
                let (source, size) = match (&shipment, rest) {
                    (Shipment::Program(file), "") => (crate::identity::program_path(), file.size),
                    (Shipment::Other(build), "") => (build.source.clone(), build.file.size),
                    (Shipment::Bundle(bundle), name) => {
                        match bundle.files.iter().find(|file| file.name == name) {
                            Some(file) => (file.source.clone(), file.size),
                            None => {
                                return Ok(Outcome::Failed(format!(
                                    "the target asked for {:?}, which is not part of the agent",
                                    peer_text(name)
                                )));
                            }
                        }
                    }
                    (Shipment::Program(_) | Shipment::Other(_), other) => {
                        return Ok(Outcome::Failed(format!(
                            "the target asked for {:?}, but the agent goes alone",
                            peer_text(other)
                        )));
                    }
                };
                upload(&source, size, stdin).await?;
                sent.push(rest.to_string());
            }
            _ => {
                return Ok(Outcome::Failed(format!(
                    "unexpected bootstrap status {:?}",
                    peer_text(status)
                )));
            }
        }
    }
}

/// Text the target wrote, cut to a length fit for an error message.
fn peer_text(text: &str) -> String {
    crate::protocol::bounded_text(text, crate::protocol::MAX_PEER_TEXT).into_owned()
}

/// Reads one line byte by byte, so nothing after it is consumed.
async fn read_line<R>(reader: &mut R, noise: &mut usize) -> std::io::Result<Option<String>>
where
    R: AsyncRead + Unpin + ?Sized,
{
    let mut line = Vec::new();
    loop {
        let mut byte = [0u8; 1];
        if reader.read(&mut byte).await? == 0 {
            return Ok(None);
        }
        *noise += 1;
        if *noise > MAX_NOISE_BYTES {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the bootstrap printed more than 64 KiB without starting the agent",
            ));
        }
        if byte[0] == b'\n' {
            return Ok(Some(String::from_utf8_lossy(&line).into_owned()));
        }
        line.push(byte[0]);
    }
}

/// Sends exactly `size` bytes of the file at `path` (fewer only if it shrank).
async fn upload<W>(path: &Path, size: u64, stdin: &mut W) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut source = tokio::fs::File::open(path).await?;
    let mut buffer = vec![0u8; 256 * 1024];
    let mut left = size;
    while left > 0 {
        let want = buffer.len().min(left as usize);
        let read = source.read(&mut buffer[..want]).await?;
        if read == 0 {
            break;
        }
        stdin.write_all(&buffer[..read]).await?;
        left -= read as u64;
    }
    stdin.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn dialogue_skips_noise_and_reports_errors() {
        let file: &'static AgentFile = Box::leak(Box::new(AgentFile {
            size: 0,
            sha256: "00".into(),
        }));
        let file = Shipment::Program(file);
        let mut out: &[u8] = b"Welcome!\nchopsticks-bootstrap error no space left\n";
        let mut sink = Vec::new();
        let outcome = dialogue(file.clone(), &mut out, &mut sink)
            .await
            .expect("dialogue");
        assert_eq!(outcome, Outcome::Failed("no space left".into()));

        let mut out: &[u8] = b"chopsticks-bootstrap arch Linux aarch64\n";
        let outcome = dialogue(file.clone(), &mut out, &mut sink)
            .await
            .expect("dialogue");
        assert_eq!(outcome, Outcome::WrongPlatform("Linux aarch64".into()));

        let mut out: &[u8] = b"chopsticks-bootstrap exec cached\n\x00\x00";
        let outcome = dialogue(file.clone(), &mut out, &mut sink)
            .await
            .expect("dialogue");
        assert_eq!(outcome, Outcome::Exec { uploaded: false });
        assert_eq!(out, b"\x00\x00", "bytes after the exec line stay unread");

        let mut out: &[u8] = b"";
        let outcome = dialogue(file.clone(), &mut out, &mut sink)
            .await
            .expect("dialogue");
        assert_eq!(outcome, Outcome::Ended);

        let mut out: &[u8] = b"chopsticks-bootstrap send\nchopsticks-bootstrap send\n";
        let outcome = dialogue(file.clone(), &mut out, &mut sink)
            .await
            .expect("dialogue");
        assert!(
            matches!(&outcome, Outcome::Failed(message) if message.contains("second time")),
            "{outcome:?}"
        );
    }
}
