//! Batched UDP I/O with `sendmmsg`/`recvmmsg` and UDP GSO `sendmsg` (through nix's safe
//! wrappers) and an epoll set.
//!
//! Why hand-written: the harness must not be the bottleneck, so it pays one system call per
//! batch of up to [`BATCH`] datagrams rather than one per datagram, and one event loop per
//! worker thread watches every socket with epoll instead of a thread per socket. io_uring would
//! batch across sockets too, but its submission API is `unsafe`, which this crate forbids.
//! System calls are not what costs most, though: on loopback each datagram's trip through the
//! kernel does, so a batch made [`Batch::with_gso`] sends a run of datagrams to one
//! destination as one GSO send, one trip through the sending stack for the whole run.
//!
//! Buffers are allocated once per [`Batch`]; the only allocation per call is the small vector
//! of `IoSlice`s that nix's API needs to borrow the buffers (one per batch, not per packet).

use std::io::{IoSlice, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

use nix::errno::Errno;
use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg,
    sendmmsg, sendmsg, setsockopt, sockopt,
};
use nix::sys::time::{TimeSpec, TimeVal};

/// Datagrams per system call.
pub const BATCH: usize = 64;
/// Room for any datagram this harness sends or expects (payload ≤ 1,400 plus TURN headers);
/// larger ones are truncated and then fail to parse, which counts them as foreign.
pub const SLOT_LEN: usize = 2048;
/// Datagrams one UDP GSO send carries at most (the kernel's `UDP_MAX_SEGMENTS` is 64 on older
/// kernels, 128 on newer ones).
const GSO_SEGMENTS_MAX: usize = 64;
/// Payload bytes one UDP GSO send carries at most: under a UDP datagram's 65,507-byte limit,
/// which the kernel applies to the whole send before it splits it.
const GSO_BYTES_MAX: usize = 60_000;
/// Socket buffer size asked for, so bursts of one pacing tick are not dropped by the kernel
/// on the harness's side.
const SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// A fixed set of [`BATCH`] datagram slots with lengths and addresses.
pub struct Batch {
    bufs: Vec<u8>,
    lens: Vec<usize>,
    addrs: Vec<Option<SocketAddr>>,
    len: usize,
    /// Kernel receive time of each datagram (SO_TIMESTAMPNS, CLOCK_REALTIME ns), 0 if absent.
    rx_ns: Vec<u64>,
    /// recvmmsg headers, with room for one SCM_TIMESTAMPNS per datagram.
    headers: MultiHeaders<SockaddrStorage>,
    /// sendmmsg headers, without a control buffer (nix would hand an unused one to the
    /// kernel as control data, which makes sendmmsg fail with EINVAL).
    send_headers: MultiHeaders<SockaddrStorage>,
    storage: Vec<Option<SockaddrStorage>>,
    /// Whether [`Batch::send`] may hand a run of equal-sized datagrams to one destination to
    /// the kernel as one UDP GSO send (`UDP_SEGMENT`). Turned off for good when the kernel
    /// refuses one.
    gso: bool,
    /// Datagrams this batch has sent inside GSO sends, for the report.
    gso_datagrams: u64,
}

