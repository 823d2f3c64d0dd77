//! [`MessageBuilder`]: encodes a STUN message into a caller-supplied buffer, without heap.

use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::Sha256;

use crate::RawAttribute;
use crate::attribute::Attribute;
use crate::cursor::{fill, pad4, put};
use crate::error::BufferTooSmall;
use crate::message::{FINGERPRINT_ATTR_LEN, FINGERPRINT_XOR, INTEGRITY_ATTR_LEN};
use crate::types::{
    AttributeType, Class, MAGIC_COOKIE, Method, STUN_BODY_LEN_MAX, STUN_HEADER_LEN, TransactionId,
    message_type,
};

/// Length of a full MESSAGE-INTEGRITY-SHA256 attribute, header included (RFC 8489 §14.6).
const INTEGRITY_SHA256_ATTR_LEN: usize = 4 + 32;

/// Builds a STUN message in place in `buf`.
///
/// Each call appends one attribute and keeps the header's length field current, so the
/// buffer holds a valid message after every successful call. A call that does not fit returns
/// [`BufferTooSmall`] with the total length needed and leaves the buffer untouched.
///
/// Order matters: add the ordinary attributes, then [`message_integrity`](Self::message_integrity)
/// and/or [`message_integrity_sha256`](Self::message_integrity_sha256), then
/// [`fingerprint`](Self::fingerprint) (RFC 8489 §14.5-14.7). Adding an attribute after those is
/// a programming error (caught by a debug assertion); the parser of the receiving side would
/// reject the message.
///
/// ```
/// use uturn_proto::{Attribute, Class, Message, MessageBuilder, Method, TransactionId};
///
/// let mut buf = [0u8; 128];
/// let mut b = MessageBuilder::new(&mut buf, Class::Request, Method::BINDING, TransactionId([7; 12]));
/// b.attribute(&Attribute::Software("uturn"))?;
/// b.message_integrity(b"password")?;
/// b.fingerprint()?;
/// let len = b.finish();
/// let msg = Message::parse(&buf[..len])?;
/// assert!(msg.verify_integrity(b"password").is_ok());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct MessageBuilder<'b> {
    buf: &'b mut [u8],
    len: usize,
    tid: TransactionId,
    padding_byte: u8,
    stage: Stage,
}

/// Where the builder is in the RFC 8489 §14.5-14.7 ordering.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    Attributes,
    Integrity,
    IntegritySha256,
    Fingerprint,
}

impl<'b> MessageBuilder<'b> {
    /// Starts a message: writes the 20-byte header (length 0) into `buf`.
    ///
    /// # Panics
    ///
    /// When `buf` is shorter than 20 bytes. Buffer sizes come from the program, not from the
    /// network, so that is a bug; use [`try_new`](Self::try_new) to handle it as an error.
    pub fn new(buf: &'b mut [u8], class: Class, method: Method, tid: TransactionId) -> Self {
        let len = buf.len();
        assert!(
            len >= STUN_HEADER_LEN,
            "a STUN message needs 20 bytes, the buffer has {len}"
        );
        let mut b = Self {
            buf,
            len: STUN_HEADER_LEN,
            tid,
            padding_byte: 0,
            stage: Stage::Attributes,
        };
        b.write_header(message_type(class, method));
        b
    }

    /// Like [`new`](Self::new), but returns [`BufferTooSmall`] for a buffer under 20 bytes.
    pub fn try_new(
        buf: &'b mut [u8],
        class: Class,
        method: Method,
        tid: TransactionId,
    ) -> Result<Self, BufferTooSmall> {
        if buf.len() < STUN_HEADER_LEN {
            return Err(BufferTooSmall {
                needed: STUN_HEADER_LEN,
            });
        }
        Ok(Self::new(buf, class, method, tid))
    }

    /// Sets the byte used to pad later attributes to a multiple of 4 (default 0x00). RFC 8489
    /// §14 lets padding hold any value; RFC 5769 §2.1-2.3 use 0x20, so re-encoding them
    /// byte for byte needs this.
    pub fn padding_byte(&mut self, byte: u8) -> &mut Self {
        self.padding_byte = byte;
        self
    }

