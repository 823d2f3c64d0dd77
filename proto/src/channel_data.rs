//! ChannelData messages (RFC 8656 §12.4, §12.5): parse, and write the header in place.

use crate::attribute::ChannelNumber;
use crate::cursor::{Reader, pad4, put};
use crate::error::{BufferTooSmall, ChannelDataError};

/// Length of the ChannelData header: channel number and length, 16 bits each (RFC 8656 §12.4).
pub const CHANNEL_DATA_HEADER_LEN: usize = 4;

/// A parsed ChannelData message: a channel number and a payload borrowed from the frame.
///
/// ```text
///  0                   1                   2                   3
///  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
/// +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
/// |         Channel Number        |            Length             |
/// +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
/// /                       Application Data                        /
/// +-------------------------------+-------------------------------+
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelData<'a> {
    channel: ChannelNumber,
    payload: &'a [u8],
}

impl<'a> ChannelData<'a> {
    /// Parses one ChannelData message: a UDP datagram, or a frame from
    /// [`StreamFramer`](crate::StreamFramer).
    ///
    /// RFC 8656 §12.5: over UDP "the padding is not required but MAY be included"; over
    /// TCP/TLS it is required. Both forms are accepted: after the payload there may be nothing,
    /// or exactly the padding up to a multiple of 4 (its bytes are not checked). Anything longer
    /// is [`ChannelDataError::TrailingBytes`].
    #[inline]
    pub fn parse(bytes: &'a [u8]) -> Result<Self, ChannelDataError> {
        let mut r = Reader::new(bytes);
        let (Some(channel), Some(len)) = (r.u16(), r.u16()) else {
            return Err(ChannelDataError::TooShort);
        };
        // RFC 5766's range: a legacy client's channel is framed like any other; the channel
        // table decides whether it is bound.
        let channel =
            ChannelNumber::new_rfc5766(channel).ok_or(ChannelDataError::InvalidChannel(channel))?;
        let rest = r.rest();
        let Some((payload, extra)) = rest.split_at_checked(usize::from(len)) else {
            return Err(ChannelDataError::Truncated {
                len,
                available: rest.len(),
            });
        };
        if !extra.is_empty() && extra.len() != pad4(payload.len()) {
            return Err(ChannelDataError::TrailingBytes { extra: extra.len() });
        }
        Ok(Self { channel, payload })
    }

    /// The channel number.
    #[inline]
    pub const fn channel(&self) -> ChannelNumber {
        self.channel
    }

    /// The application data, padding excluded.
    #[inline]
    pub const fn payload(&self) -> &'a [u8] {
        self.payload
    }
}

/// Writes the 4-byte ChannelData header into `out[..4]`, e.g. the headroom in front of a
/// payload received at offset 4:
///
/// ```text
/// buf: [ 0 .. 4 ) header written here | [ 4 .. 4 + n ) peer datagram, received in place
///                                     | then stream_padding(n) zero bytes over TCP/TLS
/// ```
///
/// The length field holds `payload_len` and never counts padding (RFC 8656 §12.5). Fails
/// when `out` is shorter than 4 bytes, or when `payload_len` exceeds 65,535 (`needed` is then
/// `usize::MAX`).
#[inline]
pub fn write_channel_data_header(
    out: &mut [u8],
    channel: ChannelNumber,
    payload_len: usize,
) -> Result<usize, BufferTooSmall> {
    let len = u16::try_from(payload_len).map_err(|_| BufferTooSmall { needed: usize::MAX })?;
    let Some(header) = out.get_mut(..CHANNEL_DATA_HEADER_LEN) else {
        return Err(BufferTooSmall {
            needed: CHANNEL_DATA_HEADER_LEN,
        });
    };
    let [c0, c1] = channel.get().to_be_bytes();
    let [l0, l1] = len.to_be_bytes();
    header.copy_from_slice(&[c0, c1, l0, l1]);
    Ok(CHANNEL_DATA_HEADER_LEN)
}

