//! The window state store: RocksDB, one value per detector and key (`rows`), the chunks of
//! rows incremental windows append per key (`chunks`), and a little metadata (the event-time
//! clock, the events behind waiting rows, input progress), all written in one atomic write
//! batch per checkpoint.
//!
//! Values start with the event time after which they are of no use to any window
//! ([`expires_at`]); a compaction filter drops them once the clock has passed it, so keys that
//! are never seen again do not stay on disk.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use rocksdb::compaction_filter::Decision as Keep;
use rocksdb::{
    BlockBasedOptions, ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options, ReadOptions, WriteBatch,
    WriteOptions,
};

/// Column family of per-detector, per-key values.
const ROWS: &str = "rows";
/// Column family of the row chunks incremental windows append per key (values start with
/// their expiry, like `rows`).
const CHUNKS: &str = "chunks";
/// Column family of metadata.
const META: &str = "meta";

/// Errors of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// RocksDB failed.
    #[error("window state at {path}: {source}")]
    Db {
        /// The state directory.
        path: PathBuf,
        /// What RocksDB said.
        source: rocksdb::Error,
    },
    /// A temporary directory for throwaway state could not be made.
    #[error("cannot create a temporary state directory: {0}")]
    Temp(std::io::Error),
    /// Stored metadata did not parse (written by another version?).
    #[error("window state at {path}: unreadable {what}: {reason}")]
    Corrupt {
        /// The state directory.
        path: PathBuf,
        /// Which entry.
        what: String,
        /// Why.
        reason: String,
    },
}

/// The event time (µs) encoded at the start of a stored value, after which it is useless.
pub fn expires_at(value: &[u8]) -> i64 {
    value
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map_or(i64::MIN, i64::from_le_bytes)
}

/// An open state directory.
pub struct StateStore {
    db: DB,
    path: PathBuf,
    /// Values that expire before this event time are dropped by compactions.
    clock: Arc<AtomicI64>,
    /// Kept alive for throwaway stores: dropping it deletes the directory.
    _temp: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for StateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateStore").field("path", &self.path).finish()
    }
}

