//! The engine's [`Transport`] and the data plane's [`ClientTransport`] name the same three
//! client transports; the control thread converts at the boundary.

use uturn_dataplane::ClientTransport;

use crate::Transport;

/// Data plane → engine.
pub(crate) fn to_engine(transport: ClientTransport) -> Transport {
    match transport {
        ClientTransport::Udp => Transport::Udp,
        ClientTransport::Tcp => Transport::Tcp,
        ClientTransport::Tls => Transport::Tls,
    }
}

/// Engine → data plane.
pub(crate) fn to_dataplane(transport: Transport) -> ClientTransport {
    match transport {
        Transport::Udp => ClientTransport::Udp,
        Transport::Tcp => ClientTransport::Tcp,
        Transport::Tls => ClientTransport::Tls,
    }
}
