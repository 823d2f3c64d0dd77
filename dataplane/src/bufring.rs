//! The provided-buffer ring: receive buffers the kernel picks from for multishot `RecvMsg`.
//!
//! Ownership of a buffer moves between the kernel and the shard: a buffer whose id sits in the
//! ring (between the kernel's head and our published tail) belongs to the kernel; a buffer whose
//! id arrived in a CQE belongs to the shard until [`BufRing::push`] hands it back. A buffer that a
//! send references stays with the shard until that send completes.

use std::alloc::{self, Layout};
use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;

use crate::ring::Ended;

/// Buffer group id; each shard has its own ring, so one group is enough.
pub(crate) const BUFFER_GROUP: u16 = 0;

/// Kernel limit on buffer ring entries.
pub(crate) const ENTRIES_MAX: usize = 1 << 15;

const PAGE: usize = 4096;

#[derive(Debug)]
pub(crate) struct BufRing {
    entries: NonNull<BufRingEntry>,
    entries_layout: Layout,
    mask: u16,
    /// Local tail; published to the kernel by [`BufRing::publish`].
    tail: u16,
    buffers: NonNull<u8>,
    buffers_layout: Layout,
    buffer_size: usize,
    count: u16,
}

impl BufRing {
    /// Allocates `count` buffers of `buffer_size` bytes and a ring that holds all of them, every
    /// buffer initially in the ring (not yet published).
    pub(crate) fn new(count: usize, buffer_size: usize) -> io::Result<Self> {
        if count == 0 || count > ENTRIES_MAX || buffer_size == 0 {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let ring_entries = count.next_power_of_two();
        let entries_layout =
            Layout::from_size_align(ring_entries * size_of::<BufRingEntry>(), PAGE)
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let buffers_layout = Layout::from_size_align(count * buffer_size, 64)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: both layouts have non-zero size (count, buffer_size > 0).
        let entries = NonNull::new(unsafe { alloc::alloc_zeroed(entries_layout) })
            .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?
            .cast::<BufRingEntry>();
        // SAFETY: as above.
        let Some(buffers) = NonNull::new(unsafe { alloc::alloc_zeroed(buffers_layout) }) else {
            // SAFETY: allocated just above with this layout.
            unsafe { alloc::dealloc(entries.as_ptr().cast(), entries_layout) };
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        };
        let mut ring = Self {
            entries,
            entries_layout,
            mask: (ring_entries - 1) as u16,
            tail: 0,
            buffers,
            buffers_layout,
            buffer_size,
            count: count as u16,
        };
        for bid in 0..ring.count {
            ring.push(bid);
        }
        Ok(ring)
    }

    /// Registers the ring with `submitter` under [`BUFFER_GROUP`] and publishes its buffers.
    pub(crate) fn register(&mut self, submitter: &io_uring::Submitter<'_>) -> io::Result<()> {
        // SAFETY: `entries` is a page-aligned allocation of `mask + 1` entries that lives as
        // long as `self`; the owner (`Ring`) drops the io_uring instance before `self` and
        // drains every operation first, so the kernel never touches it after free.
        unsafe {
            submitter.register_buf_ring_with_flags(
                self.entries.as_ptr() as u64,
                self.mask.wrapping_add(1),
                BUFFER_GROUP,
                0,
            )?;
        }
        self.publish();
        Ok(())
    }

    pub(crate) fn buffer_size(&self) -> usize {
        self.buffer_size
    }

    /// Gives buffer `bid` back to the kernel (visible after [`BufRing::publish`]).
    pub(crate) fn push(&mut self, bid: u16) {
        debug_assert!(bid < self.count, "buffer id out of range");
        let index = usize::from(self.tail & self.mask);
        // SAFETY: index <= mask, inside the allocation. The entry is not in the kernel's
        // visible range (it lies at or after the published tail), so the kernel does not read
        // it concurrently. The setters leave `resv` alone, which for entry 0 is the shared tail.
        let entry = unsafe { &mut *self.entries.as_ptr().add(index) };
        // SAFETY: bid < count, so the offset is inside the buffer allocation.
        let addr = unsafe {
            self.buffers
                .as_ptr()
                .add(usize::from(bid) * self.buffer_size)
        };
        entry.set_addr(addr as u64);
        entry.set_len(self.buffer_size as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes every pushed buffer visible to the kernel.
    pub(crate) fn publish(&mut self) {
        // SAFETY: `entries` points at entry 0 of an initialised ring, whose `resv` field is the
        // ring tail shared with the kernel; it is a u16 aligned to 2 and lives as long as self.
        let tail = unsafe { BufRingEntry::tail(self.entries.as_ptr()) }.cast_mut();
        // SAFETY: as above; the kernel reads the tail with acquire semantics, so the release
        // store orders the entry writes before it. Only this thread writes the tail.
        let tail = unsafe { AtomicU16::from_ptr(tail) };
        tail.store(self.tail, Ordering::Release);
    }

    /// The buffer with id `bid`, which the shard owns (it came in a CQE and was not pushed back).
    pub(crate) fn buffer_mut(&mut self, bid: u16) -> Option<&mut [u8]> {
        if bid >= self.count {
            return None;
        }
        // SAFETY: bid < count, so the range is inside the allocation; the kernel handed this
        // buffer to the shard and does not write it until it is pushed back, and `&mut self`
        // rules out a second Rust reference to it.
        Some(unsafe {
            std::slice::from_raw_parts_mut(
                self.buffers
                    .as_ptr()
                    .add(usize::from(bid) * self.buffer_size),
                self.buffer_size,
            )
        })
    }

    /// Address of byte `offset` of buffer `bid`, for an iovec of a send that holds the buffer.
    pub(crate) fn buffer_ptr(&self, bid: u16, offset: usize) -> *const u8 {
        debug_assert!(bid < self.count && offset <= self.buffer_size);
        self.buffers
            .as_ptr()
            .wrapping_add(usize::from(bid) * self.buffer_size + offset)
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: both were allocated in `new` with these layouts and are freed once.
        unsafe {
            alloc::dealloc(self.entries.as_ptr().cast(), self.entries_layout);
            alloc::dealloc(self.buffers.as_ptr(), self.buffers_layout);
        }
    }
}

/// A fixed byte buffer of one stream connection (bytes from or for its socket), allocated once
/// and never grown. One range of it at a time may be lent to the kernel (an io_uring `Recv`
/// writes it, a `Send` reads it); while it is, Rust code cannot reach that range, and dropping
/// the buffer leaks it instead of freeing memory the kernel may still use.
pub(crate) struct IoBuf {
    ptr: NonNull<u8>,
    layout: Layout,
    lent: Option<(std::ops::Range<usize>, u32, u64)>,
}

// SAFETY: an `IoBuf` owns its allocation alone, like a `Box<[u8]>`. It is built before the
// shard thread starts and moved there; only that thread's ring ever lends it.
unsafe impl Send for IoBuf {}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBuf")
            .field("len", &self.layout.size())
            .field("lent", &self.lent)
            .finish()
    }
}

impl IoBuf {
    /// A zeroed buffer of `len` bytes (at least 1).
    pub(crate) fn new(len: usize) -> Self {
        let layout = Layout::array::<u8>(len.max(1)).unwrap_or(Layout::new::<u8>());
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        Self {
            ptr,
            layout,
            lent: None,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.layout.size()
    }

    fn reachable(&self, range: &std::ops::Range<usize>) -> bool {
        range.start <= range.end
            && range.end <= self.len()
            && self.lent.as_ref().is_none_or(|(lent, _, _)| {
                range.is_empty() || range.end <= lent.start || lent.end <= range.start
            })
    }

    /// `range` of the buffer, unless it is out of bounds or overlaps the lent range.
    pub(crate) fn get(&self, range: std::ops::Range<usize>) -> Option<&[u8]> {
        if !self.reachable(&range) {
            return None;
        }
        // SAFETY: in bounds of the allocation; the kernel writes only the lent range, which
        // does not overlap; `&self` rules out a Rust `&mut` to it for the borrow's lifetime.
        Some(unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(range.start), range.len()) })
    }

