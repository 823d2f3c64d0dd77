//! Demultiplexing: [`classify`] datagrams by their first byte, and cut a TCP/TLS byte stream
//! into frames ([`frame_len`], [`StreamFramer`]).

use crate::cursor::{pad4, read_u16, read_u32};
use crate::error::FramingError;
use crate::types::{MAGIC_COOKIE, STUN_HEADER_LEN, STUN_MESSAGE_LEN_MAX};

/// What a packet is, judged by its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PacketKind {
    /// First byte 0-3: a STUN message (RFC 8489 §5, top two bits zero).
    Stun,
    /// First byte 64-127 (0x40-0x7F): ChannelData (RFC 8656 §12 uses 0x40-0x4F, RFC 5766
    /// clients up to 0x7F).
    ChannelData,
    /// Anything else, or empty.
    Unknown,
}

/// Classifies a datagram or frame by its first byte (RFC 8656 §12: "the first byte [...] is
/// in the range 0x40-0x4F" for ChannelData; RFC 7983 §7 demultiplexing, 0-3 for STUN).
/// Bytes 0x50-0x7F are classified as ChannelData too: RFC 5766 clients use channel numbers up
/// to 0x7FFF, and between a client and its TURN server nothing else starts with those bytes.
#[inline]
pub fn classify(datagram: &[u8]) -> PacketKind {
    match datagram.first() {
        Some(0..=3) => PacketKind::Stun,
        Some(64..=127) => PacketKind::ChannelData,
        _ => PacketKind::Unknown,
    }
}

/// Longest ChannelData frame on a stream: 4-byte header, 65,535-byte payload, 1 padding byte.
pub const CHANNEL_DATA_FRAME_LEN_MAX: usize = 4 + 0xFFFF + 1;

/// Longest frame on a stream: the larger of a STUN message (65,552) and a padded ChannelData
/// frame (65,540). A [`StreamFramer`] of this capacity accepts every valid frame.
pub const STREAM_FRAME_LEN_MAX: usize = if STUN_MESSAGE_LEN_MAX > CHANNEL_DATA_FRAME_LEN_MAX {
    STUN_MESSAGE_LEN_MAX
} else {
    CHANNEL_DATA_FRAME_LEN_MAX
};

/// Length of the next whole frame at the start of `stream`, ChannelData padding included
/// (RFC 8656 §12.5), or `None` when more bytes are needed to tell.
///
/// A STUN frame is judged once 8 bytes are there (length and magic cookie), a ChannelData
/// frame once its 4-byte header is. Errors mean the stream is garbage and must be closed.
#[inline]
pub fn frame_len(stream: &[u8]) -> Result<Option<usize>, FramingError> {
    match classify(stream) {
        PacketKind::Stun => {
            let (Some(len), Some(cookie)) = (read_u16(stream, 2), read_u32(stream, 4)) else {
                return Ok(None);
            };
            if cookie != MAGIC_COOKIE {
                return Err(FramingError::BadMagicCookie);
            }
            if len % 4 != 0 {
                return Err(FramingError::LengthNotMultipleOfFour);
            }
            Ok(Some(STUN_HEADER_LEN + usize::from(len)))
        }
        PacketKind::ChannelData => {
            let Some(len) = read_u16(stream, 2) else {
                return Ok(None);
            };
            let len = usize::from(len);
            Ok(Some(4 + len + pad4(len)))
        }
        PacketKind::Unknown => match stream.first() {
            None => Ok(None),
            Some(&first_byte) => Err(FramingError::Garbage { first_byte }),
        },
    }
}

/// Cuts a TCP/TLS byte stream into whole STUN messages and ChannelData frames.
///
/// The buffer is allocated once, at construction, and never grows: a frame longer than the
/// capacity is [`FramingError::FrameTooLarge`]. After an error the framer keeps returning it;
/// the caller closes the connection.
///
/// ```
/// use uturn_proto::StreamFramer;
///
/// let mut framer = StreamFramer::new(uturn_proto::STREAM_FRAME_LEN_MAX);
/// let stream = [0x40, 0x00, 0x00, 0x03, b'a', b'b', b'c', 0x00];
/// for chunk in stream.chunks(3) {
///     assert_eq!(framer.push(chunk), chunk.len());
///     while let Some(frame) = framer.pop()? {
///         assert_eq!(frame, &stream[..]);
///     }
/// }
/// # Ok::<(), uturn_proto::FramingError>(())
/// ```
#[derive(Debug)]
pub struct StreamFramer {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    error: Option<FramingError>,
}

impl StreamFramer {
    /// A framer buffering at most `capacity` bytes (at least 20). Use
    /// [`STREAM_FRAME_LEN_MAX`] to accept every valid frame.
    pub fn new(capacity: usize) -> Self {
        Self {
            buf: vec![0; capacity.max(STUN_HEADER_LEN)].into_boxed_slice(),
            start: 0,
            end: 0,
            error: None,
        }
    }

    /// The fixed capacity.
    pub fn capacity(&self) -> usize {
        self.buf.len()
    }

