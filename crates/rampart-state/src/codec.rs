//! The byte layout of everything the window state writes, in one place.
//!
//! Two column families hold window data, and every value in them starts with the event time
//! after which it is of no use ([`expires_at`], 8 bytes little-endian), which the store's
//! compaction filter reads:
//!
//! - `rows`: one value per (window state, key) for windows re-run over their rows and grouped
//!   windows, laid out as [`HEADER`] (expiry, then a [`flags`] byte) followed by rows, each
//!   [`StoredRow`]: time (i64 LE), row id (u64 LE), length (u32 LE), Arrow row bytes; sorted by
//!   (time, row id). The store key is the window state's tag followed by the key.
//! - `chunks`: incremental windows append chunks per key; a chunk's store key is
//!   [`chunk_prefix`] (tag, chunk kind, key length u32 BE, key) followed by the chunk's id
//!   (u64 BE, [`CHUNK_ID_LEN`] bytes), so one prefix seek reads a key's chunks of one kind in id
//!   order and no key's chunks share a prefix with another key's. The chunks' own contents are
//!   the incremental window's business (`rampart-engine`'s `windows::frame`).
//!
//! The `meta` column family holds JSON documents under text keys (the clock, progress, the
//! guard, waiting rows); [`crate::StateStore::meta_json`] reads them.

/// The length of a `rows` value's header: the expiry (8 bytes), then the flags (1 byte).
pub const HEADER: usize = 9;
/// The length of a stored row's header: time, row id, length.
pub const ROW_HEADER: usize = 20;

/// Flag of a `rows` value: the group already fired (grouped windows).
pub const FIRED: u8 = 1;
/// Flag of a cached value: the key is an incremental one (its rows are in `chunks`).
pub const INCREMENTAL: u8 = 2;

/// Chunk kind: rows of a key's frames.
pub const FRAME_CHUNK: u8 = b'F';
/// Chunk kind: rows waiting for their decision.
pub const PENDING_CHUNK: u8 = b'P';
/// Chunk kind: rows that fired at once, with the detector that fired.
pub const FIRED_CHUNK: u8 = b'E';

/// Chunk keys end with their id, this long: the rest is the prefix all chunks of one key (and
/// kind) share, which the `chunks` column family's bloom filters are built on.
pub const CHUNK_ID_LEN: usize = 8;

/// The event time (µs) encoded at the start of a stored value, after which it is useless
/// (`i64::MIN` for a value too short to have one).
pub fn expires_at(value: &[u8]) -> i64 {
    value
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map_or(i64::MIN, i64::from_le_bytes)
}

/// The flags byte of a `rows` value (0 for an empty value).
pub fn flags(value: &[u8]) -> u8 {
    value.get(8).copied().unwrap_or(0)
}

/// Writes a `rows` value's header, making room for it in an empty value.
pub fn set_header(value: &mut Vec<u8>, expires: i64, flags: u8) {
    if value.len() < HEADER {
        value.resize(HEADER, 0);
    }
    value[..8].copy_from_slice(&expires.to_le_bytes());
    value[8] = flags;
}

/// One row of a `rows` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredRow<'a> {
    /// Event time (µs).
    pub time: i64,
    /// The pipeline's row id of the event.
    pub row: u64,
    /// The row in Arrow's row format.
    pub bytes: &'a [u8],
}

/// The rows of a `rows` value, in stored order; a truncated tail ends the iteration.
pub fn rows_of(value: &[u8]) -> impl Iterator<Item = StoredRow<'_>> {
    let mut rest = value.get(HEADER..).unwrap_or_default();
    std::iter::from_fn(move || {
        if rest.len() < ROW_HEADER {
            return None;
        }
        let time = i64::from_le_bytes(rest[..8].try_into().ok()?);
        let row = u64::from_le_bytes(rest[8..16].try_into().ok()?);
        let len = u32::from_le_bytes(rest[16..20].try_into().ok()?) as usize;
        let bytes = rest.get(ROW_HEADER..ROW_HEADER + len)?;
        rest = &rest[ROW_HEADER + len..];
        Some(StoredRow { time, row, bytes })
    })
}

/// Appends a row to a `rows` value (the caller keeps the order).
pub fn push_row(value: &mut Vec<u8>, r: StoredRow<'_>) {
    value.extend_from_slice(&r.time.to_le_bytes());
    value.extend_from_slice(&r.row.to_le_bytes());
    value.extend_from_slice(&(r.bytes.len() as u32).to_le_bytes());
    value.extend_from_slice(r.bytes);
}

/// The store key of a `rows` value: the window state's tag, then the key.
pub fn row_key(tag: &[u8], key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(tag.len() + key.len());
    k.extend_from_slice(tag);
    k.extend_from_slice(key);
    k
}

