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