    /// The transaction ID.
    pub const fn transaction_id(&self) -> TransactionId {
        self.tid
    }

    /// Bytes written so far (header included).
    pub const fn len(&self) -> usize {
        self.len
    }

    /// Always false: a message has at least its header.
    pub const fn is_empty(&self) -> bool {
        false
    }

    /// Appends a typed attribute.
    pub fn attribute(&mut self, attr: &Attribute<'_>) -> Result<&mut Self, BufferTooSmall> {
        let ty = attr.ty();
        self.check_order(ty);
        let n = attr.value_len();
        let (start, end) = self.reserve(n)?;
        let tid = self.tid;
        if let Some(value) = self.buf.get_mut(start..end) {
            attr.write_value(value, &tid);
        }
        self.commit(ty, n);
        Ok(self)
    }

    /// Appends an attribute given as raw bytes (value without padding).
    pub fn raw_attribute(
        &mut self,
        ty: AttributeType,
        value: &[u8],
    ) -> Result<&mut Self, BufferTooSmall> {
        self.attribute(&Attribute::Other(RawAttribute { ty, value }))
    }

    /// Appends MESSAGE-INTEGRITY: HMAC-SHA1 keyed with `key` over the message so far, with
    /// the header length counting the new attribute (RFC 8489 §14.5).
    pub fn message_integrity(&mut self, key: &[u8]) -> Result<&mut Self, BufferTooSmall> {
        self.check_order(AttributeType::MESSAGE_INTEGRITY);
        let mac = self.mac::<Hmac<Sha1>>(key, INTEGRITY_ATTR_LEN)?;
        let mac: [u8; 20] = mac.into();
        self.attribute(&Attribute::MessageIntegrity(mac))?;
        self.stage = Stage::Integrity;
        Ok(self)
    }

    /// Appends MESSAGE-INTEGRITY-SHA256: the full 32-byte HMAC-SHA256 keyed with `key`
    /// (RFC 8489 §14.6).
    pub fn message_integrity_sha256(&mut self, key: &[u8]) -> Result<&mut Self, BufferTooSmall> {
        self.check_order(AttributeType::MESSAGE_INTEGRITY_SHA256);
        let mac = self.mac::<Hmac<Sha256>>(key, INTEGRITY_SHA256_ATTR_LEN)?;
        let mac: [u8; 32] = mac.into();
        self.attribute(&Attribute::MessageIntegritySha256(&mac))?;
        self.stage = Stage::IntegritySha256;
        Ok(self)
    }

    /// Appends FINGERPRINT: CRC-32 of the message so far, header length already counting the
    /// FINGERPRINT attribute, XOR 0x5354554E (RFC 8489 §14.7).
    pub fn fingerprint(&mut self) -> Result<&mut Self, BufferTooSmall> {
        self.check_order(AttributeType::FINGERPRINT);
        let needed = self.len + FINGERPRINT_ATTR_LEN;
        self.check_fits(needed)?;
        self.set_body_len(needed - STUN_HEADER_LEN);
        let crc = crc32fast::hash(self.buf.get(..self.len).unwrap_or(&[]));
        self.attribute(&Attribute::Fingerprint(crc ^ FINGERPRINT_XOR))?;
        self.stage = Stage::Fingerprint;
        Ok(self)
    }

    /// Ends the message; returns its length. The message is `buf[..len]`.
    pub fn finish(self) -> usize {
        self.len
    }

    /// Computes a MAC over the message so far, as if an attribute of `attr_len` bytes were
    /// already counted in the header. Leaves the buffer untouched if it would not fit.
    fn mac<M: Mac + hmac::digest::KeyInit>(
        &mut self,
        key: &[u8],
        attr_len: usize,
    ) -> Result<hmac::digest::Output<M>, BufferTooSmall> {
        let needed = self.len + attr_len;
        self.check_fits(needed)?;
        let body_len = self.body_len();
        self.set_body_len(needed - STUN_HEADER_LEN);
        #[allow(clippy::expect_used)]
        // HMAC takes keys of any length (longer ones are hashed), so this cannot fail.
        let mut mac = <M as Mac>::new_from_slice(key).expect("HMAC accepts any key length");
        mac.update(self.buf.get(..self.len).unwrap_or(&[]));
        self.set_body_len(body_len);
        Ok(mac.finalize().into_bytes())
    }