/// Writes a whole ChannelData message (header, payload, and with `padded` the zero padding
/// that TCP/TLS requires) into `out`; returns its length.
pub fn write_channel_data(
    out: &mut [u8],
    channel: ChannelNumber,
    payload: &[u8],
    padded: bool,
) -> Result<usize, BufferTooSmall> {
    let pad = if padded {
        stream_padding(payload.len())
    } else {
        0
    };
    let needed = CHANNEL_DATA_HEADER_LEN + payload.len() + pad;
    if out.len() < needed {
        return Err(BufferTooSmall { needed });
    }
    write_channel_data_header(out, channel, payload.len())?;
    put(out, CHANNEL_DATA_HEADER_LEN, payload);
    crate::cursor::fill(out, CHANNEL_DATA_HEADER_LEN + payload.len(), pad, 0);
    Ok(needed)
}

/// Padding bytes after a ChannelData payload of `len` bytes on a stream (RFC 8656 §12.5: "over
/// TCP and TLS-over-TCP, the ChannelData message MUST be padded to a multiple of four bytes").
#[inline]
pub const fn stream_padding(len: usize) -> usize {
    pad4(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 8656 §12.5: "the ChannelData message MUST be padded to a multiple of four bytes
    /// [over TCP]. The padding is not reflected in the length field of the ChannelData
    /// message". Over UDP "the padding is not required but MAY be included".
    #[test]
    fn channel_data_parses_with_and_without_padding_and_the_length_excludes_it() {
        let ch = ChannelNumber::new(0x4001).unwrap();
        let mut buf = [0xAAu8; 16];
        let n = write_channel_data(&mut buf, ch, b"hello", true).unwrap();
        assert_eq!(&buf[..n], b"\x40\x01\x00\x05hello\x00\x00\x00");
        for frame in [&buf[..n], &buf[..9]] {
            let cd = ChannelData::parse(frame).unwrap();
            assert_eq!(cd.channel(), ch);
            assert_eq!(cd.payload(), b"hello");
        }
        assert_eq!(write_channel_data(&mut buf, ch, b"hello", false), Ok(9));
    }

    #[test]
    fn the_channel_data_header_is_written_in_place_in_front_of_the_payload() {
        // Headroom layout: [0..4) header, [4..) payload received in place.
        let mut buf = [0u8; 4 + 3];
        buf[4..].copy_from_slice(b"abc");
        let ch = ChannelNumber::MAX;
        assert_eq!(
            write_channel_data_header(&mut buf, ch, 3),
            Ok(CHANNEL_DATA_HEADER_LEN)
        );
        let cd = ChannelData::parse(&buf).unwrap();
        assert_eq!((cd.channel(), cd.payload()), (ch, &b"abc"[..]));
    }

    #[test]
    fn writing_channel_data_into_a_short_buffer_fails_and_writes_nothing() {
        let ch = ChannelNumber::MIN;
        let mut buf = [7u8; 3];
        assert_eq!(
            write_channel_data_header(&mut buf, ch, 1),
            Err(BufferTooSmall { needed: 4 })
        );
        assert_eq!(buf, [7; 3]);
        let mut buf = [7u8; 8];
        assert_eq!(
            write_channel_data(&mut buf, ch, b"abcde", false),
            Err(BufferTooSmall { needed: 9 })
        );
        assert_eq!(write_channel_data(&mut buf, ch, b"abc", true), Ok(8));
        let mut buf = [7u8; 8];
        assert_eq!(
            write_channel_data_header(&mut buf, ch, 70_000),
            Err(BufferTooSmall { needed: usize::MAX })
        );
        assert_eq!(buf, [7; 8]);
    }

    #[test]
    fn stream_padding_rounds_the_payload_up_to_four_bytes() {
        assert_eq!(
            [0, 1, 2, 3, 4, 65535].map(stream_padding),
            [0, 3, 2, 1, 0, 1]
        );
    }
}