impl StateStore {
    /// Opens (or creates) the state in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        Self::open_in(dir, None)
    }

    /// A store in a fresh temporary directory, deleted when the store is dropped (replays
    /// that do not persist their state still keep large windows off the heap).
    pub fn temporary() -> Result<Self, StateError> {
        let temp = tempfile::Builder::new()
            .prefix("rampart-state-")
            .tempdir()
            .map_err(StateError::Temp)?;
        let path = temp.path().to_path_buf();
        Self::open_in(&path, Some(temp))
    }

    fn open_in(dir: &Path, temp: Option<tempfile::TempDir>) -> Result<Self, StateError> {
        let clock = Arc::new(AtomicI64::new(i64::MIN));
        let mut db_options = Options::default();
        db_options.create_if_missing(true);
        db_options.create_missing_column_families(true);
        db_options.set_max_background_jobs(2);
        // Small and bounded: the state's own cache holds the hot keys.
        db_options.set_write_buffer_size(16 << 20);
        db_options.set_max_write_buffer_number(2);
        db_options.set_max_total_wal_size(64 << 20);
        db_options.set_keep_log_file_num(2);

        let cache = rocksdb::Cache::new_lru_cache(16 << 20);
        let expiring = |bloom: bool| {
            let mut options = Options::default();
            options.set_compression_type(rocksdb::DBCompressionType::Lz4);
            options.set_write_buffer_size(16 << 20);
            options.set_max_write_buffer_number(2);
            let mut table = BlockBasedOptions::default();
            if bloom {
                table.set_bloom_filter(10.0, false);
            }
            table.set_block_cache(&cache);
            options.set_block_based_table_factory(&table);
            let filter_clock = Arc::clone(&clock);
            options.set_compaction_filter("rampart-expired-windows", move |_level, _key, value: &[u8]| {
                if expires_at(value) < filter_clock.load(Ordering::Relaxed) {
                    Keep::Remove
                } else {
                    Keep::Keep
                }
            });
            options
        };
        let db = DB::open_cf_descriptors(
            &db_options,
            dir,
            [
                ColumnFamilyDescriptor::new(ROWS, expiring(true)),
                // Read by prefix scans: a whole-key bloom filter would not help.
                ColumnFamilyDescriptor::new(CHUNKS, expiring(false)),
                ColumnFamilyDescriptor::new(META, Options::default()),
            ],
        )
        .map_err(|source| StateError::Db {
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(Self {
            db,
            path: dir.to_path_buf(),
            clock,
            _temp: temp,
        })
    }

    /// The state directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Values expiring before `event_time` may be dropped from now on.
    pub fn advance_clock(&self, event_time: i64) {
        self.clock.fetch_max(event_time, Ordering::Relaxed);
    }

    fn error(&self, source: rocksdb::Error) -> StateError {
        StateError::Db {
            path: self.path.clone(),
            source,
        }
    }

    /// The stored value of one detector key, unless it has expired.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        let cf = self.db.cf_handle(ROWS).expect("opened with this column family");
        let value = self.db.get_cf(cf, key).map_err(|e| self.error(e))?;
        Ok(value.filter(|v| expires_at(v) >= self.clock.load(Ordering::Relaxed)))
    }

    /// A metadata entry.
    pub fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StateError> {
        let cf = self.db.cf_handle(META).expect("opened with this column family");
        self.db.get_cf(cf, key).map_err(|e| self.error(e))
    }

    /// The metadata entries whose keys start with `prefix`, in key order.
    pub fn meta_with_prefix(&self, prefix: &str) -> Result<Entries, StateError> {
        self.scan(META, prefix.as_bytes(), false)
    }

    /// The chunks whose keys start with `prefix` and that have not expired, in key order.
    pub fn chunks(&self, prefix: &[u8]) -> Result<Entries, StateError> {
        self.scan(CHUNKS, prefix, true)
    }

    fn scan(&self, cf: &str, prefix: &[u8], expiring: bool) -> Result<Entries, StateError> {
        let cf = self.db.cf_handle(cf).expect("opened with this column family");
        let mut options = ReadOptions::default();
        if let Some(end) = successor(prefix) {
            options.set_iterate_upper_bound(end);
        }
        let now = self.clock.load(Ordering::Relaxed);
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf_opt(cf, options, IteratorMode::From(prefix, Direction::Forward))
        {
            let (key, value) = item.map_err(|e| self.error(e))?;
            if !key.starts_with(prefix) {
                break;
            }
            if !expiring || expires_at(&value) >= now {
                out.push((key.into_vec(), value.into_vec()));
            }
        }
        Ok(out)
    }

    /// Writes `commit` atomically (not synced to disk: a crash may lose the last checkpoints,
    /// never half of one).
    pub fn write(&self, commit: Commit) -> Result<(), StateError> {
        let rows = self.db.cf_handle(ROWS).expect("opened with this column family");
        let chunks = self.db.cf_handle(CHUNKS).expect("opened with this column family");
        let meta = self.db.cf_handle(META).expect("opened with this column family");
        let mut batch = WriteBatch::default();
        for (key, value) in commit.rows {
            match value {
                Some(v) => batch.put_cf(rows, key, v),
                None => batch.delete_cf(rows, key),
            }
        }
        for (key, value) in commit.chunks {
            match value {
                Some(v) => batch.put_cf(chunks, key, v),
                None => batch.delete_cf(chunks, key),
            }
        }
        for (key, value) in commit.meta {
            match value {
                Some(v) => batch.put_cf(meta, key, v),
                None => batch.delete_cf(meta, key),
            }
        }
        let mut options = WriteOptions::default();
        options.set_sync(false);
        self.db.write_opt(batch, &options).map_err(|e| self.error(e))
    }

    /// Bytes the state takes on disk (SST files, memtables not yet flushed, logs).
    pub fn size_on_disk(&self) -> u64 {
        dir_size(&self.path)
    }

    /// Flushes memtables to SST files and compacts, so that [`Self::size_on_disk`] shows the
    /// steady-state size (benchmarks; not needed for correctness).
    pub fn compact(&self) -> Result<(), StateError> {
        for name in [ROWS, CHUNKS, META] {
            let cf = self.db.cf_handle(name).expect("opened with this column family");
            self.db.flush_cf(cf).map_err(|e| self.error(e))?;
            self.db.compact_range_cf(cf, None::<&[u8]>, None::<&[u8]>);
        }
        Ok(())
    }
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_size(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// The smallest key greater than every key starting with `prefix` (`None`: there is none).
fn successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// Stored entries: (key, value) in key order.
pub type Entries = Vec<(Vec<u8>, Vec<u8>)>;

/// What one checkpoint writes: entries to put (`Some`) or delete (`None`).
#[derive(Debug, Default)]
pub struct Commit {
    /// Detector key values.
    pub rows: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// Row chunks of incremental windows.
    pub chunks: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// Metadata entries.
    pub meta: Vec<(String, Option<Vec<u8>>)>,
}

impl Commit {
    /// Bytes of keys and values put.
    pub fn bytes(&self) -> usize {
        let size = |(k, v): &(Vec<u8>, Option<Vec<u8>>)| k.len() + v.as_ref().map_or(0, Vec::len);
        self.rows.iter().map(size).sum::<usize>()
            + self.chunks.iter().map(size).sum::<usize>()
            + self
                .meta
                .iter()
                .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len))
                .sum::<usize>()
    }
}
