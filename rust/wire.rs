//! Just enough of the protobuf wire format to read one field of a component without
//! knowing its schema, and to write entities without building intermediate messages.
//! Reading validates the whole message's framing, so garbage bytes are refused.
use prost::bytes::Buf;
use prost::encoding::{decode_varint, encode_varint, encoded_len_varint};

/// The raw value of one field as found on the wire.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Field<'a> {
    Varint(u64),
    Fixed64(u64),
    Fixed32(u32),
    Bytes(&'a [u8]),
}

/// Walks every field of `msg` in order, calling `visit(number, value)`.
/// Errors on anything that is not well-formed protobuf (groups included: proto3 has none).
pub fn scan<'a>(msg: &'a [u8], mut visit: impl FnMut(u32, Field<'a>)) -> Result<(), String> {
    let mut buf = msg;
    while buf.has_remaining() {
        let key = decode_varint(&mut buf).map_err(|_| "truncated field key".to_string())?;
        let number = (key >> 3) as u32;
        if number == 0 || key >> 3 > u32::MAX as u64 {
            return Err(format!("invalid field number {}", key >> 3));
        }
        let value = match key & 7 {
            0 => Field::Varint(decode_varint(&mut buf).map_err(|_| "truncated varint".to_string())?),
            1 => {
                if buf.len() < 8 {
                    return Err("truncated fixed64".into());
                }
                Field::Fixed64(buf.get_u64_le())
            }
            5 => {
                if buf.len() < 4 {
                    return Err("truncated fixed32".into());
                }
                Field::Fixed32(buf.get_u32_le())
            }
            2 => {
                let len = decode_varint(&mut buf).map_err(|_| "truncated length".to_string())?;
                if len > buf.len() as u64 {
                    return Err(format!("field {number} claims {len} bytes, {} remain", buf.len()));
                }
                let (head, rest) = buf.split_at(len as usize);
                buf = rest;
                Field::Bytes(head)
            }
            w => return Err(format!("unsupported wire type {w} in field {number}")),
        };
        visit(number, value);
    }
    Ok(())
}

/// An `EntityEventBatch`'s (events other than heartbeats, highest seq), read without
/// decoding the entities: what a batched watch's cursor needs.
pub fn event_batch_summary(batch: &[u8]) -> Result<(u64, u64), String> {
    const HEARTBEAT: u64 = 4; // store.v1.EventType
    let mut events = Vec::new();
    scan(batch, |n, f| {
        if let (1, Field::Bytes(ev)) = (n, f) {
            events.push(ev)
        }
    })?;
    let (mut count, mut last) = (0, 0);
    for ev in events {
        let (mut kind, mut seq) = (0, 0);
        scan(ev, |n, f| match (n, f) {
            (1, Field::Varint(v)) => kind = v,
            (4, Field::Varint(v)) => seq = v,
            _ => {}
        })?;
        count += u64::from(kind != HEARTBEAT);
        last = last.max(seq);
    }
    Ok((count, last))
}

// ---- writing -------------------------------------------------------------------------

pub fn key_len(tag: u32) -> usize {
    encoded_len_varint((tag as u64) << 3)
}

pub fn put_varint_field(out: &mut Vec<u8>, tag: u32, v: u64) {
    if v != 0 {
        encode_varint((tag as u64) << 3, out);
        encode_varint(v, out);
    }
}

pub fn varint_field_len(tag: u32, v: u64) -> usize {
    if v == 0 { 0 } else { key_len(tag) + encoded_len_varint(v) }
}

pub fn put_fixed64_field(out: &mut Vec<u8>, tag: u32, v: u64) {
    if v != 0 {
        encode_varint(((tag as u64) << 3) | 1, out);
        out.extend_from_slice(&v.to_le_bytes());
    }
}

pub fn fixed64_field_len(tag: u32, v: u64) -> usize {
    if v == 0 { 0 } else { key_len(tag) + 8 }
}

/// Writes the key and length prefix of a length-delimited field of `len` bytes.
pub fn put_len_prefix(out: &mut Vec<u8>, tag: u32, len: usize) {
    encode_varint(((tag as u64) << 3) | 2, out);
    encode_varint(len as u64, out);
}

pub fn len_field_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

pub fn put_bytes_field(out: &mut Vec<u8>, tag: u32, bytes: &[u8]) {
    if !bytes.is_empty() {
        put_len_prefix(out, tag, bytes.len());
        out.extend_from_slice(bytes);
    }
}

pub fn bytes_field_len(tag: u32, bytes: &[u8]) -> usize {
    if bytes.is_empty() { 0 } else { len_field_len(tag, bytes.len()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_reads_every_wire_type() {
        // field 1 varint 150, field 2 fixed64, field 3 bytes "hi", field 4 fixed32
        let mut msg = vec![0x08, 0x96, 0x01, 0x11];
        msg.extend_from_slice(&7u64.to_le_bytes());
        msg.extend_from_slice(&[0x1a, 2, b'h', b'i', 0x25]);
        msg.extend_from_slice(&9u32.to_le_bytes());
        let mut seen = vec![];
        scan(&msg, |n, f| seen.push((n, format!("{f:?}")))).unwrap();
        assert_eq!(seen.len(), 4);
        assert_eq!(seen[0], (1, "Varint(150)".to_string()));
        assert_eq!(seen[2], (3, "Bytes([104, 105])".to_string()));
    }

    #[test]
    fn scan_refuses_garbage() {
        assert!(scan(&[0x0a, 0x05, 0x01], |_, _| {}).is_err()); // length beyond the end
        assert!(scan(&[0x08], |_, _| {}).is_err()); // truncated varint
        assert!(scan(&[0x0b], |_, _| {}).is_err()); // group
        assert!(scan(&[0x00, 0x00], |_, _| {}).is_err()); // field number 0
        assert!(scan(&[0xff; 11], |_, _| {}).is_err());
    }

    #[test]
    fn event_batch_summary_counts_events_but_heartbeats_and_finds_the_last_seq() {
        use crate::pb::store::v1::{EntityEvent, EntityEventBatch};
        use prost::Message;
        let ev = |kind, seq| EntityEvent { r#type: kind, seq, ..EntityEvent::default() };
        let batch = EntityEventBatch { events: vec![ev(2, 7), ev(3, 9), ev(4, 12)] }.encode_to_vec();
        assert_eq!(event_batch_summary(&batch), Ok((2, 12)));
        assert!(event_batch_summary(b"\x0a\x05\x01").is_err());
    }

    #[test]
    fn writers_agree_with_lengths() {
        let mut out = vec![];
        put_varint_field(&mut out, 6, 300);
        put_bytes_field(&mut out, 1, b"abc");
        assert_eq!(out.len(), varint_field_len(6, 300) + bytes_field_len(1, b"abc"));
    }
}