impl Default for Batch {
    fn default() -> Self {
        Self::new()
    }
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Self {
            bufs: vec![0; BATCH * SLOT_LEN],
            lens: vec![0; BATCH],
            addrs: vec![None; BATCH],
            len: 0,
            rx_ns: vec![0; BATCH],
            headers: MultiHeaders::preallocate(BATCH, Some(nix::cmsg_space!(TimeSpec))),
            send_headers: MultiHeaders::preallocate(BATCH, None),
            storage: Vec::with_capacity(BATCH),
            gso: false,
            gso_datagrams: 0,
        }
    }

    /// An empty batch whose [`Batch::send`] uses UDP GSO where it can.
    ///
    /// Why: on loopback the sender's core also runs the receiver's side of every datagram, so
    /// a generator that sends one datagram per stack traversal costs as much per packet as
    /// the relay it loads, and runs out first. A GSO send of N datagrams to one destination
    /// traverses the sending stack once; the receiving kernel splits it back into N datagrams
    /// before any socket sees them (a socket without `UDP_GRO` never sees the batch), so the
    /// server under test receives exactly what N separate sends would have given it.
    pub fn with_gso() -> Self {
        Self {
            gso: true,
            ..Self::new()
        }
    }

    /// Whether sends still try UDP GSO (false after the kernel refused one).
    pub fn gso(&self) -> bool {
        self.gso
    }

    /// Datagrams sent inside GSO sends so far.
    pub fn gso_datagrams(&self) -> u64 {
        self.gso_datagrams
    }

    /// Number of datagrams held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether no slot is left.
    pub fn is_full(&self) -> bool {
        self.len == BATCH
    }

    /// Forgets every datagram.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// The next free slot, to be filled by the caller and committed with [`Batch::commit`];
    /// `None` when full.
    pub fn slot(&mut self) -> Option<&mut [u8]> {
        let start = self.len.checked_mul(SLOT_LEN)?;
        self.bufs.get_mut(start..start + SLOT_LEN)
    }

    /// Commits the slot returned by [`Batch::slot`] with `len` bytes for `to` (`None` on a
    /// connected socket).
    pub fn commit(&mut self, len: usize, to: Option<SocketAddr>) {
        if self.len < BATCH {
            self.lens[self.len] = len.min(SLOT_LEN);
            self.addrs[self.len] = to;
            self.len += 1;
        }
    }

    /// Copies `bytes` into the next slot; `false` when full or too long.
    pub fn push(&mut self, bytes: &[u8], to: Option<SocketAddr>) -> bool {
        let n = bytes.len();
        match self.slot() {
            Some(slot) if n <= SLOT_LEN => {
                slot[..n].copy_from_slice(bytes);
                self.commit(n, to);
                true
            }
            _ => false,
        }
    }

    /// Datagram `i`: bytes and address.
    pub fn get(&self, i: usize) -> Option<(&[u8], Option<SocketAddr>)> {
        if i >= self.len {
            return None;
        }
        let start = i * SLOT_LEN;
        let bytes = self.bufs.get(start..start + self.lens[i])?;
        Some((bytes, self.addrs[i]))
    }

    /// Kernel receive time of datagram `i` in CLOCK_REALTIME ns (0 when the socket does not
    /// have [`enable_rx_timestamps`]).
    pub fn rx_ns(&self, i: usize) -> u64 {
        self.rx_ns.get(i).copied().unwrap_or(0)
    }

    /// Sends every datagram held on `socket` in as few system calls as it takes, then clears
    /// the batch: a run of datagrams to one destination goes as one UDP GSO send when the
    /// batch was made [`Batch::with_gso`], the rest through `sendmmsg`. Returns (sent,
    /// failed); a full socket buffer (`EAGAIN`) or any other error counts the rest as failed
    /// rather than blocking the event loop.
    pub fn send(&mut self, socket: &UdpSocket) -> (u64, u64) {
        let total = self.len;
        let mut done = 0;
        while done < total {
            let run = self.gso_run(done);
            let sent = if run >= 2 {
                match self.send_gso(socket, done, run) {
                    // The kernel does not take UDP_SEGMENT here (too old, or a route whose
                    // device cannot checksum the segments): plain sends from now on.
                    Err(Errno::EINVAL | Errno::EIO | Errno::ENOPROTOOPT | Errno::EOPNOTSUPP) => {
                        self.gso = false;
                        continue;
                    }
                    other => other,
                }
            } else {
                // Plain sends up to where the next GSO run starts.
                let end = (done + 1..total)
                    .find(|&i| self.gso_run(i) >= 2)
                    .unwrap_or(total);
                self.send_from(socket, done, end)
            };
            match sent {
                Ok(0) | Err(_) => break,
                Ok(n) => done += n,
            }
        }
        self.len = 0;
        (done as u64, (total - done) as u64)
    }

    /// How many datagrams from `first` on one GSO send can carry: same destination, equal
    /// lengths (the last may be shorter, as GSO allows), within the kernel's limits. 1 when
    /// GSO is off.
    fn gso_run(&self, first: usize) -> usize {
        let segment = self.lens[first];
        if !self.gso || segment == 0 {
            return 1;
        }
        let mut end = first + 1;
        let mut bytes = segment;
        while end < self.len
            && end - first < GSO_SEGMENTS_MAX
            && self.lens[end - 1] == segment
            && self.lens[end] <= segment
            && self.lens[end] > 0
            && bytes + self.lens[end] <= GSO_BYTES_MAX
            && self.addrs[end] == self.addrs[first]
        {
            bytes += self.lens[end];
            end += 1;
        }
        end - first
    }

    /// One `sendmsg` with `UDP_SEGMENT` carrying datagrams `first..first + run`, each its own
    /// iovec (no copy): all of them or none.
    fn send_gso(&mut self, socket: &UdpSocket, first: usize, run: usize) -> Result<usize, Errno> {
        let segment = u16::try_from(self.lens[first]).map_err(|_| Errno::EMSGSIZE)?;
        let iovs: Vec<IoSlice<'_>> = (first..first + run)
            .map(|i| {
                let start = i * SLOT_LEN;
                IoSlice::new(&self.bufs[start..start + self.lens[i]])
            })
            .collect();
        let cmsgs = [ControlMessage::UdpGsoSegments(&segment)];
        let to = self.addrs[first].map(SockaddrStorage::from);
        loop {
            match sendmsg(
                socket.as_raw_fd(),
                &iovs,
                &cmsgs,
                MsgFlags::MSG_DONTWAIT,
                to.as_ref(),
            ) {
                Ok(_) => {
                    self.gso_datagrams += run as u64;
                    return Ok(run);
                }
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// One `sendmmsg` of datagrams `first..end`; returns how many the kernel took.
    fn send_from(&mut self, socket: &UdpSocket, first: usize, end: usize) -> Result<usize, Errno> {
        let Self {
            bufs,
            lens,
            addrs,
            send_headers: headers,
            storage,
            ..
        } = self;
        let iovs: Vec<[IoSlice<'_>; 1]> = (first..end)
            .map(|i| {
                let start = i * SLOT_LEN;
                [IoSlice::new(&bufs[start..start + lens[i]])]
            })
            .collect();
        storage.clear();
        storage.extend(
            addrs[first..end]
                .iter()
                .map(|a| a.map(SockaddrStorage::from)),
        );
        loop {
            match sendmmsg(
                socket.as_raw_fd(),
                headers,
                &iovs,
                &storage[..],
                [],
                MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(results) => return Ok(results.count()),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Receives up to [`BATCH`] datagrams without blocking, replacing the contents. Returns
    /// how many arrived (0 when none was waiting).
    pub fn recv(&mut self, socket: &UdpSocket) -> Result<usize, Errno> {
        let Self {
            bufs,
            lens,
            addrs,
            len,
            rx_ns,
            headers,
            ..
        } = self;
        *len = 0;
        let mut iovs: Vec<[IoSliceMut<'_>; 1]> = bufs
            .chunks_mut(SLOT_LEN)
            .map(|c| [IoSliceMut::new(c)])
            .collect();
        // EINTR and EAGAIN both mean "nothing now": the event loop comes back on the next
        // readiness, so no retry loop is needed here.
        let results = match recvmmsg(
            socket.as_raw_fd(),
            headers,
            iovs.iter_mut(),
            MsgFlags::MSG_DONTWAIT,
            None,
        ) {
            Ok(r) => r,
            Err(Errno::EINTR | Errno::EAGAIN) => return Ok(0),
            Err(e) => return Err(e),
        };
        for (i, msg) in results.enumerate() {
            lens[i] = msg.bytes.min(SLOT_LEN);
            addrs[i] = msg
                .address
                .and_then(|a: SockaddrStorage| to_socket_addr(&a));
            rx_ns[i] = msg
                .cmsgs()
                .ok()
                .and_then(|mut c| {
                    c.find_map(|m| match m {
                        ControlMessageOwned::ScmTimestampns(ts) => Some(timespec_ns(&ts)),
                        _ => None,
                    })
                })
                .unwrap_or(0);
            *len = i + 1;
        }
        Ok(*len)
    }
}

fn timespec_ns(ts: &TimeSpec) -> u64 {
    u64::try_from(ts.tv_sec())
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(ts.tv_nsec()).unwrap_or(0))
}

/// Now on CLOCK_REALTIME in ns: the clock of kernel receive timestamps, so send stamps use it
/// too (both ends are in this process, so the clocks are the same clock).
pub fn realtime_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Asks the kernel to stamp each datagram when it arrives (SO_TIMESTAMPNS), so latency does
/// not include the time the event loop takes to come round to the socket.
pub fn enable_rx_timestamps(socket: &UdpSocket) -> bool {
    setsockopt(socket, sockopt::ReceiveTimestampns, &true).is_ok()
}

/// The standard-library address of a nix socket address (IPv4 or IPv6 only).
pub fn to_socket_addr(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::from(*v4));
    }
    a.as_sockaddr_in6().map(|v6| SocketAddr::from(*v6))
}

/// Binds a UDP socket on `ip` (port chosen by the OS), enlarges its buffers (best effort: the
/// forced variants need CAP_NET_ADMIN, the plain ones are capped by net.core.*mem_max).
pub fn bind_udp(ip: std::net::IpAddr) -> std::io::Result<UdpSocket> {
    let socket = UdpSocket::bind(SocketAddr::new(ip, 0))?;
    enlarge_buffers(&socket);
    Ok(socket)
}

/// A TCP connection from `local` (port chosen by the OS) to `server`, the connect bounded by
/// `timeout` (SO_SNDTIMEO bounds a blocking connect on Linux). The load generator spreads its
/// stream clients over loopback addresses so that a server's per-source connection limit sees
/// what it would see from many clients.
pub fn connect_tcp_from(
    local: std::net::IpAddr,
    server: SocketAddr,
    timeout: std::time::Duration,
) -> std::io::Result<std::net::TcpStream> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrStorage, bind, connect};
    let family = match local {
        std::net::IpAddr::V4(_) => AddressFamily::Inet,
        std::net::IpAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = nix::sys::socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    let tv = TimeVal::new(
        timeout.as_secs().try_into().unwrap_or(i64::MAX),
        timeout.subsec_micros().into(),
    );
    setsockopt(&fd, sockopt::SendTimeout, &tv)?;
    bind(
        fd.as_raw_fd(),
        &SockaddrStorage::from(SocketAddr::new(local, 0)),
    )?;
    connect(fd.as_raw_fd(), &SockaddrStorage::from(server))?;
    let stream = std::net::TcpStream::from(fd);
    stream.set_write_timeout(None)?;
    Ok(stream)
}

/// Best-effort larger socket buffers.
pub fn enlarge_buffers(socket: &UdpSocket) {
    if setsockopt(socket, sockopt::RcvBufForce, &SOCKET_BUFFER_BYTES).is_err() {
        let _ = setsockopt(socket, sockopt::RcvBuf, &SOCKET_BUFFER_BYTES);
    }
    if setsockopt(socket, sockopt::SndBufForce, &SOCKET_BUFFER_BYTES).is_err() {
        let _ = setsockopt(socket, sockopt::SndBuf, &SOCKET_BUFFER_BYTES);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};
    use std::time::{Duration, Instant};

    #[test]
    fn a_batch_crosses_loopback_in_order_with_addresses() {
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let (a, b) = (bind_udp(lo).unwrap(), bind_udp(lo).unwrap());
        let to = b.local_addr().unwrap();
        let mut out = Batch::new();
        for i in 0..10u8 {
            assert!(out.push(&[i; 3], Some(to)));
        }
        assert_eq!(out.send(&a), (10, 0));
        assert!(out.is_empty());
        let mut got = Vec::new();
        let mut inbox = Batch::new();
        let deadline = Instant::now() + Duration::from_secs(2);
        while got.len() < 10 && Instant::now() < deadline {
            inbox.recv(&b).unwrap();
            for i in 0..inbox.len() {
                let (bytes, from) = inbox.get(i).unwrap();
                assert_eq!(from, Some(a.local_addr().unwrap()));
                got.push(bytes.to_vec());
            }
        }
        assert_eq!(got, (0..10u8).map(|i| vec![i; 3]).collect::<Vec<_>>());
    }

    #[test]
    fn received_datagrams_carry_the_kernel_arrival_time() {
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let (a, b) = (bind_udp(lo).unwrap(), bind_udp(lo).unwrap());
        assert!(enable_rx_timestamps(&b));
        let before = realtime_ns();
        a.send_to(b"t", b.local_addr().unwrap()).unwrap();
        let mut inbox = Batch::new();
        let deadline = Instant::now() + Duration::from_secs(2);
        while inbox.recv(&b).unwrap() == 0 && Instant::now() < deadline {}
        let rx = inbox.rx_ns(0);
        assert!(rx >= before && rx <= realtime_ns(), "{before} <= {rx}");
    }

    /// Reads datagrams from `socket` until `n` arrived or two seconds passed.
    fn receive_n(socket: &UdpSocket, n: usize) -> Vec<(Vec<u8>, Option<SocketAddr>)> {
        let mut got = Vec::new();
        let mut inbox = Batch::new();
        let deadline = Instant::now() + Duration::from_secs(2);
        while got.len() < n && Instant::now() < deadline {
            inbox.recv(socket).unwrap();
            for i in 0..inbox.len() {
                let (bytes, from) = inbox.get(i).unwrap();
                got.push((bytes.to_vec(), from));
            }
        }
        got
    }

    #[test]
    fn a_gso_send_arrives_as_the_separate_datagrams_it_carried() {
        a_gso_send_arrives_whole_on(IpAddr::V4(Ipv4Addr::LOCALHOST));
        a_gso_send_arrives_whole_on(IpAddr::V6(std::net::Ipv6Addr::LOCALHOST));
    }

    fn a_gso_send_arrives_whole_on(lo: IpAddr) {
        let (a, b) = (bind_udp(lo).unwrap(), bind_udp(lo).unwrap());
        a.connect(b.local_addr().unwrap()).unwrap();
        let mut out = Batch::with_gso();
        // Five of 100 bytes and a shorter last one: one run, as GSO allows.
        let sent: Vec<Vec<u8>> = (0..6u8)
            .map(|i| vec![i; if i == 5 { 40 } else { 100 }])
            .collect();
        for d in &sent {
            assert!(out.push(d, None));
        }
        assert_eq!(out.gso_run(0), 6);
        assert_eq!(out.send(&a), (6, 0));
        assert!(out.gso(), "loopback takes UDP_SEGMENT (Linux 4.18+)");
        let got = receive_n(&b, 6);
        let from = Some(a.local_addr().unwrap());
        assert_eq!(got, sent.into_iter().map(|d| (d, from)).collect::<Vec<_>>());
    }

    #[test]
    fn a_gso_run_stops_where_the_size_or_the_destination_changes() {
        let to = |port| Some(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
        let mut batch = Batch::with_gso();
        for (len, port) in [(100, 1), (100, 1), (60, 1), (100, 1), (100, 2), (200, 2)] {
            assert!(batch.push(&vec![0; len], to(port)));
        }
        // 100, 100, 60: the shorter one ends the run it belongs to.
        assert_eq!(batch.gso_run(0), 3);
        // 100 to port 1, then port 2.
        assert_eq!(batch.gso_run(3), 1);
        // 100 then a longer 200: only the last of a run may differ, and only shorter.
        assert_eq!(batch.gso_run(4), 1);
        // Without GSO every datagram is its own run.
        let mut plain = Batch::new();
        assert!(plain.push(&[0; 100], None) && plain.push(&[0; 100], None));
        assert_eq!(plain.gso_run(0), 1);
    }

    #[test]
    fn a_gso_batch_to_several_destinations_arrives_whole() {
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let (a, b, c) = (
            bind_udp(lo).unwrap(),
            bind_udp(lo).unwrap(),
            bind_udp(lo).unwrap(),
        );
        let (to_b, to_c) = (b.local_addr().unwrap(), c.local_addr().unwrap());
        let mut out = Batch::with_gso();
        // A lone datagram first: the runs after it still go by GSO.
        for (i, to) in [to_c, to_b, to_b, to_b, to_c, to_c, to_b]
            .into_iter()
            .enumerate()
        {
            assert!(out.push(&[i as u8; 50], Some(to)));
        }
        assert_eq!(out.send(&a), (7, 0));
        assert_eq!(out.gso_datagrams(), 5, "the runs of three and two");
        let at_b: Vec<u8> = receive_n(&b, 4).iter().map(|(d, _)| d[0]).collect();
        let at_c: Vec<u8> = receive_n(&c, 3).iter().map(|(d, _)| d[0]).collect();
        assert_eq!((at_b, at_c), (vec![1, 2, 3, 6], vec![0, 4, 5]));
    }

    #[test]
    fn a_full_batch_refuses_more() {
        let mut batch = Batch::new();
        for _ in 0..BATCH {
            assert!(batch.push(b"x", None));
        }
        assert!(batch.is_full() && !batch.push(b"x", None));
        assert!(!Batch::new().push(&[0; SLOT_LEN + 1], None));
    }
}
