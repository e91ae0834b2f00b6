//! [`Facts`]: what a host is, gathered in one call from `/proc`, `/sys` and
//! `/etc`, without starting a process. A field the host does not have is
//! `None` (or empty), never a failure of the whole call.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What a host is. Every field is read on the host by
/// [`facts`](crate::TunnelOps::facts); one that cannot be told is `None`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Facts {
    /// The host name (`/proc/sys/kernel/hostname`).
    pub hostname: Option<String>,
    /// The fully qualified name, as the host's resolver gives it (bounded to 2 s).
    pub fqdn: Option<String>,
    /// `ID` of `os-release` (`debian`, `alpine`, ...).
    pub os_id: Option<String>,
    /// `VERSION_ID` of `os-release`.
    pub os_version: Option<String>,
    /// `PRETTY_NAME` of `os-release`.
    pub os_pretty_name: Option<String>,
    /// The kernel release (`uname -r`).
    pub kernel_release: Option<String>,
    /// The machine architecture (`uname -m`).
    pub architecture: Option<String>,
    /// The C library's family (`glibc`, `musl`), from the files present.
    pub libc_family: Option<String>,
    /// The C library's version, where its files say it.
    pub libc_version: Option<String>,
    /// Logical CPUs.
    pub cpu_count: Option<u32>,
    /// The first CPU's model name.
    pub cpu_model: Option<String>,
    /// Memory, in bytes.
    pub memory_total: Option<u64>,
    /// Memory available to new work, in bytes.
    pub memory_available: Option<u64>,
    /// Swap, in bytes.
    pub swap_total: Option<u64>,
    /// Free swap, in bytes.
    pub swap_free: Option<u64>,
    /// Time since boot.
    pub uptime: Option<Duration>,
    /// The boot's random id (`/proc/sys/kernel/random/boot_id`).
    pub boot_id: Option<String>,
    /// `/etc/machine-id`.
    pub machine_id: Option<String>,
    /// The container kind, where it can be told (`docker`, `podman`, `lxc`,
    /// `kubernetes`, `systemd-nspawn`, ...).
    pub container: Option<String>,
    /// The hypervisor, where it can be told (`kvm`, `qemu`, `vmware`,
    /// `virtualbox`, `xen`, `hyperv`, or `unknown` when the CPU says only
    /// that there is one).
    pub virtualization: Option<String>,
    /// The init system (process 1's name: `systemd`, `init`, `tini`, ...).
    pub init_system: Option<String>,
    /// Network interfaces, by name.
    pub interfaces: Vec<Interface>,
    /// The default IPv4 route.
    pub default_route: Option<Route>,
}

/// A network interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Interface {
    /// Its name (`eth0`).
    pub name: String,
    /// Its hardware address, where it has one.
    pub mac: Option<String>,
    /// Whether it is up (`operstate`), where the host says.
    pub up: Option<bool>,
    /// Its addresses, each with its prefix length.
    pub addresses: Vec<(IpAddr, u8)>,
}

/// A route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Route {
    /// The interface it leaves by.
    pub interface: String,
    /// The gateway, when there is one.
    pub gateway: Option<IpAddr>,
}

