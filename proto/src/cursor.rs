//! A bounds-checked reader that cannot panic, and small helpers to write into slices.
//!
//! Every read returns `Option`: running off the end is `None`, never a panic or an
//! out-of-bounds index. The parser turns `None` into a typed error at the point where it knows
//! which field was short.

/// A cursor over untrusted bytes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) const fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    /// Takes the next `n` bytes, or `None` (consuming nothing) when fewer remain.
    #[inline]
    pub(crate) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = self.buf.split_at_checked(n)?;
        self.buf = tail;
        Some(head)
    }

    /// Takes the next `N` bytes as an array.
    #[inline]
    pub(crate) fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, tail) = self.buf.split_first_chunk::<N>()?;
        self.buf = tail;
        Some(*head)
    }

    #[inline]
    pub(crate) fn u8(&mut self) -> Option<u8> {
        let (first, tail) = self.buf.split_first()?;
        self.buf = tail;
        Some(*first)
    }

    #[inline]
    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.array::<2>().map(u16::from_be_bytes)
    }

    #[inline]
    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.array::<4>().map(u32::from_be_bytes)
    }

    /// The bytes not read yet.
    #[inline]
    pub(crate) const fn rest(&self) -> &'a [u8] {
        self.buf
    }

    #[inline]
    pub(crate) const fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// Reads a big-endian `u16` at `at`, or `None` when out of bounds.
#[inline]
pub(crate) fn read_u16(buf: &[u8], at: usize) -> Option<u16> {
    let bytes = buf.get(at..at.checked_add(2)?)?;
    let arr: [u8; 2] = bytes.try_into().ok()?;
    Some(u16::from_be_bytes(arr))
}

/// Reads a big-endian `u32` at `at`, or `None` when out of bounds.
#[inline]
pub(crate) fn read_u32(buf: &[u8], at: usize) -> Option<u32> {
    let bytes = buf.get(at..at.checked_add(4)?)?;
    let arr: [u8; 4] = bytes.try_into().ok()?;
    Some(u32::from_be_bytes(arr))
}

/// Copies `bytes` into `buf` at `at`; returns `false` (writing nothing) when it does not fit.
///
/// Callers check capacity before writing, so `false` marks a bug in the caller's arithmetic;
/// it is still not a panic.
#[inline]
pub(crate) fn put(buf: &mut [u8], at: usize, bytes: &[u8]) -> bool {
    let Some(end) = at.checked_add(bytes.len()) else {
        return false;
    };
    match buf.get_mut(at..end) {
        Some(dst) => {
            dst.copy_from_slice(bytes);
            true
        }
        None => false,
    }
}

/// Fills `buf[at..at + n]` with `byte`; returns `false` when out of bounds.
#[inline]
pub(crate) fn fill(buf: &mut [u8], at: usize, n: usize, byte: u8) -> bool {
    let Some(end) = at.checked_add(n) else {
        return false;
    };
    match buf.get_mut(at..end) {
        Some(dst) => {
            dst.fill(byte);
            true
        }
        None => false,
    }
}

/// Padding that brings `len` up to a multiple of 4.
#[inline]
pub(crate) const fn pad4(len: usize) -> usize {
    (4 - (len & 3)) & 3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reading_past_the_end_returns_none_and_consumes_nothing() {
        let mut r = Reader::new(&[1, 2, 3]);
        assert_eq!(r.u32(), None);
        assert_eq!(r.take(4), None);
        assert_eq!(r.u16(), Some(0x0102));
        assert_eq!(r.u16(), None);
        assert_eq!(r.u8(), Some(3));
        assert!(r.is_empty());
        assert_eq!(r.rest(), &[] as &[u8]);
    }

    #[test]
    fn writes_out_of_bounds_are_refused_without_panicking() {
        let mut buf = [0u8; 4];
        assert!(!put(&mut buf, 3, &[1, 2]));
        assert!(!put(&mut buf, usize::MAX, &[1]));
        assert!(!fill(&mut buf, 2, 3, 9));
        assert_eq!(buf, [0; 4]);
        assert!(put(&mut buf, 2, &[1, 2]));
        assert_eq!(buf, [0, 0, 1, 2]);
        assert_eq!(read_u16(&buf, 2), Some(0x0102));
        assert_eq!(read_u16(&buf, 3), None);
        assert_eq!(read_u32(&buf, 0), Some(0x0102));
        assert_eq!(read_u32(&buf, 1), None);
    }

    #[test]
    fn padding_rounds_up_to_the_next_multiple_of_four() {
        assert_eq!([0, 1, 2, 3, 4, 5].map(pad4), [0, 3, 2, 1, 0, 3]);
    }
}
