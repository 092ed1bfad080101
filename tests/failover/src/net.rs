//! Network namespaces joined to the simulation's own namespace by veth pairs: each "node" and
//! each module gets one, with `10.X.k.1` on the simulation's side and `10.X.k.2` inside.
//! Modules resolve the gateway host name to their link's `10.X.k.1` (`/etc/netns/NAME/hosts`),
//! where the forwarder listens; the forwarder dials a node at its `10.X.k.2`.

use std::net::Ipv4Addr;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::error::SimError;

/// The host name modules dial (the hub's certificate names it).
pub const GATEWAY_HOSTNAME: &str = "edgehub-gw";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Runs `ip ARGS`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<(), SimError> {
    run_ok(Command::new("ip").args(args))
}

/// Runs a command to its end, failing with its stderr when it does not succeed.
pub fn run_ok(cmd: &mut Command) -> Result<(), SimError> {
    let out = output(cmd)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(SimError::Command {
            what: format!("{cmd:?}"),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Runs a command to its end and returns what it printed.
pub fn output(cmd: &mut Command) -> Result<Output, SimError> {
    cmd.stdin(Stdio::null())
        .output()
        .map_err(|e| SimError::io(format!("run {cmd:?}"), e))
}

/// One namespace and its link.
#[derive(Debug)]
pub struct Space {
    /// `ip netns` name.
    pub name: String,
    /// The link's end in the simulation's namespace.
    pub host_if: String,
    /// The address on the simulation's side (where the forwarder listens for modules).
    pub host_ip: Ipv4Addr,
    /// The address inside the namespace (where a node's hub listens).
    pub ns_ip: Ipv4Addr,
}

impl Space {
    /// `ip netns exec NAME program`.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Cuts the link (a partition): the namespace keeps running, nothing reaches it.
    pub fn cut(&self) -> Result<(), SimError> {
        ip(&["link", "set", &self.host_if, "down"])
    }

    /// The pids inside the namespace.
    pub fn pids(&self) -> Vec<u32> {
        output(Command::new("ip").args(["netns", "pids", &self.name]))
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The namespaces of one run; dropping it kills what is left inside them and deletes them.
#[derive(Debug)]
pub struct Net {
    spaces: Vec<Space>,
    subnet: u8,
}

impl Net {
    /// Namespaces named `edgehub-fo-PID-N-ROLE` for each node and module, on a free
    /// `10.X.0.0/16`. Inside a node's namespace the gateway host name is its own 127.0.0.1
    /// (a module on that node); inside a module's, the Service's address on its link.
    pub fn new(nodes: &[&str], modules: &[&str]) -> Result<Net, SimError> {
        let roles: Vec<&str> = nodes.iter().chain(modules).copied().collect();
        let taken = output(Command::new("ip").args(["-4", "-o", "addr", "show"]))?;
        let taken = String::from_utf8_lossy(&taken.stdout).into_owned();
        let pid = std::process::id();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut subnet = None;
        for i in 0..150u32 {
            let x = 64 + ((pid.wrapping_mul(7).wrapping_add(n * 13).wrapping_add(i)) % 150) as u8;
            if !taken.contains(&format!(" 10.{x}.")) {
                subnet = Some(x);
                break;
            }
        }
        let subnet = subnet.ok_or_else(|| SimError::Command {
            what: "choose a subnet".into(),
            detail: "every 10.64-213.0.0/16 is in use".into(),
        })?;
        let mut net = Net {
            spaces: Vec::new(),
            subnet,
        };
        for (k, role) in roles.iter().enumerate() {
            let k = k as u8 + 1;
            let name = format!("edgehub-fo-{pid}-{n}-{role}");
            let host_if = format!("fo{subnet}x{n}{k}h");
            let peer = format!("fo{subnet}x{n}{k}n");
            let host_ip = Ipv4Addr::new(10, subnet, k, 1);
            let ns_ip = Ipv4Addr::new(10, subnet, k, 2);
            ip(&["netns", "add", &name])?;
            net.spaces.push(Space {
                name: name.clone(),
                host_if: host_if.clone(),
                host_ip,
                ns_ip,
            });
            ip(&["-n", &name, "link", "set", "lo", "up"])?;
            ip(&[
                "link", "add", &host_if, "type", "veth", "peer", "name", &peer, "netns", &name,
            ])?;
            ip(&["addr", "add", &format!("{host_ip}/24"), "dev", &host_if])?;
            ip(&["link", "set", &host_if, "up"])?;
            ip(&[
                "-n",
                &name,
                "addr",
                "add",
                &format!("{ns_ip}/24"),
                "dev",
                &peer,
            ])?;
            ip(&["-n", &name, "link", "set", &peer, "up"])?;
            let etc = std::path::Path::new("/etc/netns").join(&name);
            std::fs::create_dir_all(&etc)
                .map_err(|e| SimError::io(format!("create {}", etc.display()), e))?;
            // A node's own modules reach its hub directly; the others go through the Service.
            let gateway = if k as usize <= nodes.len() {
                Ipv4Addr::LOCALHOST
            } else {
                host_ip
            };
            let hosts = format!("127.0.0.1 localhost\n{gateway} {GATEWAY_HOSTNAME}\n");
            std::fs::write(etc.join("hosts"), hosts)
                .map_err(|e| SimError::io(format!("write {}/hosts", etc.display()), e))?;
        }
        Ok(net)
    }

    /// The namespace of `role` (as given to [`Net::new`]).
    pub fn space(&self, role: &str) -> Option<&Space> {
        self.spaces
            .iter()
            .find(|s| s.name.ends_with(&format!("-{role}")))
    }

    /// The second octet of this run's addresses.
    pub fn subnet(&self) -> u8 {
        self.subnet
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for s in &self.spaces {
            // Only processes this run started can be inside namespaces it made.
            for pid in s.pids() {
                let _ = output(Command::new("kill").args(["-KILL", &pid.to_string()]));
            }
            let _ = ip(&["netns", "del", &s.name]);
            let _ = ip(&["link", "del", &s.host_if]);
            let _ = std::fs::remove_dir_all(std::path::Path::new("/etc/netns").join(&s.name));
        }
    }
}