/// Gathers the facts, on the host.
pub(crate) fn gather() -> Facts {
    let os = os_release();
    let meminfo = read("/proc/meminfo").unwrap_or_default();
    let memory = |key: &str| {
        meminfo.lines().find_map(|line| {
            let value = line.strip_prefix(key)?.strip_prefix(':')?;
            let kib: u64 = value.trim().trim_end_matches("kB").trim().parse().ok()?;
            Some(kib * 1024)
        })
    };
    let cpuinfo = read("/proc/cpuinfo").unwrap_or_default();
    let (libc_family, libc_version) = libc_once();
    let hostname = first_line("/proc/sys/kernel/hostname");
    let uname = uname();
    Facts {
        fqdn: hostname.as_deref().and_then(fqdn),
        hostname,
        os_id: os.get("ID"),
        os_version: os.get("VERSION_ID"),
        os_pretty_name: os.get("PRETTY_NAME"),
        kernel_release: first_line("/proc/sys/kernel/osrelease").or(uname.release),
        architecture: uname.machine,
        libc_family,
        libc_version,
        cpu_count: cpu_count(&cpuinfo),
        cpu_model: cpuinfo
            .lines()
            .find_map(|line| line.strip_prefix("model name"))
            .and_then(|rest| rest.split_once(':'))
            .map(|(_, model)| model.trim().to_string()),
        memory_total: memory("MemTotal"),
        memory_available: memory("MemAvailable"),
        swap_total: memory("SwapTotal"),
        swap_free: memory("SwapFree"),
        uptime: first_line("/proc/uptime")
            .and_then(|line| line.split_whitespace().next()?.parse::<f64>().ok())
            .and_then(|seconds| Duration::try_from_secs_f64(seconds).ok()),
        boot_id: first_line("/proc/sys/kernel/random/boot_id"),
        machine_id: first_line("/etc/machine-id")
            .or_else(|| first_line("/var/lib/dbus/machine-id")),
        container: container(),
        virtualization: virtualization(&cpuinfo),
        init_system: first_line("/proc/1/comm"),
        interfaces: interfaces(),
        default_route: default_route(),
    }
}

fn read(path: impl AsRef<Path>) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

fn first_line(path: &str) -> Option<String> {
    read(path)?
        .lines()
        .next()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(str::to_string)
}

struct OsRelease(Vec<(String, String)>);

impl OsRelease {
    fn get(&self, key: &str) -> Option<String> {
        self.0
            .iter()
            .find(|(name, _)| name == key)
            .map(|(_, value)| value.clone())
    }
}

fn os_release() -> OsRelease {
    let text = read("/etc/os-release")
        .or_else(|| read("/usr/lib/os-release"))
        .unwrap_or_default();
    OsRelease(
        text.lines()
            .filter_map(|line| line.split_once('='))
            .map(|(key, value)| {
                let value = value.trim();
                let unquoted = value
                    .strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                    .unwrap_or(value);
                (key.trim().to_string(), unquoted.to_string())
            })
            .collect(),
    )
}

fn cpu_count(cpuinfo: &str) -> Option<u32> {
    let listed = cpuinfo
        .lines()
        .filter(|line| line.starts_with("processor"))
        .count();
    if listed > 0 {
        return u32::try_from(listed).ok();
    }
    std::thread::available_parallelism()
        .ok()
        .and_then(|count| u32::try_from(count.get()).ok())
}

struct Uname {
    release: Option<String>,
    machine: Option<String>,
}

fn uname() -> Uname {
    // SAFETY: utsname is a plain C struct of byte arrays; zeroes are valid.
    let mut names: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `names` is a valid, writable utsname.
    if unsafe { libc::uname(&mut names) } != 0 {
        return Uname {
            release: None,
            machine: None,
        };
    }
    let text = |field: &[libc::c_char]| {
        let bytes: Vec<u8> = field
            .iter()
            .take_while(|&&ch| ch != 0)
            .map(|&ch| ch as u8)
            .collect();
        Some(String::from_utf8_lossy(&bytes).into_owned()).filter(|text| !text.is_empty())
    };
    Uname {
        release: text(&names.release),
        machine: text(&names.machine),
    }
}

/// The fully qualified name of `hostname`, from the resolver, within 2 s.
fn fqdn(hostname: &str) -> Option<String> {
    let name = std::ffi::CString::new(hostname).ok()?;
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("facts-fqdn".into())
        .spawn(move || {
            let _ = sender.send(canonical_name(&name));
        })
        .ok()?;
    receiver.recv_timeout(Duration::from_secs(2)).ok().flatten()
}

