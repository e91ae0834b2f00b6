//! Hosts with their own addresses: network namespaces joined to this one by
//! a veth pair, which tests can cut off with `iptables` DROP rules.
//!
//! [`NetnsHost::create`] makes a namespace `chopsticks-PID-N` with the
//! address `10.213.X.2/30`, reachable from here as `10.213.X.1`'s peer.
//! Processes started with [`NetnsHost::command`] live in it (they share this
//! machine's processes and files, only the network is theirs).
//! [`NetnsHost::partition`] drops every packet in and out of it, as a pulled
//! cable would: nothing is closed, nothing answers. Dropping the fixture
//! deletes the namespace and the veth pair.
//!
//! Needs root, `ip` (iproute2) and `iptables`.
//!
//! ```no_run
//! let host = chopsticks_testkit::netns::NetnsHost::create().expect("netns");
//! let status = host.command("true").status().expect("ip netns exec");
//! assert!(status.success());
//! host.partition().expect("iptables");
//! ```

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// A network namespace with one address, joined to this namespace.
#[derive(Debug)]
pub struct NetnsHost {
    name: String,
    outside: String,
    address: Ipv4Addr,
}

fn ip(args: &[&str]) -> Result<(), String> {
    crate::run(Command::new("ip").args(args))
}

impl NetnsHost {
    /// Creates the namespace, its veth pair and addresses.
    pub fn create() -> Result<NetnsHost, String> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("network namespaces need root".into());
        }
        for tool in ["ip", "iptables"] {
            if !crate::tool_exists(tool) {
                return Err(format!(
                    "{tool} is not installed (scripts/test.sh installs iproute2 and iptables)"
                ));
            }
        }
        let pid = std::process::id();
        let number = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("chopsticks-{pid}-{number}");
        // Interface names have at most 15 bytes.
        let tag = format!("{:x}{number}", pid % 0x10000);
        let (outside, inside) = (format!("cso{tag}"), format!("csi{tag}"));
        // A /30 per host, spread by process so parallel runs rarely meet.
        let slot = (pid.wrapping_mul(7).wrapping_add(number)) % 16_000;
        let (third, fourth) = ((slot / 64) as u8, ((slot % 64) * 4) as u8);
        let here = Ipv4Addr::new(10, 213, third, fourth + 1);
        let address = Ipv4Addr::new(10, 213, third, fourth + 2);
        let host = NetnsHost {
            name: name.clone(),
            outside: outside.clone(),
            address,
        };
        ip(&["netns", "add", &name])?;
        ip(&[
            "link", "add", &outside, "type", "veth", "peer", "name", &inside,
        ])?;
        ip(&["link", "set", &inside, "netns", &name])?;
        ip(&["addr", "add", &format!("{here}/30"), "dev", &outside])?;
        ip(&["link", "set", &outside, "up"])?;
        let inside_ip = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &name, "ip"];
            all.extend_from_slice(args);
            ip(&all)
        };
        inside_ip(&["addr", "add", &format!("{address}/30"), "dev", &inside])?;
        inside_ip(&["link", "set", &inside, "up"])?;
        inside_ip(&["link", "set", "lo", "up"])?;
        Ok(host)
    }

    /// The host's address, reachable from this namespace.
    pub fn address(&self) -> Ipv4Addr {
        self.address
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }

    /// Drops every packet into and out of the host: established connections
    /// hang, new ones time out.
    pub fn partition(&self) -> Result<(), String> {
        for chain in ["INPUT", "OUTPUT"] {
            crate::run(self.command("iptables").args(["-A", chain, "-j", "DROP"]))?;
        }
        Ok(())
    }

    /// Lets packets through again.
    pub fn heal(&self) -> Result<(), String> {
        for chain in ["INPUT", "OUTPUT"] {
            crate::run(self.command("iptables").args(["-D", chain, "-j", "DROP"]))?;
        }
        Ok(())
    }
}

impl Drop for NetnsHost {
    fn drop(&mut self) {
        let _ = ip(&["netns", "delete", &self.name]);
        let _ = ip(&["link", "delete", &self.outside]);
    }
}

/// A [`NetnsHost`], or `None` with a note when the prerequisites are missing
/// — except under `CI=true`, where a missing prerequisite is a failure.
pub fn netns_or_skip(test: &str) -> Option<NetnsHost> {
    crate::require(NetnsHost::create(), test)
}
