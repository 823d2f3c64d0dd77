//! Two network namespaces joined by a veth pair, created by the test and deleted on drop
//! (the XDP fast path's tests, in `uturn-xdp` and here):
//! `C` holds the client and the peer (veth `uxc`), `S` the TURN server (veth `uxs`). MAC
//! addresses and neighbour entries are fixed, so the program's FIB lookups find a neighbour
//! from the first packet on.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

pub const CLIENT_IF: &str = "uxc";
pub const SERVER_IF: &str = "uxs";
const CLIENT_MAC: &str = "02:00:00:00:c0:01";
const SERVER_MAC: &str = "02:00:00:00:50:02";

/// The addresses of one family in the topology.
#[derive(Debug, Clone, Copy)]
pub struct Addrs {
    pub client: IpAddr,
    pub server: IpAddr,
    pub peer: IpAddr,
}

pub const V4: Addrs = Addrs {
    client: IpAddr::V4(Ipv4Addr::new(10, 200, 0, 1)),
    server: IpAddr::V4(Ipv4Addr::new(10, 200, 0, 2)),
    peer: IpAddr::V4(Ipv4Addr::new(10, 200, 0, 3)),
};

pub const V6: Addrs = Addrs {
    client: IpAddr::V6(Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 1)),
    server: IpAddr::V6(Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 2)),
    peer: IpAddr::V6(Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 3)),
};

pub struct Topology {
    pub client_ns: String,
    pub server_ns: String,
}

/// Why the tests that send from ordinary sockets through XDP cannot run here: those of
/// [`skip_reason`], or no `ethtool` (see [`Topology::disable_tx_checksum`]).
pub fn skip_reason_for_sockets() -> Option<String> {
    skip_reason().or_else(|| {
        Command::new("ethtool")
            .arg("--version")
            .output()
            .is_err()
            .then(|| "ethtool is not installed (apt-get install ethtool)".into())
    })
}

/// Why the netns tests cannot run here, if they cannot.
pub fn skip_reason() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some(
            "not root: network namespaces and XDP need CAP_SYS_ADMIN/CAP_NET_ADMIN/CAP_BPF".into(),
        );
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("iproute2's `ip` is not installed".into());
    }
    None
}

