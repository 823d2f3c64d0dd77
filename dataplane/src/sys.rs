//! Raw syscalls the data plane needs beyond std and socket2: CPU affinity, eventfd, socket
//! options socket2 lacks, epoll, and `recvmmsg`/`sendmmsg` batches for the fallback backend.
//!
//! Every pointer handed to the kernel here points into memory owned by the same struct and is
//! rebuilt right before the call, so the safe wrappers cannot leave the kernel a dangling one.

use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use crate::addr::{self, RawSockAddr, SOCKADDR_LEN_MAX};

/// The CPUs this process may run on (`sched_getaffinity`), in ascending order.
pub(crate) fn allowed_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data; all-zero is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable cpu_set_t of the size passed.
    let rc = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut cpus = Vec::new();
    for cpu in 0..libc::CPU_SETSIZE as usize {
        // SAFETY: `cpu` is below CPU_SETSIZE and `set` is initialised.
        if unsafe { libc::CPU_ISSET(cpu, &set) } {
            cpus.push(cpu);
        }
    }
    Ok(cpus)
}

/// Pins the calling thread to `cpu`.
pub(crate) fn pin_current_thread(cpu: usize) -> io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // SAFETY: plain data; all-zero is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` < CPU_SETSIZE (checked above).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 = the calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A non-blocking eventfd (counter starts at 0).
pub(crate) fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: no pointers; the flags are valid for eventfd(2).
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: eventfd returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn setsockopt_int(fd: BorrowedFd<'_>, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: `value` is a live c_int and its size is passed; `fd` is a valid descriptor.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// RFC 8656 §14 DONT-FRAGMENT: set the DF bit on everything the socket sends.
pub(crate) fn set_dont_fragment(fd: BorrowedFd<'_>, ipv6: bool) -> io::Result<()> {
    if ipv6 {
        setsockopt_int(
            fd,
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_DO,
        )?;
        setsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_DONTFRAG, 1)
    } else {
        setsockopt_int(
            fd,
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DO,
        )
    }
}

/// A level-triggered epoll instance whose events carry a `u64` token.
#[derive(Debug)]
pub(crate) struct Epoll {
    fd: OwnedFd,
    events: Vec<libc::epoll_event>,
}

impl Epoll {
    pub(crate) fn new(capacity: usize) -> io::Result<Self> {
        // SAFETY: no pointers.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self {
            fd,
            events: vec![libc::epoll_event { events: 0, u64: 0 }; capacity.max(1)],
        })
    }

    pub(crate) fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: `event` is a valid epoll_event for the duration of the call.
        let rc =
            unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut event) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Registers `fd` for `events` (`libc::EPOLLIN`, `EPOLLOUT`, ...).
    pub(crate) fn add_events(&self, fd: RawFd, token: u64, events: i32) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, token, events)
    }

    /// Changes the events `fd` is registered for.
    pub(crate) fn modify(&self, fd: RawFd, token: u64, events: i32) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, token, events)
    }

    fn ctl(&self, op: i32, fd: RawFd, token: u64, events: i32) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: events as u32,
            u64: token,
        };
        // SAFETY: `event` is a valid epoll_event for the duration of the call.
        let rc = unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd, &mut event) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The epoll descriptor itself, to wait on it from another event loop (io_uring poll).
    pub(crate) fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    pub(crate) fn delete(&self, fd: RawFd) -> io::Result<()> {
        let mut event = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: as in `add`; the event is ignored for DEL but must be non-null on old kernels.
        let rc =
            unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, &mut event) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits up to `timeout_ms` and returns the tokens of ready descriptors.
    pub(crate) fn wait(&mut self, timeout_ms: i32, out: &mut Vec<u64>) -> io::Result<()> {
        out.clear();
        // SAFETY: `events` is a valid writable array of the length passed.
        let n = unsafe {
            libc::epoll_wait(
                self.fd.as_raw_fd(),
                self.events.as_mut_ptr(),
                i32::try_from(self.events.len()).unwrap_or(i32::MAX),
                timeout_ms,
            )
        };
        if n < 0 {
            let error = io::Error::last_os_error();
            if error.raw_os_error() == Some(libc::EINTR) {
                return Ok(());
            }
            return Err(error);
        }
        out.extend(self.events[..n as usize].iter().map(|e| e.u64));
        Ok(())
    }
}