fn canonical_name(name: &std::ffi::CStr) -> Option<String> {
    // SAFETY: addrinfo is a plain C struct; zeroes (null pointers) are valid.
    let mut hints: libc::addrinfo = unsafe { std::mem::zeroed() };
    hints.ai_flags = libc::AI_CANONNAME;
    hints.ai_family = libc::AF_UNSPEC;
    let mut found: *mut libc::addrinfo = std::ptr::null_mut();
    // SAFETY: the name is NUL-terminated, `hints` is valid, `found` writable.
    let status = unsafe { libc::getaddrinfo(name.as_ptr(), std::ptr::null(), &hints, &mut found) };
    if status != 0 || found.is_null() {
        return None;
    }
    // SAFETY: `found` is the list getaddrinfo returned; its first entry
    // carries the canonical name (a NUL-terminated string) or null.
    let canonical = unsafe {
        let entry = &*found;
        (!entry.ai_canonname.is_null()).then(|| {
            std::ffi::CStr::from_ptr(entry.ai_canonname)
                .to_string_lossy()
                .into_owned()
        })
    };
    // SAFETY: `found` came from getaddrinfo and is freed once.
    unsafe { libc::freeaddrinfo(found) };
    canonical.filter(|name| !name.is_empty())
}

/// [`libc`], read once per agent: finding the release means reading the
/// library's few megabytes, and it does not change under a running agent.
fn libc_once() -> (Option<String>, Option<String>) {
    static FOUND: std::sync::OnceLock<(Option<String>, Option<String>)> =
        std::sync::OnceLock::new();
    FOUND.get_or_init(libc).clone()
}

/// The C library, from the files present: glibc's `libc.so.6` (whose text
/// names its release), else musl's loader.
fn libc() -> (Option<String>, Option<String>) {
    let dirs = ["/lib", "/lib64", "/usr/lib", "/usr/lib64"];
    let mut musl = false;
    for dir in dirs {
        let mut candidates = vec![Path::new(dir).join("libc.so.6")];
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            musl |= name.starts_with("ld-musl-");
            if name.contains("-linux-") && entry.path().is_dir() {
                candidates.push(entry.path().join("libc.so.6"));
            }
        }
        for candidate in candidates {
            if let Ok(bytes) = std::fs::read(&candidate) {
                return (Some("glibc".into()), glibc_release(&bytes));
            }
        }
    }
    if musl {
        return (Some("musl".into()), None);
    }
    (None, None)
}

fn glibc_release(bytes: &[u8]) -> Option<String> {
    let needle = b"release version ";
    let at = bytes
        .windows(needle.len())
        .position(|window| window == needle)?
        + needle.len();
    let version: String = bytes[at..]
        .iter()
        .take_while(|&&byte| byte.is_ascii_digit() || byte == b'.')
        .map(|&byte| byte as char)
        .collect();
    Some(version.trim_end_matches('.').to_string()).filter(|version| !version.is_empty())
}

fn container() -> Option<String> {
    if Path::new("/.dockerenv").exists() {
        return Some("docker".into());
    }
    if Path::new("/run/.containerenv").exists() {
        return Some("podman".into());
    }
    if let Ok(environ) = std::fs::read("/proc/1/environ") {
        for entry in environ.split(|&byte| byte == 0) {
            if let Some(kind) = entry.strip_prefix(b"container=") {
                return Some(String::from_utf8_lossy(kind).into_owned());
            }
        }
    }
    let cgroup = read("/proc/1/cgroup").unwrap_or_default();
    for (sign, kind) in [
        ("kubepods", "kubernetes"),
        ("docker", "docker"),
        ("libpod", "podman"),
        ("lxc", "lxc"),
    ] {
        if cgroup.contains(sign) {
            return Some(kind.into());
        }
    }
    None
}

fn virtualization(cpuinfo: &str) -> Option<String> {
    let dmi = ["sys_vendor", "product_name", "board_vendor", "bios_vendor"]
        .iter()
        .filter_map(|file| first_line(&format!("/sys/class/dmi/id/{file}")))
        .collect::<Vec<_>>()
        .join(" ")
        .to_ascii_lowercase();
    for (sign, kind) in [
        ("kvm", "kvm"),
        ("qemu", "qemu"),
        ("vmware", "vmware"),
        ("virtualbox", "virtualbox"),
        ("innotek", "virtualbox"),
        ("xen", "xen"),
        ("microsoft", "hyperv"),
        ("amazon ec2", "kvm"),
        ("google", "kvm"),
        ("bochs", "bochs"),
    ] {
        if dmi.contains(sign) {
            return Some(kind.into());
        }
    }
    if Path::new("/proc/xen").exists() {
        return Some("xen".into());
    }
    let flagged = cpuinfo
        .lines()
        .filter(|line| line.starts_with("flags"))
        .any(|line| line.split_whitespace().any(|flag| flag == "hypervisor"));
    flagged.then(|| "unknown".into())
}