impl Topology {
    /// Creates the namespaces, the veth pair, addresses and neighbours. Panics with the
    /// failing command (a test fixture).
    pub fn create(tag: &str) -> Self {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{}-{n}", std::process::id(), tag);
        let topology = Self {
            client_ns: format!("uxdp-c-{id}"),
            server_ns: format!("uxdp-s-{id}"),
        };
        let (c, s) = (topology.client_ns.as_str(), topology.server_ns.as_str());
        ip(&["netns", "add", c]);
        ip(&["netns", "add", s]);
        ip(&[
            "-n", c, "link", "add", CLIENT_IF, "address", CLIENT_MAC, "type", "veth", "peer",
            "name", SERVER_IF, "address", SERVER_MAC, "netns", s,
        ]);
        for (ns, dev) in [(c, CLIENT_IF), (s, SERVER_IF)] {
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        for (addrs, len) in [(V4, "24"), (V6, "64")] {
            for a in [addrs.client, addrs.peer] {
                ip(&[
                    "-n",
                    c,
                    "addr",
                    "add",
                    &format!("{a}/{len}"),
                    "dev",
                    CLIENT_IF,
                    "nodad",
                ]);
                ip(&[
                    "-n",
                    s,
                    "neigh",
                    "replace",
                    &a.to_string(),
                    "lladdr",
                    CLIENT_MAC,
                    "dev",
                    SERVER_IF,
                    "nud",
                    "permanent",
                ]);
            }
            let a = addrs.server;
            ip(&[
                "-n",
                s,
                "addr",
                "add",
                &format!("{a}/{len}"),
                "dev",
                SERVER_IF,
                "nodad",
            ]);
            ip(&[
                "-n",
                c,
                "neigh",
                "replace",
                &a.to_string(),
                "lladdr",
                SERVER_MAC,
                "dev",
                CLIENT_IF,
                "nud",
                "permanent",
            ]);
        }
        topology
    }

    /// Runs `f` on a thread that has entered namespace `ns`; sockets it creates stay there.
    pub fn run_in<T: Send>(&self, ns: &str, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{ns}");
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let file = std::fs::File::open(&path).expect("netns file");
                    rustix::thread::move_into_link_name_space(
                        file.as_fd(),
                        Some(rustix::thread::LinkNameSpaceType::Network),
                    )
                    .expect("setns");
                    f()
                })
                .join()
                .expect("netns thread")
        })
    }

    /// Turns IPv4 and IPv6 forwarding on for `dev` in `ns` (the kernel's FIB lookup from XDP
    /// answers only for interfaces that forward).
    pub fn enable_forwarding(&self, ns: &str, dev: &str) {
        self.run_in(ns, || {
            for family in ["ipv4", "ipv6"] {
                let path = format!("/proc/sys/net/{family}/conf/{dev}/forwarding");
                std::fs::write(&path, "1").unwrap_or_else(|e| panic!("{path}: {e}"));
            }
        });
    }

    /// Turns transmit checksum offload off on `dev` in `ns` (`ethtool -K DEV tx off`): a
    /// socket's datagram then leaves veth with its full UDP checksum, as one from a real NIC
    /// arrives. With the offload on, veth carries only the pseudo-header sum for the receiver
    /// to complete; an XDP program that retransmits the frame sends it on with that partial
    /// sum, and the final receiver drops it (`InCsumErrors`).
    pub fn disable_tx_checksum(&self, ns: &str, dev: &str) {
        let out = Command::new("ip")
            .args(["netns", "exec", ns, "ethtool", "-K", dev, "tx", "off"])
            .output()
            .expect("run ethtool");
        assert!(
            out.status.success(),
            "ethtool -K {dev} tx off: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `ip -n NS ARGS...`'s standard output.
    pub fn ip_output(&self, ns: &str, args: &[&str]) -> String {
        let mut all = vec!["-n", ns];
        all.extend_from_slice(args);
        let out = Command::new("ip").args(&all).output().expect("run ip");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in [&self.client_ns, &self.server_ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A raw IPPROTO_UDP socket bound to `src`'s IP: the test writes the UDP header and its
/// checksum itself, so it knows the checksum the XDP program starts from and can send a
/// wrong one on purpose.
pub struct RawUdp {
    socket: socket2::Socket,
    src: SocketAddr,
}

impl RawUdp {
    pub fn new(src: SocketAddr) -> Self {
        use socket2::{Domain, Protocol, Socket, Type};
        let domain = if src.is_ipv4() {
            Domain::IPV4
        } else {
            Domain::IPV6
        };
        let socket = Socket::new(domain, Type::RAW, Some(Protocol::UDP)).expect("raw socket");
        socket
            .bind(&SocketAddr::new(src.ip(), 0).into())
            .expect("bind raw socket");
        Self { socket, src }
    }

    /// Sends `payload` from `self.src` to `dst`; `corrupt` flips the checksum.
    pub fn send(&self, dst: SocketAddr, payload: &[u8], corrupt: bool) {
        let len = 8 + payload.len();
        let mut datagram = Vec::with_capacity(len);
        datagram.extend_from_slice(&self.src.port().to_be_bytes());
        datagram.extend_from_slice(&dst.port().to_be_bytes());
        datagram.extend_from_slice(&(len as u16).to_be_bytes());
        datagram.extend_from_slice(&[0, 0]);
        datagram.extend_from_slice(payload);
        let mut check = udp_checksum(self.src.ip(), dst.ip(), &datagram);
        if corrupt {
            check ^= 0x0101;
        }
        datagram[6..8].copy_from_slice(&check.to_be_bytes());
        // Raw sockets take the protocol, not a port, in the destination.
        let to = SocketAddr::new(dst.ip(), 0);
        let sent = self
            .socket
            .send_to(&datagram, &to.into())
            .expect("raw send");
        assert_eq!(sent, datagram.len());
    }
}

/// RFC 768 / RFC 8200 §8.1 checksum over the pseudo-header and the datagram (checksum 0).
pub fn udp_checksum(src: IpAddr, dst: IpAddr, datagram: &[u8]) -> u16 {
    let mut sum: u64 = 0;
    let mut add = |bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            let hi = u64::from(pair[0]) << 8;
            let lo = pair.get(1).copied().map_or(0, u64::from);
            sum += hi | lo;
        }
    };
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            add(&s.octets());
            add(&d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            add(&s.octets());
            add(&d.octets());
        }
        _ => panic!("mixed families"),
    }
    add(&[0, 17]);
    add(&(datagram.len() as u16).to_be_bytes());
    add(datagram);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    match !(sum as u16) {
        0 => 0xffff,
        c => c,
    }
}