    /// Bytes buffered and not yet returned as frames.
    pub const fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Copies as much of `data` as fits; returns how many bytes were taken. When it is less
    /// than `data.len()`, [`pop`](Self::pop) frames first, then push the rest.
    pub fn push(&mut self, data: &[u8]) -> usize {
        let spare = self.spare_capacity_mut();
        let n = data.len().min(spare.len());
        if let (Some(dst), Some(src)) = (spare.get_mut(..n), data.get(..n)) {
            dst.copy_from_slice(src);
            self.end += n;
            n
        } else {
            0
        }
    }

    /// The free space at the end of the buffer, for reading from a socket directly; then call
    /// [`commit`](Self::commit) with the number of bytes read.
    pub fn spare_capacity_mut(&mut self) -> &mut [u8] {
        if self.start > 0 {
            // Move the partial frame to the front so the whole capacity is usable.
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        self.buf.get_mut(self.end..).unwrap_or(&mut [])
    }

    /// Marks `n` bytes written into [`spare_capacity_mut`](Self::spare_capacity_mut) as data.
    pub fn commit(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// The next whole frame, `None` when more bytes are needed.
    pub fn pop(&mut self) -> Result<Option<&[u8]>, FramingError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        let pending = self.buf.get(self.start..self.end).unwrap_or(&[]);
        let len = match frame_len(pending) {
            Ok(Some(len)) => len,
            Ok(None) => return Ok(None),
            Err(e) => {
                self.error = Some(e);
                return Err(e);
            }
        };
        if len > self.buf.len() {
            let e = FramingError::FrameTooLarge {
                len,
                capacity: self.buf.len(),
            };
            self.error = Some(e);
            return Err(e);
        }
        if len > pending.len() {
            return Ok(None);
        }
        let frame = self.start..self.start + len;
        self.start += len;
        if self.start == self.end {
            // Rewind after a clean cut, so the next frame starts at 0 without a copy.
            self.start = 0;
            self.end = 0;
        }
        Ok(self.buf.get(frame))
    }
}

impl Default for StreamFramer {
    /// A framer of [`STREAM_FRAME_LEN_MAX`] bytes, which accepts every valid frame.
    fn default() -> Self {
        Self::new(STREAM_FRAME_LEN_MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 8656 §12: ChannelData starts with 0x40-0x4F (0x40-0x7F for RFC 5766 clients);
    /// RFC 8489 §5: STUN with 0b00.
    #[test]
    fn the_first_byte_decides_the_packet_kind_at_every_boundary() {
        for b in 0..=255u8 {
            let expected = match b {
                0..=3 => PacketKind::Stun,
                64..=127 => PacketKind::ChannelData,
                _ => PacketKind::Unknown,
            };
            assert_eq!(classify(&[b, 0, 0, 0]), expected, "byte {b}");
        }
        assert_eq!(classify(&[]), PacketKind::Unknown);
    }

    #[test]
    fn frame_len_waits_for_enough_bytes_and_counts_channel_data_padding() {
        assert_eq!(frame_len(&[]), Ok(None));
        assert_eq!(
            frame_len(&[0x00, 0x01, 0x00, 0x08, 0x21, 0x12, 0xa4]),
            Ok(None)
        );
        assert_eq!(
            frame_len(&[0x00, 0x01, 0x00, 0x08, 0x21, 0x12, 0xa4, 0x42]),
            Ok(Some(28))
        );
        assert_eq!(frame_len(&[0x40, 0x00, 0x00]), Ok(None));
        assert_eq!(frame_len(&[0x40, 0x00, 0x00, 0x05]), Ok(Some(12)));
        assert_eq!(frame_len(&[0x4f, 0xff, 0x00, 0x00]), Ok(Some(4)));
    }

    #[test]
    fn the_framer_refuses_bytes_beyond_its_capacity_and_takes_them_after_a_pop() {
        let mut framer = StreamFramer::new(24);
        let frame = [0x40, 0x00, 0x00, 0x04, 1, 2, 3, 4];
        let stream: Vec<u8> = frame.iter().copied().cycle().take(32).collect();
        assert_eq!(framer.push(&stream), 24);
        assert_eq!(framer.buffered(), 24);
        assert_eq!(framer.pop(), Ok(Some(&frame[..])));
        assert_eq!(framer.push(&stream[24..]), 8);
        for _ in 0..3 {
            assert_eq!(framer.pop(), Ok(Some(&frame[..])));
        }
        assert_eq!(framer.pop(), Ok(None));
        assert_eq!(framer.buffered(), 0);
        assert_eq!(framer.capacity(), 24);
        assert_eq!(StreamFramer::default().capacity(), STREAM_FRAME_LEN_MAX);
        assert_eq!(StreamFramer::new(0).capacity(), STUN_HEADER_LEN);
    }

    #[test]
    fn the_framer_can_be_filled_directly_through_its_spare_capacity() {
        let mut framer = StreamFramer::new(64);
        let spare = framer.spare_capacity_mut();
        spare[..6].copy_from_slice(&[0x40, 0x01, 0x00, 0x02, 9, 9]);
        framer.commit(6);
        assert_eq!(framer.pop(), Ok(None), "the padding is still missing");
        framer.push(&[0, 0]);
        assert_eq!(
            framer.pop(),
            Ok(Some(&[0x40, 0x01, 0x00, 0x02, 9, 9, 0, 0][..]))
        );
    }
}
