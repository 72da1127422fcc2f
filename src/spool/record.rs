//! The on-disk record format of one spooled message. Pure: no I/O.
//!
//! ```text
//! offset  size  field
//!  0       4    magic "ETR1"
//!  4       4    header CRC-32 (IEEE) over bytes 8..48 and the envelope
//!  8       8    message id (u64 LE)
//! 16       8    arrival time, unix seconds
//! 24       4    envelope length E
//! 28       4    recipient count R
//! 32       8    data length D
//! 40       4    data CRC-32 over the D data octets
//! 44       1    flags (bit 0: 8-bit content)
//! 45       3    reserved, zero
//! 48       E    envelope: u16 sender length + sender, then R times u16 length + recipient
//! 48+E     R    delivery state, one octet per recipient (see [`RcptState`]), updated in place
//! 48+E+R   D    message data: unstuffed, CRLF lines, our Received header first
//!          pad  zero octets up to a multiple of 8
//! ```
//! The state octets are the only bytes ever rewritten, each by a one-octet write, so an update
//! can never tear a neighbour; they are outside both checksums. An unknown state value reads as
//! pending, so damage there can only cause a redelivery, never a loss.

/// Record magic.
pub const MAGIC: [u8; 4] = *b"ETR1";
/// Fixed header size.
pub const HEADER_LEN: usize = 48;
/// Records start at multiples of this.
pub const ALIGN: usize = 8;

/// Delivery state of one recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RcptState {
    /// Still to be delivered (0, and any unknown value).
    Pending,
    /// Delivered (a 2xx from the node's server).
    Delivered,
    /// Failed permanently; a bounce was queued (or the sender was `<>`).
    Failed,
}

impl RcptState {
    /// The octet stored on disk.
    pub fn to_byte(self) -> u8 {
        match self {
            RcptState::Pending => 0,
            RcptState::Delivered => b'D',
            RcptState::Failed => b'F',
        }
    }
    /// Reads an octet; unknown values are `Pending` (redeliver rather than lose).
    pub fn from_byte(b: u8) -> RcptState {
        match b {
            b'D' => RcptState::Delivered,
            b'F' => RcptState::Failed,
            _ => RcptState::Pending,
        }
    }
}

