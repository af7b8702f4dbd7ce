//! proptest strategies for the wire format, exported (feature `proptest`) so that upper
//! crates can test their own messages through pool-ipc's framing.

use proptest::collection::vec;
use proptest::prelude::*;

/// The bytes of one inline frame carrying `payload` (a little-endian `u32` length, then
/// the payload), as a [`Sender`](crate::Sender) writes it.
///
/// # Panics
///
/// If `payload` is 2 GiB or longer.
pub fn frame_bytes(payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("payload too large for a frame");
    assert!(len < 1 << 31, "payload too large for a frame");
    let mut v = Vec::with_capacity(4 + payload.len());
    v.extend_from_slice(&len.to_le_bytes());
    v.extend_from_slice(payload);
    v
}

/// Arbitrary payloads of at most `max_len` bytes.
pub fn payload(max_len: usize) -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..=max_len)
}

/// A list of payloads (at most `max_count`, each at most `max_len` bytes).
pub fn payloads(max_count: usize, max_len: usize) -> impl Strategy<Value = Vec<Vec<u8>>> {
    vec(payload(max_len), 0..=max_count)
}

/// Chunk sizes (each at least 1) to cut a byte stream into, as a reader might receive
/// it. Apply with [`split`]; the last chunk takes whatever is left.
pub fn chunk_sizes(max_chunks: usize, max_chunk: usize) -> impl Strategy<Value = Vec<usize>> {
    vec(1..=max_chunk.max(1), 0..=max_chunks)
}

/// Cuts `bytes` into consecutive chunks of the given `sizes`; the rest (if any) is the
/// last chunk. Every returned chunk is non-empty.
pub fn split<'a>(bytes: &'a [u8], sizes: &[usize]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = bytes;
    for &s in sizes {
        if rest.is_empty() {
            break;
        }
        let (a, b) = rest.split_at(s.clamp(1, rest.len()));
        out.push(a);
        rest = b;
    }
    if !rest.is_empty() {
        out.push(rest);
    }
    out
}

/// Arbitrary bytes, biased towards things that look like frame headers, to feed a
/// receiver as garbage.
pub fn garbage(max_len: usize) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        payload(max_len),
        (any::<u32>(), payload(max_len)).prop_map(|(h, mut rest)| {
            let mut v = h.to_le_bytes().to_vec();
            v.append(&mut rest);
            v
        }),
        (0u32..64, any::<u8>(), payload(max_len)).prop_map(|(n, kind, mut rest)| {
            let mut v = ((1u32 << 31) | n).to_le_bytes().to_vec();
            v.push(kind);
            v.append(&mut rest);
            v
        }),
    ]
}