/// Receive buffers and headers for one `recvmmsg` call. Datagrams land at `PAYLOAD_OFFSET` in
/// each buffer, the same layout as the io_uring backend, so the ChannelData header can be
/// written in front of the payload.
pub(crate) struct RecvBatch {
    buffers: Box<[u8]>,
    buffer_size: usize,
    headers: Vec<libc::mmsghdr>,
    iovecs: Vec<libc::iovec>,
    names: Vec<RawSockAddr>,
}

/// One received datagram of a [`RecvBatch`].
pub(crate) struct Received<'a> {
    pub(crate) from: Option<SocketAddr>,
    pub(crate) buffer: &'a mut [u8],
    pub(crate) payload: Range<usize>,
    pub(crate) truncated: bool,
}

impl RecvBatch {
    pub(crate) fn new(batch: usize, buffer_size: usize) -> Self {
        let batch = batch.max(1);
        // SAFETY: mmsghdr and iovec are plain data; all-zero (null pointers, zero lengths) is
        // valid, and every pointer is set before each call.
        let header: libc::mmsghdr = unsafe { std::mem::zeroed() };
        Self {
            buffers: vec![0u8; batch * buffer_size].into_boxed_slice(),
            buffer_size,
            headers: vec![header; batch],
            iovecs: vec![
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0
                };
                batch
            ],
            names: vec![RawSockAddr::zeroed(); batch],
        }
    }

    /// Receives up to a batch of datagrams from `fd` without blocking; `Ok(0)` = none queued.
    pub(crate) fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        let offset = crate::PAYLOAD_OFFSET;
        let base = self.buffers.as_mut_ptr();
        for i in 0..self.headers.len() {
            // SAFETY: i * buffer_size + offset < buffers.len() because offset < buffer_size
            // (checked by the config) and i < batch.
            let start = unsafe { base.add(i * self.buffer_size + offset) };
            self.iovecs[i] = libc::iovec {
                iov_base: start.cast(),
                iov_len: self.buffer_size - offset,
            };
            let hdr = &mut self.headers[i].msg_hdr;
            hdr.msg_name = self.names[i].as_mut_ptr().cast();
            hdr.msg_namelen = SOCKADDR_LEN_MAX as libc::socklen_t;
            hdr.msg_iov = &mut self.iovecs[i];
            hdr.msg_iovlen = 1;
            hdr.msg_control = std::ptr::null_mut();
            hdr.msg_controllen = 0;
            hdr.msg_flags = 0;
            self.headers[i].msg_len = 0;
        }
        loop {
            // SAFETY: every header points at an iovec, a name and a buffer region owned by
            // `self`, all valid and exclusively borrowed for the duration of the call.
            let n = unsafe {
                libc::recvmmsg(
                    fd,
                    self.headers.as_mut_ptr(),
                    u32::try_from(self.headers.len()).unwrap_or(u32::MAX),
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let error = io::Error::last_os_error();
            match error.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => return Ok(0),
                _ => return Err(error),
            }
        }
    }

    /// The `i`-th datagram of the last `recv`.
    pub(crate) fn get(&mut self, i: usize) -> Received<'_> {
        let hdr = &self.headers[i];
        let len = hdr.msg_len as usize;
        let truncated = hdr.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        let namelen = (hdr.msg_hdr.msg_namelen as usize).min(SOCKADDR_LEN_MAX);
        // SAFETY: `names[i]` is a fully initialised 28-byte union (built from a zeroed
        // sockaddr_in6, then written by the kernel); reading it as bytes is valid.
        let name = unsafe {
            std::slice::from_raw_parts((&self.names[i] as *const RawSockAddr).cast::<u8>(), namelen)
        };
        let from = addr::from_kernel_bytes(name);
        let offset = crate::PAYLOAD_OFFSET;
        let buffer = &mut self.buffers[i * self.buffer_size..(i + 1) * self.buffer_size];
        let end = (offset + len).min(buffer.len());
        Received {
            from,
            buffer,
            payload: offset..end,
            truncated,
        }
    }

    pub(crate) fn buffer(&self, i: usize) -> &[u8] {
        &self.buffers[i * self.buffer_size..(i + 1) * self.buffer_size]
    }
}

/// Zero bytes for STUN padding after a Data indication's payload.
pub(crate) static ZEROS: [u8; 4] = [0; 4];

/// One queued datagram of a [`SendBatch`]: up to three parts, all resolved at flush time.
struct Queued<T> {
    tag: T,
    fd: RawFd,
    buffer: usize,
    range: Range<usize>,
    header_len: usize,
    padding: usize,
}