/// Rounds up to the record alignment.
pub fn align(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

/// Builds a record in one buffer: header, envelope and state are written first, then the
/// caller appends data directly (no copy), then [`RecordBuilder::finish`] fills in lengths and
/// checksums.
#[derive(Debug)]
pub struct RecordBuilder {
    buf: Vec<u8>,
    data_start: usize,
}

impl RecordBuilder {
    /// Starts a record. `capacity_hint` is the expected data size.
    pub fn new(msg_id: u64, arrival: u64, sender: &[u8], recipients: &[&[u8]], capacity_hint: usize) -> RecordBuilder {
        let env_len = 2 + sender.len() + recipients.iter().map(|r| 2 + r.len()).sum::<usize>();
        let mut buf = Vec::with_capacity(HEADER_LEN + env_len + recipients.len() + capacity_hint + ALIGN);
        buf.extend_from_slice(&MAGIC);
        buf.extend_from_slice(&[0; 4]);
        buf.extend_from_slice(&msg_id.to_le_bytes());
        buf.extend_from_slice(&arrival.to_le_bytes());
        buf.extend_from_slice(&(env_len as u32).to_le_bytes());
        buf.extend_from_slice(&(recipients.len() as u32).to_le_bytes());
        buf.extend_from_slice(&[0; 16]);
        debug_assert_eq!(buf.len(), HEADER_LEN);
        let put = |buf: &mut Vec<u8>, s: &[u8]| {
            buf.extend_from_slice(&(s.len() as u16).to_le_bytes());
            buf.extend_from_slice(s);
        };
        put(&mut buf, sender);
        for r in recipients {
            put(&mut buf, r);
        }
        buf.resize(buf.len() + recipients.len(), RcptState::Pending.to_byte());
        let data_start = buf.len();
        RecordBuilder { buf, data_start }
    }

    /// The buffer to append message data to.
    pub fn data_mut(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// The data appended so far.
    pub fn data(&self) -> &[u8] {
        &self.buf[self.data_start..]
    }

    /// Fills in lengths and checksums and pads; returns the finished record.
    pub fn finish(mut self, eight_bit: bool) -> Vec<u8> {
        let data_len = (self.buf.len() - self.data_start) as u64;
        let data_crc = crc32fast::hash(&self.buf[self.data_start..]);
        self.buf[32..40].copy_from_slice(&data_len.to_le_bytes());
        self.buf[40..44].copy_from_slice(&data_crc.to_le_bytes());
        self.buf[44] = u8::from(eight_bit);
        let env_len = u32::from_le_bytes(self.buf[24..28].try_into().expect("4 bytes")) as usize;
        let mut h = crc32fast::Hasher::new();
        h.update(&self.buf[8..HEADER_LEN + env_len]);
        self.buf[4..8].copy_from_slice(&h.finalize().to_le_bytes());
        let padded = align(self.buf.len());
        self.buf.resize(padded, 0);
        self.buf
    }
}

/// A parsed record, borrowing the bytes it was read from.
#[derive(Debug, Clone)]
pub struct RecordView<'a> {
    /// Message id.
    pub msg_id: u64,
    /// Arrival, unix seconds.
    pub arrival: u64,
    /// Envelope sender (empty for `<>`).
    pub sender: &'a [u8],
    /// Envelope recipients.
    pub recipients: Vec<&'a [u8]>,
    /// Per-recipient state.
    pub states: &'a [u8],
    /// Offset of the state octets from the record start.
    pub state_offset: usize,
    /// Offset of the data from the record start.
    pub data_offset: usize,
    /// Message data.
    pub data: &'a [u8],
    /// 8-bit content flag.
    pub eight_bit: bool,
    /// Total length including padding.
    pub total_len: usize,
}

/// Why a record could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// All zero: the end of the written part of a preallocated segment (or a punched hole).
    #[error("end of records")]
    End,
    /// Not enough bytes: the record continues beyond what we have.
    #[error("record truncated")]
    Truncated,
    /// Magic or header checksum wrong: the header is not trustworthy.
    #[error("corrupt record header")]
    BadHeader,
    /// Header fine, data checksum wrong: the record's length is known, so it can be skipped.
    #[error("corrupt message data (checksum mismatch)")]
    BadData,
}

/// Reads the fixed header only: returns (total length, header is valid) or an error.
pub fn peek_len(buf: &[u8]) -> Result<usize, RecordError> {
    if buf.len() < HEADER_LEN {
        return if buf.iter().all(|b| *b == 0) {
            Err(RecordError::End)
        } else {
            Err(RecordError::Truncated)
        };
    }
    if buf[..HEADER_LEN].iter().all(|b| *b == 0) {
        return Err(RecordError::End);
    }
    if buf[..4] != MAGIC {
        return Err(RecordError::BadHeader);
    }
    let u32at = |o: usize| u32::from_le_bytes(buf[o..o + 4].try_into().expect("4 bytes")) as usize;
    let env_len = u32at(24);
    let rcpts = u32at(28);
    let data_len = u64::from_le_bytes(buf[32..40].try_into().expect("8 bytes"));
    let data_len = usize::try_from(data_len).map_err(|_| RecordError::BadHeader)?;
    if env_len > 1 << 24 || rcpts > 1 << 16 || data_len > 1 << 40 {
        return Err(RecordError::BadHeader);
    }
    if buf.len() >= HEADER_LEN + env_len {
        let mut h = crc32fast::Hasher::new();
        h.update(&buf[8..HEADER_LEN + env_len]);
        if h.finalize() != u32at(4) as u32 {
            return Err(RecordError::BadHeader);
        }
    }
    Ok(align(HEADER_LEN + env_len + rcpts + data_len))
}