fn interfaces() -> Vec<Interface> {
    let mut found: Vec<Interface> = std::fs::read_dir("/sys/class/net")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let dir = entry.path();
            Interface {
                mac: read(dir.join("address"))
                    .map(|mac| mac.trim().to_string())
                    .filter(|mac| !mac.is_empty() && mac != "00:00:00:00:00:00"),
                up: read(dir.join("operstate")).and_then(|state| match state.trim() {
                    "up" => Some(true),
                    "down" | "lowerlayerdown" | "dormant" => Some(false),
                    _ => None,
                }),
                addresses: Vec::new(),
                name,
            }
        })
        .collect();
    for (name, address, prefix) in addresses() {
        match found.iter_mut().find(|interface| interface.name == name) {
            Some(interface) => interface.addresses.push((address, prefix)),
            None => found.push(Interface {
                name,
                mac: None,
                up: None,
                addresses: vec![(address, prefix)],
            }),
        }
    }
    found.sort_by(|a, b| a.name.cmp(&b.name));
    found
}

/// Every interface address with its prefix length, from getifaddrs.
fn addresses() -> Vec<(String, IpAddr, u8)> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: `list` is a writable pointer for getifaddrs to fill.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Vec::new();
    }
    let mut found = Vec::new();
    let mut cursor = list;
    while !cursor.is_null() {
        // SAFETY: `cursor` walks the list getifaddrs returned, which stays
        // valid until freeifaddrs below; each entry's pointers are null or
        // point into it.
        let entry = unsafe { &*cursor };
        cursor = entry.ifa_next;
        // SAFETY: as above; the name is a NUL-terminated string.
        let name = unsafe { std::ffi::CStr::from_ptr(entry.ifa_name) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: as above; a sockaddr is read by its family.
        let (address, prefix) = unsafe {
            (
                socket_address(entry.ifa_addr),
                socket_address(entry.ifa_netmask),
            )
        };
        if let Some(address) = address {
            let prefix = match prefix {
                Some(IpAddr::V4(mask)) => u32::from(mask).count_ones() as u8,
                Some(IpAddr::V6(mask)) => u128::from(mask).count_ones() as u8,
                None => 0,
            };
            found.push((name, address, prefix));
        }
    }
    // SAFETY: `list` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    found
}

/// The IP address in a sockaddr, for IPv4 and IPv6.
///
/// # Safety
/// `address` must be null or point to a valid sockaddr of its family's size.
unsafe fn socket_address(address: *const libc::sockaddr) -> Option<IpAddr> {
    if address.is_null() {
        return None;
    }
    // SAFETY: the caller promises a valid sockaddr; its family says which
    // larger struct it is.
    unsafe {
        match i32::from((*address).sa_family) {
            libc::AF_INET => {
                let v4 = &*(address as *const libc::sockaddr_in);
                Some(IpAddr::from(u32::from_be(v4.sin_addr.s_addr).to_be_bytes()))
            }
            libc::AF_INET6 => {
                let v6 = &*(address as *const libc::sockaddr_in6);
                Some(IpAddr::from(v6.sin6_addr.s6_addr))
            }
            _ => None,
        }
    }
}

/// The default IPv4 route, from `/proc/net/route`.
fn default_route() -> Option<Route> {
    let table = read("/proc/net/route")?;
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 3 || fields[1] != "00000000" {
            return None;
        }
        let gateway = u32::from_str_radix(fields[2], 16).ok()?;
        Some(Route {
            interface: fields[0].to_string(),
            // The table holds the address in the host's byte order.
            gateway: (gateway != 0).then(|| IpAddr::from(gateway.to_ne_bytes())),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glibc_names_its_release() {
        assert_eq!(
            glibc_release(b"...GNU C Library (Debian GLIBC 2.36-9) stable release version 2.36.\n"),
            Some("2.36".to_string())
        );
        assert_eq!(glibc_release(b"nothing here"), None);
    }
}