/// Datagrams queued for `sendmmsg`, pointing into a [`RecvBatch`]'s buffers by index.
pub(crate) struct SendBatch<T> {
    queued: Vec<Queued<T>>,
    headers: Vec<libc::mmsghdr>,
    iovecs: Vec<[libc::iovec; 3]>,
    names: Vec<RawSockAddr>,
    data_headers: Vec<[u8; uturn_proto::DATA_INDICATION_HEADER_LEN_MAX]>,
}

impl<T: Copy> SendBatch<T> {
    pub(crate) fn new(batch: usize) -> Self {
        let batch = batch.max(1);
        // SAFETY: as in `RecvBatch::new`.
        let header: libc::mmsghdr = unsafe { std::mem::zeroed() };
        let iovec = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        Self {
            queued: Vec::with_capacity(batch),
            headers: vec![header; batch],
            iovecs: vec![[iovec; 3]; batch],
            names: vec![RawSockAddr::zeroed(); batch],
            data_headers: vec![[0; uturn_proto::DATA_INDICATION_HEADER_LEN_MAX]; batch],
        }
    }

    /// Queues `header` (may be empty), then `recv.buffer(buffer)[range]`, then `padding` zeros.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn push(
        &mut self,
        tag: T,
        fd: RawFd,
        to: &SocketAddr,
        buffer: usize,
        range: Range<usize>,
        header: &[u8],
        padding: usize,
    ) {
        let i = self.queued.len();
        debug_assert!(i < self.headers.len(), "push on a full SendBatch");
        let namelen = self.names[i].set(to);
        self.headers[i].msg_hdr.msg_namelen = namelen;
        let header_len = header
            .len()
            .min(uturn_proto::DATA_INDICATION_HEADER_LEN_MAX);
        self.data_headers[i][..header_len].copy_from_slice(&header[..header_len]);
        self.queued.push(Queued {
            tag,
            fd,
            buffer,
            range,
            header_len,
            padding: padding.min(3),
        });
    }

    /// Sends everything queued (one `sendmmsg` per run of equal sockets) and calls `on_error`
    /// with the tag and errno of each datagram the kernel refused. Returns the number of
    /// syscalls.
    pub(crate) fn flush(&mut self, recv: &RecvBatch, mut on_error: impl FnMut(T, i32)) -> u64 {
        let count = self.queued.len();
        for i in 0..count {
            let q = &self.queued[i];
            let payload = &recv.buffer(q.buffer)[q.range.clone()];
            let mut parts = 0;
            if q.header_len > 0 {
                self.iovecs[i][parts] = libc::iovec {
                    iov_base: self.data_headers[i].as_mut_ptr().cast(),
                    iov_len: q.header_len,
                };
                parts += 1;
            }
            self.iovecs[i][parts] = libc::iovec {
                iov_base: payload.as_ptr().cast_mut().cast(),
                iov_len: payload.len(),
            };
            parts += 1;
            if q.padding > 0 {
                self.iovecs[i][parts] = libc::iovec {
                    iov_base: ZEROS.as_ptr().cast_mut().cast(),
                    iov_len: q.padding,
                };
                parts += 1;
            }
            let hdr = &mut self.headers[i].msg_hdr;
            hdr.msg_name = self.names[i].as_mut_ptr().cast();
            hdr.msg_iov = self.iovecs[i].as_mut_ptr();
            hdr.msg_iovlen = parts;
            hdr.msg_control = std::ptr::null_mut();
            hdr.msg_controllen = 0;
            hdr.msg_flags = 0;
        }
        let mut calls = 0;
        let mut start = 0;
        while start < count {
            let fd = self.queued[start].fd;
            let mut end = start + 1;
            while end < count && self.queued[end].fd == fd {
                end += 1;
            }
            while start < end {
                calls += 1;
                // SAFETY: headers[start..end] point at iovecs, names and header bytes owned by
                // `self`, at payloads inside `recv` (borrowed for this call) and at the static
                // ZEROS; all valid and unmodified during the call. The kernel only reads them.
                let n = unsafe {
                    libc::sendmmsg(
                        fd,
                        self.headers[start..end].as_mut_ptr(),
                        u32::try_from(end - start).unwrap_or(u32::MAX),
                        0,
                    )
                };
                if n > 0 {
                    start += n as usize;
                    continue;
                }
                let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
                if errno == libc::EINTR {
                    continue;
                }
                // The first datagram of the run failed: report it and go on with the next.
                on_error(self.queued[start].tag, errno);
                start += 1;
            }
        }
        self.queued.clear();
        calls
    }
}