    fn check_order(&self, ty: AttributeType) {
        let ok = match self.stage {
            Stage::Attributes => true,
            Stage::Integrity => {
                ty == AttributeType::MESSAGE_INTEGRITY_SHA256 || ty == AttributeType::FINGERPRINT
            }
            Stage::IntegritySha256 => ty == AttributeType::FINGERPRINT,
            Stage::Fingerprint => false,
        };
        debug_assert!(
            ok,
            "attribute {ty} after {:?} breaks RFC 8489 §14.5-14.7 ordering",
            self.stage
        );
    }

    fn check_fits(&self, needed: usize) -> Result<(), BufferTooSmall> {
        if needed - STUN_HEADER_LEN > STUN_BODY_LEN_MAX {
            return Err(BufferTooSmall { needed: usize::MAX });
        }
        if needed > self.buf.len() {
            return Err(BufferTooSmall { needed });
        }
        Ok(())
    }

    /// Checks room for an attribute with an `n`-byte value; returns the value's range.
    fn reserve(&self, n: usize) -> Result<(usize, usize), BufferTooSmall> {
        if n > usize::from(u16::MAX) {
            return Err(BufferTooSmall { needed: usize::MAX });
        }
        let needed = self.len + 4 + n + pad4(n);
        self.check_fits(needed)?;
        Ok((self.len + 4, self.len + 4 + n))
    }

    /// Writes the attribute header and padding around a value already written, and updates
    /// the message length.
    fn commit(&mut self, ty: AttributeType, n: usize) {
        let len16 = u16::try_from(n).unwrap_or(u16::MAX);
        put(self.buf, self.len, &ty.0.to_be_bytes());
        put(self.buf, self.len + 2, &len16.to_be_bytes());
        fill(self.buf, self.len + 4 + n, pad4(n), self.padding_byte);
        self.len += 4 + n + pad4(n);
        self.set_body_len(self.len - STUN_HEADER_LEN);
    }

    fn write_header(&mut self, ty: u16) {
        put(self.buf, 0, &ty.to_be_bytes());
        put(self.buf, 2, &[0, 0]);
        put(self.buf, 4, &MAGIC_COOKIE.to_be_bytes());
        put(self.buf, 8, &self.tid.0);
    }

    fn body_len(&self) -> usize {
        self.len - STUN_HEADER_LEN
    }