/// The store key of a chunk of `key` without its id: the window state's tag, the chunk kind,
/// then the key with its length.
pub fn chunk_prefix(tag: &[u8], kind: u8, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(tag.len() + key.len() + 5 + CHUNK_ID_LEN);
    k.extend_from_slice(tag);
    k.push(kind);
    k.extend_from_slice(&(key.len() as u32).to_be_bytes());
    k.extend_from_slice(key);
    k
}

/// The full store key of a chunk: its prefix, then its id.
pub fn chunk_key(tag: &[u8], kind: u8, key: &[u8], id: u64) -> Vec<u8> {
    let mut k = chunk_prefix(tag, kind, key);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// The key and id of a chunk key of window state `tag` and chunk `kind` (`None` for a key of
/// another state or kind, or a malformed one).
pub fn split_chunk_key<'k>(tag: &[u8], kind: u8, chunk_key: &'k [u8]) -> Option<(&'k [u8], u64)> {
    let rest = chunk_key.strip_prefix(tag)?.strip_prefix(&[kind])?;
    let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    let key = rest.get(4..4 + len)?;
    let id = u64::from_be_bytes(rest.get(4 + len..)?.try_into().ok()?);
    Some((key, id))
}

/// The part of a chunk key before its id (the `chunks` column family's prefix extractor).
pub(crate) fn chunk_key_prefix(key: &[u8]) -> &[u8] {
    &key[..key.len() - CHUNK_ID_LEN]
}

/// Whether a key is long enough to be a chunk key.
pub(crate) fn is_chunk_key(key: &[u8]) -> bool {
    key.len() > CHUNK_ID_LEN
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_values_round_trip_in_order_and_stop_at_a_truncated_row() {
        let mut value = Vec::new();
        set_header(&mut value, 1_000, FIRED);
        let rows = [
            StoredRow {
                time: -5,
                row: 1,
                bytes: b"a",
            },
            StoredRow {
                time: 7,
                row: u64::MAX,
                bytes: b"",
            },
            StoredRow {
                time: 7,
                row: 3,
                bytes: b"longer row",
            },
        ];
        for r in rows {
            push_row(&mut value, r);
        }
        assert_eq!(expires_at(&value), 1_000);
        assert_eq!(flags(&value), FIRED);
        assert_eq!(rows_of(&value).collect::<Vec<_>>(), rows);

        value.truncate(value.len() - 1);
        assert_eq!(rows_of(&value).count(), 2, "a truncated row is not read");
        set_header(&mut value, -1, INCREMENTAL);
        assert_eq!((expires_at(&value), flags(&value)), (-1, INCREMENTAL));
    }

    #[test]
    fn empty_and_short_values_have_no_expiry_flags_or_rows() {
        assert_eq!(expires_at(b""), i64::MIN);
        assert_eq!(expires_at(b"1234567"), i64::MIN);
        assert_eq!(flags(b""), 0);
        assert_eq!(rows_of(b"").count(), 0);
        let mut value = Vec::new();
        set_header(&mut value, 0, 0);
        assert_eq!(value.len(), HEADER);
    }

    #[test]
    fn chunk_keys_split_back_into_key_and_id_for_their_own_state_and_kind_only() {
        let tag = b"det-1\0";
        let k = chunk_key(tag, FRAME_CHUNK, b"alice", 42);
        assert_eq!(
            k.len(),
            chunk_prefix(tag, FRAME_CHUNK, b"alice").len() + CHUNK_ID_LEN
        );
        assert_eq!(split_chunk_key(tag, FRAME_CHUNK, &k), Some((&b"alice"[..], 42)));
        assert_eq!(split_chunk_key(tag, PENDING_CHUNK, &k), None);
        assert_eq!(split_chunk_key(b"det-2\0", FRAME_CHUNK, &k), None);
        assert_eq!(split_chunk_key(tag, FRAME_CHUNK, &k[..k.len() - 1]), None);
        assert_eq!(chunk_key_prefix(&k), chunk_prefix(tag, FRAME_CHUNK, b"alice"));
    }

    #[test]
    fn no_key_s_chunk_prefix_is_a_prefix_of_another_key_s() {
        let tag = b"t\0";
        let short = chunk_prefix(tag, FRAME_CHUNK, b"al");
        let long = chunk_key(tag, FRAME_CHUNK, b"alice", 0);
        assert!(!long.starts_with(&short));
    }

    #[test]
    fn chunk_ids_sort_in_numeric_order() {
        let tag = b"t\0";
        let ids = [0u64, 1, 255, 256, 1 << 40];
        let keys: Vec<_> = ids
            .iter()
            .map(|id| chunk_key(tag, PENDING_CHUNK, b"k", *id))
            .collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
    }

    #[test]
    fn row_keys_are_the_tag_then_the_key() {
        assert_eq!(row_key(b"d\0", b"bob"), b"d\0bob");
    }
}
