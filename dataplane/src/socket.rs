//! Socket setup: listeners (one `SO_REUSEPORT` socket per shard per address), relay sockets
//! handed over by control, buffer sizes and DONT-FRAGMENT.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsFd;

use socket2::{Domain, Protocol, SockRef, Socket, Type};

use crate::DataPlaneError;
use crate::sys;

/// Socket buffer sizes applied to every socket a shard reads.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct SocketTuning {
    pub(crate) recv_buffer_bytes: Option<usize>,
    pub(crate) send_buffer_bytes: Option<usize>,
}

/// Binds every listen address on every shard. Shard 0 binds first; when the port is 0 the
/// others bind the port the kernel chose for it, so all shards share one `SO_REUSEPORT` group.
/// Returns the sockets per shard and the resolved addresses.
#[allow(clippy::type_complexity)]
pub(crate) fn bind_listeners(
    listen: &[SocketAddr],
    shards: usize,
    tuning: &SocketTuning,
) -> Result<(Vec<Vec<(SocketAddr, UdpSocket)>>, Vec<SocketAddr>), DataPlaneError> {
    let mut per_shard: Vec<Vec<(SocketAddr, UdpSocket)>> = (0..shards)
        .map(|_| Vec::with_capacity(listen.len()))
        .collect();
    let mut resolved = Vec::with_capacity(listen.len());
    for &configured in listen {
        let mut addr = configured;
        for (shard, sockets) in per_shard.iter_mut().enumerate() {
            let shard_id = u16::try_from(shard).unwrap_or(u16::MAX);
            let socket =
                bind_listener(addr, tuning, shard == 0).map_err(|source| DataPlaneError::Bind {
                    addr,
                    shard: shard_id,
                    source,
                })?;
            if shard == 0 {
                addr = socket.local_addr().map_err(|source| DataPlaneError::Bind {
                    addr,
                    shard: shard_id,
                    source,
                })?;
                resolved.push(addr);
            }
            sockets.push((addr, socket));
        }
    }
    Ok((per_shard, resolved))
}

fn bind_listener(addr: SocketAddr, tuning: &SocketTuning, warn: bool) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    apply_buffers(&SockRef::from(&socket), tuning, warn);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Sets the buffer sizes; when `warn`, says which sysctl caps them.
fn apply_buffers(socket: &SockRef<'_>, tuning: &SocketTuning, warn: bool) {
    if let Some(want) = tuning.recv_buffer_bytes {
        let _ = socket.set_recv_buffer_size(want);
        // Linux doubles the value it stores (bookkeeping overhead), so compare with half.
        let got = socket.recv_buffer_size().map(|n| n / 2).unwrap_or(0);
        if warn && got < want {
            tracing::warn!(
                configured = want,
                effective = got,
                "SO_RCVBUF capped by the kernel; raise sysctl net.core.rmem_max"
            );
        }
    }
    if let Some(want) = tuning.send_buffer_bytes {
        let _ = socket.set_send_buffer_size(want);
        let got = socket.send_buffer_size().map(|n| n / 2).unwrap_or(0);
        if warn && got < want {
            tracing::warn!(
                configured = want,
                effective = got,
                "SO_SNDBUF capped by the kernel; raise sysctl net.core.wmem_max"
            );
        }
    }
}

/// Readies a relay socket handed over by control: non-blocking, DF if asked. Its buffer sizes
/// stay the kernel default: a relay socket carries one allocation, and the large buffers of the
/// listeners would let every allocation queue megabytes under a flood.
pub(crate) fn prepare_relay(
    socket: &UdpSocket,
    addr: SocketAddr,
    dont_fragment: bool,
) -> Result<(), DataPlaneError> {
    socket
        .set_nonblocking(true)
        .map_err(|source| DataPlaneError::SocketOption {
            addr,
            what: "O_NONBLOCK",
            source,
        })?;
    if dont_fragment {
        let ipv6 = socket
            .local_addr()
            .map(|a| a.is_ipv6())
            .unwrap_or(addr.is_ipv6());
        sys::set_dont_fragment(socket.as_fd(), ipv6).map_err(|source| {
            DataPlaneError::SocketOption {
                addr,
                what: "IP_MTU_DISCOVER/IPV6_DONTFRAG",
                source,
            }
        })?;
    }
    Ok(())
}