    /// `range` of the buffer, mutable, unless it is out of bounds or overlaps the lent range.
    pub(crate) fn get_mut(&mut self, range: std::ops::Range<usize>) -> Option<&mut [u8]> {
        if !self.reachable(&range) {
            return None;
        }
        // SAFETY: as in `get`; the kernel neither reads nor writes outside the lent range, and
        // `&mut self` makes this the only reference.
        Some(unsafe {
            std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(range.start), range.len())
        })
    }

    /// Moves `range` to start at 0 (`copy_within`), when nothing is lent.
    pub(crate) fn move_to_front(&mut self, range: std::ops::Range<usize>) -> bool {
        if self.lent.is_some() || range.end > self.len() || range.start > range.end {
            return false;
        }
        if let Some(all) = self.get_mut(0..range.end) {
            all.copy_within(range, 0);
            return true;
        }
        false
    }

    pub(crate) fn is_lent(&self) -> bool {
        self.lent.is_some()
    }

    /// Marks `range` as the kernel's until the operation `(token, seq)` ends and returns its
    /// address and length; `None` when something is lent already or the range is invalid.
    /// Only the ring calls this, right before it pushes the SQE naming the memory.
    pub(crate) fn lend(
        &mut self,
        range: std::ops::Range<usize>,
        token: u32,
        seq: u64,
    ) -> Option<(*mut u8, usize)> {
        if self.lent.is_some() || range.start >= range.end || range.end > self.len() {
            return None;
        }
        self.lent = Some((range.clone(), token, seq));
        Some((self.ptr.as_ptr().wrapping_add(range.start), range.len()))
    }

    /// Takes the lent range back once its operation ended; returns whether it was that one.
    pub(crate) fn give_back(&mut self, ended: Ended) -> bool {
        match &self.lent {
            Some((_, token, seq)) if *token == ended.token() && *seq == ended.seq() => {
                self.lent = None;
                true
            }
            _ => false,
        }
    }

    /// Undoes a `lend` whose SQE was never pushed (the submission queue was full).
    pub(crate) fn unlend_unpushed(&mut self, token: u32, seq: u64) {
        if matches!(&self.lent, Some((_, t, s)) if *t == token && *s == seq) {
            self.lent = None;
        }
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        if let Some((range, token, _)) = &self.lent {
            // The kernel may still read or write it: leaking is the only safe choice. The
            // shard waits for completions before dropping connections, so this is a bug path.
            tracing::error!(
                ?range,
                token,
                "stream buffer dropped while lent to the kernel; leaked"
            );
            return;
        }
        // SAFETY: allocated in `new` with this layout, freed once, nothing lent.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

#[cfg(test)]
mod io_buf_tests {
    use super::*;

    #[test]
    fn a_lent_range_is_out_of_reach_until_its_operation_ends() {
        let mut buf = IoBuf::new(64);
        let (_, len) = buf.lend(16..32, 7, 1).expect("lend");
        assert_eq!(len, 16);
        assert!(buf.get(0..16).is_some());
        assert!(buf.get_mut(32..64).is_some());
        assert!(buf.get(10..20).is_none());
        assert!(buf.get_mut(31..40).is_none());
        assert!(buf.lend(40..50, 8, 2).is_none(), "one lend at a time");
        assert!(!buf.move_to_front(40..50));
        assert!(
            !buf.give_back(Ended::for_test(7, 0)),
            "an older op of the same token"
        );
        assert!(buf.give_back(Ended::for_test(7, 1)));
        assert!(buf.get(10..20).is_some());
        assert!(buf.get(0..65).is_none());
    }
}