/// Parses a whole record. `buf` must start at a record and may extend past it.
pub fn parse(buf: &[u8]) -> Result<RecordView<'_>, RecordError> {
    let total_len = peek_len(buf)?;
    if buf.len() < total_len || buf.len() < HEADER_LEN {
        return Err(RecordError::Truncated);
    }
    let u32at = |o: usize| u32::from_le_bytes(buf[o..o + 4].try_into().expect("4 bytes")) as usize;
    let env_len = u32at(24);
    let rcpt_count = u32at(28);
    if buf.len() < HEADER_LEN + env_len {
        return Err(RecordError::Truncated);
    }
    let data_len = u64::from_le_bytes(buf[32..40].try_into().expect("8 bytes")) as usize;
    let env = &buf[HEADER_LEN..HEADER_LEN + env_len];
    let mut pos = 0;
    let mut take = || -> Result<&[u8], RecordError> {
        let n = u16::from_le_bytes(
            env.get(pos..pos + 2)
                .ok_or(RecordError::BadHeader)?
                .try_into()
                .expect("2"),
        ) as usize;
        let s = env.get(pos + 2..pos + 2 + n).ok_or(RecordError::BadHeader)?;
        pos += 2 + n;
        Ok(s)
    };
    let sender = take()?;
    let mut recipients = Vec::with_capacity(rcpt_count);
    for _ in 0..rcpt_count {
        recipients.push(take()?);
    }
    let state_offset = HEADER_LEN + env_len;
    let data_offset = state_offset + rcpt_count;
    let data = &buf[data_offset..data_offset + data_len];
    if crc32fast::hash(data) != u32at(40) as u32 {
        return Err(RecordError::BadData);
    }
    Ok(RecordView {
        msg_id: u64::from_le_bytes(buf[8..16].try_into().expect("8")),
        arrival: u64::from_le_bytes(buf[16..24].try_into().expect("8")),
        sender,
        recipients,
        states: &buf[state_offset..data_offset],
        state_offset,
        data_offset,
        data,
        eight_bit: buf[44] & 1 != 0,
        total_len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut b = RecordBuilder::new(42, 1000, b"a@b.test", &[b"x@n1.test", b"y@n2.test"], 16);
        b.data_mut().extend_from_slice(b"Subject: hi\r\n\r\nbody\r\n");
        b.finish(false)
    }

    #[test]
    fn round_trip() {
        let rec = sample();
        assert_eq!(rec.len() % ALIGN, 0);
        let v = parse(&rec).unwrap();
        assert_eq!(v.msg_id, 42);
        assert_eq!(v.sender, b"a@b.test");
        assert_eq!(v.recipients, vec![&b"x@n1.test"[..], b"y@n2.test"]);
        assert_eq!(v.data, b"Subject: hi\r\n\r\nbody\r\n");
        assert_eq!(v.states, &[0, 0]);
        assert_eq!(v.total_len, rec.len());
    }

    #[test]
    fn state_bytes_are_outside_checksums() {
        let mut rec = sample();
        let off = parse(&rec).unwrap().state_offset;
        rec[off + 1] = RcptState::Delivered.to_byte();
        let v = parse(&rec).unwrap();
        assert_eq!(RcptState::from_byte(v.states[1]), RcptState::Delivered);
        assert_eq!(RcptState::from_byte(v.states[0]), RcptState::Pending);
    }

    #[test]
    fn corruption_is_detected() {
        let rec = sample();
        let mut bad = rec.clone();
        *bad.last_mut().unwrap() = 0; // padding: harmless
        assert!(parse(&bad).is_ok());
        let data_off = parse(&rec).unwrap().data_offset;
        let mut bad = rec.clone();
        bad[data_off] ^= 1;
        assert_eq!(parse(&bad).unwrap_err(), RecordError::BadData);
        let mut bad = rec.clone();
        bad[60] ^= 1; // envelope
        assert_eq!(parse(&bad).unwrap_err(), RecordError::BadHeader);
        assert_eq!(parse(&rec[..rec.len() - 9]).unwrap_err(), RecordError::Truncated);
        assert_eq!(parse(&[0u8; 100]).unwrap_err(), RecordError::End);
    }
}