    fn set_body_len(&mut self, body_len: usize) {
        let body_len = u16::try_from(body_len).unwrap_or(u16::MAX);
        put(self.buf, 2, &body_len.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Message;

    const TID: TransactionId = TransactionId([0x22; 12]);

    type Step = fn(&mut MessageBuilder<'_>) -> Result<(), BufferTooSmall>;

    /// rustls-style contract: when the buffer is too small, say how much is needed and write
    /// nothing.
    #[test]
    fn every_write_that_does_not_fit_reports_the_size_needed_and_leaves_the_buffer_untouched() {
        // Header 20 + USERNAME (4 + 5 + 3 padding) = 32; + MI 24 = 56; + MI-SHA256 36 = 92;
        // + FINGERPRINT 8 = 100.
        let steps: [(usize, Step); 4] = [
            (32, |b| b.attribute(&Attribute::Username("alice")).map(drop)),
            (56, |b| b.message_integrity(b"k").map(drop)),
            (92, |b| b.message_integrity_sha256(b"k").map(drop)),
            (100, |b| b.fingerprint().map(drop)),
        ];
        for (i, (needed, _)) in steps.iter().enumerate() {
            let mut buf = [0xEEu8; 128];
            let cap = needed - 1;
            let mut b = MessageBuilder::new(&mut buf[..cap], Class::Request, Method::ALLOCATE, TID);
            for (_, step) in &steps[..i] {
                step(&mut b).unwrap();
            }
            let before = b.len();
            let snapshot = b.buf.to_vec();
            assert_eq!(
                steps[i].1(&mut b),
                Err(BufferTooSmall { needed: *needed }),
                "step {i}"
            );
            assert_eq!(b.len(), before);
            assert_eq!(&b.buf[..], &snapshot[..], "step {i} wrote into the buffer");
            assert!(
                Message::parse(&buf[..before]).is_ok(),
                "still a valid message after step {i}"
            );
        }
        let mut buf = [0u8; 100];
        let mut b = MessageBuilder::new(&mut buf, Class::Request, Method::ALLOCATE, TID);
        for (_, step) in &steps {
            step(&mut b).unwrap();
        }
        assert_eq!(b.finish(), 100);
        let msg = Message::parse(&buf).unwrap();
        assert_eq!(msg.verify_integrity(b"k"), Ok(()));
        assert_eq!(msg.verify_integrity_sha256(b"k"), Ok(()));
    }

    #[test]
    fn a_buffer_shorter_than_a_header_is_refused_by_try_new() {
        let mut buf = [0u8; 19];
        assert!(matches!(
            MessageBuilder::try_new(&mut buf, Class::Request, Method::BINDING, TID),
            Err(BufferTooSmall { needed: 20 })
        ));
        let mut buf = [0u8; 20];
        let b = MessageBuilder::try_new(&mut buf, Class::Request, Method::BINDING, TID).unwrap();
        assert_eq!(b.finish(), 20);
        assert_eq!(buf[..4], [0x00, 0x01, 0x00, 0x00]);
    }

    #[test]
    fn a_value_too_long_for_stun_can_never_fit() {
        let mut buf = vec![0u8; 70_000];
        let big = vec![0u8; 65_536];
        let mut b = MessageBuilder::new(&mut buf, Class::Indication, Method::DATA, TID);
        assert_eq!(
            b.attribute(&Attribute::Data(&big)).map(drop),
            Err(BufferTooSmall { needed: usize::MAX })
        );
        let almost = vec![0u8; 65_533];
        assert_eq!(
            b.attribute(&Attribute::Data(&almost)).map(drop),
            Err(BufferTooSmall { needed: usize::MAX })
        );
        let max = vec![0u8; STUN_BODY_LEN_MAX - 4];
        b.attribute(&Attribute::Data(&max)).unwrap();
        let len = b.finish();
        assert_eq!(len, 20 + STUN_BODY_LEN_MAX);
        assert_eq!(
            Message::parse(&buf[..len])
                .unwrap()
                .data()
                .unwrap()
                .map(<[u8]>::len),
            Some(65_528)
        );
    }

    #[test]
    fn the_padding_byte_fills_the_gap_after_short_values() {
        let mut buf = [0u8; 64];
        let mut b = MessageBuilder::new(&mut buf, Class::Request, Method::BINDING, TID);
        b.padding_byte(0x20)
            .attribute(&Attribute::Username("a"))
            .unwrap();
        let len = b.finish();
        assert_eq!(&buf[24..len], b"a   ");
    }

    #[test]
    fn an_error_response_carries_its_code_and_reason_phrase() {
        let mut buf = [0u8; 128];
        let mut b = MessageBuilder::new(&mut buf, Class::ErrorResponse, Method::ALLOCATE, TID);
        b.attribute(&Attribute::ErrorCode(crate::ErrorCodeAttribute::new(
            crate::ErrorCode::ALLOCATION_QUOTA_REACHED,
        )))
        .unwrap();
        let len = b.finish();
        let msg = Message::parse(&buf[..len]).unwrap();
        let e = msg.error_code().unwrap().unwrap();
        assert_eq!((e.code.0, e.reason), (486, "Allocation Quota Reached"));
        assert_eq!(&buf[24..28], &[0, 0, 4, 86]);
    }
}
