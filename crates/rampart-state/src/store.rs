//! The window state store: RocksDB, one value per detector and key (`rows`), the chunks of
//! rows incremental windows append per key (`chunks`), and a little metadata (the event-time
//! clock, the events behind waiting rows, input progress), all written in one atomic write
//! batch per checkpoint.
//!
//! Values start with the event time after which they are of no use to any window
//! ([`crate::codec::expires_at`]); a compaction filter drops them once the clock has passed it, so keys that
//! are never seen again do not stay on disk.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use rocksdb::compaction_filter::Decision as Keep;
use rocksdb::{
    BlockBasedOptions, ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options, ReadOptions,
    SliceTransform, WriteBatch, WriteBatchIteratorCf, WriteOptions,
};
use serde::de::DeserializeOwned;

use crate::changelog::{
    CHUNKS_TAG, ChangelogWriter, LOGGED_META, Logged, META_TAG, Marker, ROWS_TAG, Restore,
};
use crate::codec::{CHUNK_ID_LEN, chunk_key_prefix, expires_at, is_chunk_key};

/// Column family of per-detector, per-key values.
const ROWS: &str = "rows";
/// Column family of the row chunks incremental windows append per key (values start with
/// their expiry, like `rows`).
const CHUNKS: &str = "chunks";
/// Column family of metadata.
const META: &str = "meta";
/// Options with small memtables, for every column family: two of 8 MiB at most (one filling,
/// one flushing). They are resident memory beside the state's own cache, which holds the hot
/// keys; a checkpoint's write lands in them, and `meta`'s values, rewritten at every
/// checkpoint, would pile up stale copies in a default (64 MiB) one.
fn small_memtables() -> Options {
    let mut options = Options::default();
    options.set_write_buffer_size(8 << 20);
    options.set_max_write_buffer_number(2);
    options
}
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
    /// The changelog could not take a checkpoint.
    #[error("window state changelog: {0}")]
    Changelog(String),
    /// A stored value did not decode (written by another version?).
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

/// An open state directory.
pub struct StateStore {
    db: Arc<DB>,
    /// A checkpoint being written on a thread of its own ([`Self::write_behind`]).
    behind: Mutex<Option<std::thread::JoinHandle<Result<(), StateError>>>>,
    /// Whether that write is not in the store yet (cleared by its thread once it is; asked
    /// without the lock, which a thread waiting for the write holds).
    unwritten: Arc<AtomicBool>,
    path: PathBuf,
    /// Values that expire before this event time are dropped by compactions.
    clock: Arc<AtomicI64>,
    /// Column family ids (rows, chunks, meta), as a write batch names them.
    ids: [u32; 3],
    /// Whether compactions tell the keys they drop (for the changelog's tombstones).
    log_expired: Arc<AtomicBool>,
    /// Tagged keys compactions dropped as expired, not yet told.
    expired: Arc<Mutex<Vec<Vec<u8>>>>,
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
        let log_expired = Arc::new(AtomicBool::new(false));
        let expired: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let mut db_options = small_memtables();
        db_options.create_if_missing(true);
        db_options.create_missing_column_families(true);
        db_options.set_max_background_jobs(2);
        db_options.set_max_total_wal_size(64 << 20);
        db_options.set_keep_log_file_num(2);

        let cache = rocksdb::Cache::new_lru_cache(16 << 20);
        let expiring = |by_prefix: bool, tag: u8| {
            let mut options = small_memtables();
            options.set_compression_type(rocksdb::DBCompressionType::Lz4);
            let mut table = BlockBasedOptions::default();
            table.set_bloom_filter(10.0, false);
            if by_prefix {
                // A key's chunks are read by one prefix seek, and most seeks (keys never seen
                // before) find nothing: bloom filters on the prefix, in the SST files and the
                // memtables, answer those without reading a data block.
                options.set_prefix_extractor(SliceTransform::create(
                    "rampart-chunk-key",
                    chunk_key_prefix,
                    Some(is_chunk_key),
                ));
                options.set_memtable_prefix_bloom_ratio(0.1);
                table.set_whole_key_filtering(false);
            }
            table.set_block_cache(&cache);
            options.set_block_based_table_factory(&table);
            let filter_clock = Arc::clone(&clock);
            let (telling, told) = (Arc::clone(&log_expired), Arc::clone(&expired));
            options.set_compaction_filter(
                "rampart-expired-windows",
                move |_level, key: &[u8], value: &[u8]| {
                    if expires_at(value) < filter_clock.load(Ordering::Relaxed) {
                        if telling.load(Ordering::Relaxed) {
                            let tagged = [&[tag][..], key].concat();
                            told.lock().unwrap_or_else(|p| p.into_inner()).push(tagged);
                        }
                        Keep::Remove
                    } else {
                        Keep::Keep
                    }
                },
            );
            options
        };
        let db = DB::open_cf_descriptors(
            &db_options,
            dir,
            [
                ColumnFamilyDescriptor::new(ROWS, expiring(false, ROWS_TAG)),
                ColumnFamilyDescriptor::new(CHUNKS, expiring(true, CHUNKS_TAG)),
                ColumnFamilyDescriptor::new(META, small_memtables()),
            ],
        )
        .map_err(|source| StateError::Db {
            path: dir.to_path_buf(),
            source,
        })?;
        let ids = column_family_ids(&db);
        Ok(Self {
            db: Arc::new(db),
            behind: Mutex::new(None),
            unwritten: Arc::new(AtomicBool::new(false)),
            path: dir.to_path_buf(),
            clock,
            ids,
            log_expired,
            expired,
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

    /// A metadata entry read with `parse` (a JSON document, usually), `None` when absent; a
    /// value `parse` refuses is [`StateError::Corrupt`], naming the entry.
    pub fn meta_with<T, E: std::fmt::Display>(
        &self,
        key: &str,
        parse: impl FnOnce(&[u8]) -> Result<T, E>,
    ) -> Result<Option<T>, StateError> {
        match self.meta(key)? {
            Some(bytes) => parse(&bytes).map(Some).map_err(|e| self.corrupt(key, e)),
            None => Ok(None),
        }
    }

    /// A metadata entry holding a JSON document, `None` when absent.
    pub fn meta_json<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StateError> {
        self.meta_with(key, |bytes| serde_json::from_slice::<T>(bytes))
    }

    /// The error for a stored value that does not decode: `what` names it.
    pub fn corrupt(&self, what: impl std::fmt::Display, reason: impl std::fmt::Display) -> StateError {
        StateError::Corrupt {
            path: self.path.clone(),
            what: what.to_string(),
            reason: reason.to_string(),
        }
    }

    /// A metadata entry.
    pub fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StateError> {
        self.settle()?;
        let cf = self.db.cf_handle(META).expect("opened with this column family");
        self.db.get_cf(cf, key).map_err(|e| self.error(e))
    }

    /// The metadata entries whose keys start with `prefix`, in key order.
    pub fn meta_with_prefix(&self, prefix: &str) -> Result<Entries, StateError> {
        self.settle()?;
        let prefix = prefix.as_bytes();
        self.scan(META, prefix, prefix, ReadOptions::default(), false)
    }

    /// The chunks of one key: those whose keys are `prefix` and an id ([`CHUNK_ID_LEN`] bytes),
    /// that have not expired, in id order. Uses the prefix bloom filters.
    pub fn key_chunks(&self, prefix: &[u8]) -> Result<Entries, StateError> {
        let mut options = ReadOptions::default();
        options.set_prefix_same_as_start(true);
        let mut start = Vec::with_capacity(prefix.len() + CHUNK_ID_LEN);
        start.extend_from_slice(prefix);
        start.extend_from_slice(&[0; CHUNK_ID_LEN]);
        self.scan(CHUNKS, &start, prefix, options, true)
    }

    /// The chunks of every key whose chunk keys start with `prefix` and that have not
    /// expired, in key order (a scan across keys: no bloom filter helps).
    pub fn chunks(&self, prefix: &[u8]) -> Result<Entries, StateError> {
        let mut options = ReadOptions::default();
        options.set_total_order_seek(true);
        self.scan(CHUNKS, prefix, prefix, options, true)
    }

    /// Whether a chunk whose key starts with `prefix` has not expired (stops at the first).
    pub fn holds_chunks(&self, prefix: &[u8]) -> Result<bool, StateError> {
        self.settle()?;
        let mut options = ReadOptions::default();
        options.set_total_order_seek(true);
        let mut found = false;
        self.visit(CHUNKS, prefix, prefix, options, true, |_, _| {
            found = true;
            false
        })?;
        Ok(found)
    }

    fn scan(
        &self,
        cf: &str,
        start: &[u8],
        prefix: &[u8],
        options: ReadOptions,
        expiring: bool,
    ) -> Result<Entries, StateError> {
        let mut out = Vec::new();
        self.visit(cf, start, prefix, options, expiring, |key, value| {
            out.push((key.into_vec(), value.into_vec()));
            true
        })?;
        Ok(out)
    }

    /// Calls `f` with the entries of `cf` from `start` on whose keys start with `prefix` (with
    /// `expiring`, only those that have not expired), in key order, while it returns true.
    fn visit(
        &self,
        cf: &str,
        start: &[u8],
        prefix: &[u8],
        mut options: ReadOptions,
        expiring: bool,
        mut f: impl FnMut(Box<[u8]>, Box<[u8]>) -> bool,
    ) -> Result<(), StateError> {
        let cf = self.db.cf_handle(cf).expect("opened with this column family");
        if let Some(end) = successor(prefix) {
            options.set_iterate_upper_bound(end);
        }
        let now = self.clock.load(Ordering::Relaxed);
        for item in self
            .db
            .iterator_cf_opt(cf, options, IteratorMode::From(start, Direction::Forward))
        {
            let (key, value) = item.map_err(|e| self.error(e))?;
            if !key.starts_with(prefix) {
                break;
            }
            if (!expiring || expires_at(&value) >= now) && !f(key, value) {
                break;
            }
        }
        Ok(())
    }

    /// An empty checkpoint to fill and then [`Self::write`], its buffer sized for `bytes`
    /// (RocksDB's write batch is one string that otherwise doubles as it grows: a 17 MB
    /// checkpoint would hold 32 MB, and both while it is copied).
    pub fn commit(&self, bytes: usize) -> Commit<'_> {
        let cf = |name| self.db.cf_handle(name).expect("opened with this column family");
        Commit {
            rows: cf(ROWS),
            chunks: cf(CHUNKS),
            meta: cf(META),
            ids: self.ids,
            batch: WriteBatch::with_capacity_bytes(bytes),
        }
    }

    /// Writes `commit` to `log` first (the keys compactions dropped as expired since the last
    /// time as deletes, then the commit's entries, then a marker with `expired_before`, the
    /// bound below which window values are of no use), and once the log holds it, to the
    /// store, with where the store now stands in the log. Returns that.
    pub fn write_logged(
        &self,
        mut commit: Commit<'_>,
        log: &mut dyn ChangelogWriter,
        expired_before: i64,
    ) -> Result<Logged, StateError> {
        let (expired, checkpoint) = self.next_logged()?;
        let logged = log_entries(
            log,
            &expired,
            &commit.batch,
            commit.ids,
            checkpoint,
            expired_before,
        )?;
        commit.meta(
            LOGGED_META,
            Some(&serde_json::to_vec(&logged).expect("serialises")),
        );
        self.write(commit)?;
        Ok(logged)
    }

    /// What a checkpoint written to the changelog takes from the store before it writes: the
    /// keys compactions dropped as expired since the last one, and its number.
    fn next_logged(&self) -> Result<(Vec<Vec<u8>>, u64), StateError> {
        self.log_expired(true);
        let expired = self.take_expired()?;
        let before: Option<Logged> = self.meta_json(LOGGED_META)?;
        Ok((expired, before.map_or(0, |l| l.checkpoint) + 1))
    }

    /// Rebuilds this store from a changelog read in order (see [`Restore`]).
    pub fn restore(&self) -> Restore<'_> {
        Restore::new(self)
    }

    /// From now on (`on`), compactions tell the keys they drop as expired
    /// ([`Self::take_expired`]), so that the changelog deletes them too.
    pub fn log_expired(&self, on: bool) {
        self.log_expired.store(on, Ordering::Relaxed);
    }

    /// The tagged keys compactions dropped as expired since the last call, that the store does
    /// not hold any more (a newer value put since is kept), each once.
    pub fn take_expired(&self) -> Result<Vec<Vec<u8>>, StateError> {
        let mut keys = std::mem::take(&mut *self.expired.lock().unwrap_or_else(|p| p.into_inner()));
        keys.sort_unstable();
        keys.dedup();
        let mut gone = Vec::with_capacity(keys.len());
        for key in keys {
            if self.get_tagged(&key)?.is_none() {
                gone.push(key);
            }
        }
        Ok(gone)
    }

    /// The value of a tagged key ([`crate::changelog`]), expired or not.
    pub fn get_tagged(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        let Some((cf, key)) = split_tag(key) else {
            return Err(self.corrupt("changelog key", "unknown tag"));
        };
        self.settle()?;
        let cf = self.db.cf_handle(cf).expect("opened with this column family");
        self.db.get_cf(cf, key).map_err(|e| self.error(e))
    }

    /// Every entry the store holds, as tagged keys and values, except window values expired
    /// for the store's clock and the store's own place in its changelog.
    pub fn for_each_entry(
        &self,
        mut f: impl FnMut(&[u8], &[u8]) -> Result<(), String>,
    ) -> Result<(), StateError> {
        self.settle()?;
        let now = self.clock.load(Ordering::Relaxed);
        for (name, tag) in [(ROWS, ROWS_TAG), (CHUNKS, CHUNKS_TAG), (META, META_TAG)] {
            let cf = self.db.cf_handle(name).expect("opened with this column family");
            let mut options = ReadOptions::default();
            options.set_total_order_seek(true);
            let mut tagged = Vec::new();
            for item in self.db.iterator_cf_opt(cf, options, IteratorMode::Start) {
                let (key, value) = item.map_err(|e| self.error(e))?;
                if (tag != META_TAG && expires_at(&value) < now)
                    || (tag == META_TAG && *key == *LOGGED_META.as_bytes())
                {
                    continue;
                }
                tagged.clear();
                tagged.push(tag);
                tagged.extend_from_slice(&key);
                f(&tagged, &value).map_err(StateError::Changelog)?;
            }
        }
        Ok(())
    }

    /// Writes `commit` atomically (not synced to disk: a crash may lose the last checkpoints,
    /// never half of one).
    pub fn write(&self, commit: Commit<'_>) -> Result<(), StateError> {
        self.settle()?;
        write_unsynced(&self.db, commit.batch).map_err(|e| self.error(e))
    }

    /// [`Self::write`] on a thread of its own, after the one before it is written; the clock
    /// then advances to `expired_before` ([`Self::advance_clock`]). Reads of keys it holds see
    /// either the store before or after it, so the caller reads back only keys it did not
    /// change or delete in `commit` until [`Self::settle`] says it is written (a window's
    /// cache: it keeps the keys it changed, and waits before evicting them or reading back a
    /// key it deleted). Whatever the store is asked next (metadata, another write, a
    /// compaction) waits for it, and so does dropping the store.
    pub fn write_behind(&self, commit: Commit<'_>, expired_before: i64) -> Result<(), StateError> {
        self.settle()?;
        let batch = commit.batch;
        self.spawn_behind(expired_before, move |_| Ok(batch));
        Ok(())
    }

    /// [`Self::write_logged`] on a thread of its own, as [`Self::write_behind`] writes: the
    /// entries go to `log` first, then, once it holds them, the commit to the store. What the
    /// marker needs from the store (the keys compactions dropped, the checkpoint number) is
    /// taken before this returns.
    pub fn write_logged_behind(
        &self,
        commit: Commit<'_>,
        log: Arc<Mutex<dyn ChangelogWriter + Send>>,
        expired_before: i64,
    ) -> Result<(), StateError> {
        self.settle()?;
        let (expired, checkpoint) = self.next_logged()?;
        let (ids, mut batch) = (self.ids, commit.batch);
        self.spawn_behind(expired_before, move |db| {
            let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
            let logged = log_entries(&mut *log, &expired, &batch, ids, checkpoint, expired_before)?;
            drop(log);
            let meta = db.cf_handle(META).expect("opened with this column family");
            batch.put_cf(
                meta,
                LOGGED_META,
                serde_json::to_vec(&logged).expect("serialises"),
            );
            Ok(batch)
        });
        Ok(())
    }

    /// Starts a write behind: on a thread of its own, `prepare` gives the batch, which is
    /// written to the store, and the expiry bound moves to `expired_before`.
    fn spawn_behind(
        &self,
        expired_before: i64,
        prepare: impl FnOnce(&DB) -> Result<WriteBatch, StateError> + Send + 'static,
    ) {
        let (db, clock, path) = (Arc::clone(&self.db), Arc::clone(&self.clock), self.path.clone());
        let unwritten = Arc::clone(&self.unwritten);
        unwritten.store(true, Ordering::Release);
        let writing = std::thread::Builder::new()
            .name("rampart-state-write".into())
            .spawn(move || {
                let written = prepare(&db).and_then(|batch| {
                    write_unsynced(&db, batch).map_err(|source| StateError::Db { path, source })?;
                    clock.fetch_max(expired_before, Ordering::Relaxed);
                    Ok(())
                });
                unwritten.store(false, Ordering::Release);
                written
            })
            .expect("the OS can start a thread");
        *self.behind.lock().unwrap_or_else(|p| p.into_inner()) = Some(writing);
    }

    /// Whether a write started by [`Self::write_behind`] is still running (also while
    /// another thread waits for it in [`Self::settle`]: it is not in the store before it ends).
    pub fn writing(&self) -> bool {
        self.unwritten.load(Ordering::Acquire)
    }

    /// Waits until the write started by [`Self::write_behind`], if any, is done, and returns
    /// its error. (Waited for under the lock: another thread settling meanwhile waits too,
    /// rather than finding no write to wait for and reading the store before it is in.)
    pub fn settle(&self) -> Result<(), StateError> {
        let mut behind = self.behind.lock().unwrap_or_else(|p| p.into_inner());
        match behind
            .take()
            .map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
        {
            Some(Err(e)) => Err(e),
            _ => Ok(()),
        }
    }

    /// Bytes the state takes on disk (SST files, memtables not yet flushed, logs).
    pub fn size_on_disk(&self) -> u64 {
        dir_size(&self.path)
    }

    /// Bytes of memory RocksDB holds for the store (memtables, including those waiting to
    /// be flushed, the SST files' open readers (indexes and filters), the block cache): the
    /// resident memory the state takes beside its windows' own cache.
    pub fn memory_bytes(&self) -> u64 {
        let families: u64 = [ROWS, CHUNKS, META]
            .into_iter()
            .filter_map(|name| self.db.cf_handle(name))
            .flat_map(|cf| {
                [
                    "rocksdb.size-all-mem-tables",
                    "rocksdb.estimate-table-readers-mem",
                ]
                .map(|property| self.db.property_int_value_cf(cf, property))
            })
            .map(|value| value.ok().flatten().unwrap_or(0))
            .sum();
        let cache = self.db.property_int_value("rocksdb.block-cache-usage");
        families + cache.ok().flatten().unwrap_or(0)
    }

    /// Flushes memtables to SST files and compacts, so that [`Self::size_on_disk`] shows the
    /// steady-state size (benchmarks; not needed for correctness).
    pub fn compact(&self) -> Result<(), StateError> {
        self.settle()?;
        for name in [ROWS, CHUNKS, META] {
            let cf = self.db.cf_handle(name).expect("opened with this column family");
            self.db.flush_cf(cf).map_err(|e| self.error(e))?;
            self.db.compact_range_cf(cf, None::<&[u8]>, None::<&[u8]>);
        }
        Ok(())
    }
}

impl Drop for StateStore {
    fn drop(&mut self) {
        // A throwaway store's directory goes with it: the write behind must be done first.
        if let Err(e) = self.settle() {
            tracing::warn!(error = %e, "the last window state checkpoint was not written");
        }
    }
}

/// Writes `batch` atomically, not synced to disk (a crash may lose the last checkpoints, never
/// half of one).
fn write_unsynced(db: &DB, batch: WriteBatch) -> Result<(), rocksdb::Error> {
    let mut options = WriteOptions::default();
    options.set_sync(false);
    db.write_opt(batch, &options)
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

/// The column family of a tagged key, and the key.
fn split_tag(key: &[u8]) -> Option<(&'static str, &[u8])> {
    let (tag, rest) = key.split_first()?;
    let cf = match *tag {
        ROWS_TAG => ROWS,
        CHUNKS_TAG => CHUNKS,
        META_TAG => META,
        _ => return None,
    };
    Some((cf, rest))
}

/// The ids RocksDB gave the column families (rows, chunks, meta): a write batch names them
/// by id. Learnt from a batch never written.
fn column_family_ids(db: &DB) -> [u32; 3] {
    struct Ids(Vec<u32>);
    impl WriteBatchIteratorCf for Ids {
        fn put_cf(&mut self, cf_id: u32, _: &[u8], _: &[u8]) {
            self.0.push(cf_id);
        }
        fn delete_cf(&mut self, _: u32, _: &[u8]) {}
        fn merge_cf(&mut self, _: u32, _: &[u8], _: &[u8]) {}
    }
    let mut probe = WriteBatch::default();
    for name in [ROWS, CHUNKS, META] {
        let cf = db.cf_handle(name).expect("opened with this column family");
        probe.put_cf(cf, b"", b"");
    }
    let mut ids = Ids(Vec::new());
    probe.iterate_cf(&mut ids);
    [ids.0[0], ids.0[1], ids.0[2]]
}

/// Stored entries: (key, value) in key order.
pub type Entries = Vec<(Vec<u8>, Vec<u8>)>;

/// What one checkpoint writes: entries to put (`Some`) or delete (`None`), added straight to
/// RocksDB's write batch (one buffer, not an allocation per entry: a checkpoint of a large
/// cache holds millions of entries).
pub struct Commit<'a> {
    rows: &'a rocksdb::ColumnFamily,
    chunks: &'a rocksdb::ColumnFamily,
    meta: &'a rocksdb::ColumnFamily,
    /// Column family ids (rows, chunks, meta).
    ids: [u32; 3],
    batch: WriteBatch,
}

impl Commit<'_> {
    fn add(batch: &mut WriteBatch, cf: &rocksdb::ColumnFamily, key: &[u8], value: Option<&[u8]>) {
        match value {
            Some(v) => batch.put_cf(cf, key, v),
            None => batch.delete_cf(cf, key),
        }
    }

    /// Puts or deletes a detector key value.
    pub fn row(&mut self, key: &[u8], value: Option<&[u8]>) {
        Self::add(&mut self.batch, self.rows, key, value);
    }

    /// Puts or deletes a row chunk of an incremental window.
    pub fn chunk(&mut self, key: &[u8], value: Option<&[u8]>) {
        Self::add(&mut self.batch, self.chunks, key, value);
    }

    /// Puts or deletes a metadata entry.
    pub fn meta(&mut self, key: &str, value: Option<&[u8]>) {
        Self::add(&mut self.batch, self.meta, key.as_bytes(), value);
    }

    /// Puts or deletes the entry of a changelog's tagged key (`tag` and the key apart).
    pub(crate) fn tagged(&mut self, tag: u8, key: &[u8], value: Option<&[u8]>) {
        let cf = match tag {
            ROWS_TAG => self.rows,
            CHUNKS_TAG => self.chunks,
            _ => self.meta,
        };
        Self::add(&mut self.batch, cf, key, value);
    }

    /// Calls `f` with each entry, in the order added, as a changelog's tagged key and value
    /// (`None`: deleted).
    pub fn for_each_entry(&self, f: impl FnMut(&[u8], Option<&[u8]>)) {
        tagged_entries(&self.batch, self.ids, f);
    }

    /// Entries put or deleted.
    pub fn len(&self) -> usize {
        self.batch.len()
    }

    /// Whether nothing was added.
    pub fn is_empty(&self) -> bool {
        self.batch.is_empty()
    }

    /// Bytes of the write batch (keys, values and their framing).
    pub fn bytes(&self) -> usize {
        self.batch.size_in_bytes()
    }
}

/// Writes a checkpoint to a changelog: the keys compactions dropped as expired (`expired`) as
/// deletes, then `batch`'s entries, then the marker of checkpoint number `checkpoint`; returns
/// where the log stands after it.
fn log_entries(
    log: &mut dyn ChangelogWriter,
    expired: &[Vec<u8>],
    batch: &WriteBatch,
    ids: [u32; 3],
    checkpoint: u64,
    expired_before: i64,
) -> Result<Logged, StateError> {
    for key in expired {
        log.entry(key, None).map_err(StateError::Changelog)?;
    }
    let mut failed = None;
    tagged_entries(batch, ids, |key, value| {
        if failed.is_none()
            && let Err(e) = log.entry(key, value)
        {
            failed = Some(e);
        }
    });
    if let Some(e) = failed {
        return Err(StateError::Changelog(e));
    }
    let marker = Marker {
        checkpoint,
        entries: expired.len() as u64 + batch.len() as u64,
        expired_before,
    };
    log.commit(&marker).map_err(StateError::Changelog)
}

/// Calls `f` with each entry of `batch`, in the order added, as a changelog's tagged key and
/// value (`None`: deleted); `ids` are the column families' (rows, chunks, meta).
fn tagged_entries(batch: &WriteBatch, ids: [u32; 3], f: impl FnMut(&[u8], Option<&[u8]>)) {
    struct Tagging<F> {
        ids: [u32; 3],
        key: Vec<u8>,
        f: F,
    }
    impl<F: FnMut(&[u8], Option<&[u8]>)> Tagging<F> {
        fn call(&mut self, cf_id: u32, key: &[u8], value: Option<&[u8]>) {
            let tag = match self.ids.iter().position(|&id| id == cf_id) {
                Some(0) => ROWS_TAG,
                Some(1) => CHUNKS_TAG,
                _ => META_TAG,
            };
            self.key.clear();
            self.key.push(tag);
            self.key.extend_from_slice(key);
            (self.f)(&self.key, value);
        }
    }
    impl<F: FnMut(&[u8], Option<&[u8]>)> WriteBatchIteratorCf for Tagging<F> {
        fn put_cf(&mut self, cf_id: u32, key: &[u8], value: &[u8]) {
            self.call(cf_id, key, Some(value));
        }
        fn delete_cf(&mut self, cf_id: u32, key: &[u8]) {
            self.call(cf_id, key, None);
        }
        fn merge_cf(&mut self, cf_id: u32, key: &[u8], value: &[u8]) {
            self.call(cf_id, key, Some(value));
        }
    }
    batch.iterate_cf(&mut Tagging {
        ids,
        key: Vec::new(),
        f,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{FRAME_CHUNK, PENDING_CHUNK, chunk_key, chunk_prefix, row_key, set_header};

    fn value(expires: i64, body: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        set_header(&mut v, expires, 0);
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn a_write_behind_is_waited_for_by_whatever_reads_the_store_next() {
        let store = StateStore::temporary().expect("store");
        let mut commit = store.commit(0);
        commit.meta("m", Some(b"1"));
        store.write(commit).expect("written");
        let mut commit = store.commit(0);
        commit.meta("m", Some(b"2"));
        store.write_behind(commit, 7).expect("started");
        assert_eq!(store.meta("m").expect("read").as_deref(), Some(&b"2"[..]));
        assert!(!store.writing(), "reading metadata waited for the write");
        assert_eq!(store.clock.load(Ordering::Relaxed), 7, "and it moved the clock");
        let mut commit = store.commit(0);
        commit.meta("m", None);
        store.write_behind(commit, 8).expect("started");
        store.settle().expect("written");
        assert_eq!(store.meta("m").expect("read"), None);
        store.settle().expect("nothing to wait for");
    }

    #[test]
    fn the_store_counts_the_memory_a_write_takes_in_its_memtables() {
        let store = StateStore::temporary().expect("store");
        let before = store.memory_bytes();
        let mut commit = store.commit(0);
        commit.meta("m", Some(&[7; 1 << 20]));
        store.write(commit).expect("written");
        let after = store.memory_bytes();
        assert!(after >= before + (1 << 20), "{before} -> {after}");
    }

    #[test]
    fn a_checkpoint_is_written_at_once_and_read_back_after_reopening() {
        let dir = tempfile::tempdir().expect("tmp");
        {
            let store = StateStore::open(dir.path()).expect("opens");
            let mut commit = store.commit(0);
            commit.row(&row_key(b"d\0", b"alice"), Some(&value(100, b"rows")));
            commit.chunk(
                &chunk_key(b"d\0", FRAME_CHUNK, b"alice", 2),
                Some(&value(100, b"two")),
            );
            commit.chunk(
                &chunk_key(b"d\0", FRAME_CHUNK, b"alice", 1),
                Some(&value(100, b"one")),
            );
            commit.chunk(
                &chunk_key(b"d\0", FRAME_CHUNK, b"alicia", 1),
                Some(&value(100, b"other")),
            );
            commit.meta("progress", Some(br#"{"a":1}"#));
            assert_eq!(commit.len(), 5);
            assert!(
                store.get(&row_key(b"d\0", b"alice")).expect("reads").is_none(),
                "not yet written"
            );
            store.write(commit).expect("writes");
        }
        let store = StateStore::open(dir.path()).expect("reopens");
        assert_eq!(
            store.get(&row_key(b"d\0", b"alice")).expect("reads"),
            Some(value(100, b"rows"))
        );
        let chunks = store
            .key_chunks(&chunk_prefix(b"d\0", FRAME_CHUNK, b"alice"))
            .expect("reads");
        let bodies: Vec<&[u8]> = chunks.iter().map(|(_, v)| &v[9..]).collect();
        assert_eq!(bodies, [&b"one"[..], b"two"], "one key's chunks, in id order");
        assert!(
            store
                .key_chunks(&chunk_prefix(b"d\0", PENDING_CHUNK, b"alice"))
                .expect("reads")
                .is_empty()
        );
        let progress: Option<serde_json::Value> = store.meta_json("progress").expect("parses");
        assert_eq!(progress, Some(serde_json::json!({"a": 1})));
        assert!(
            store
                .meta_json::<u64>("absent")
                .expect("absent is fine")
                .is_none()
        );
    }

    #[test]
    fn expired_values_are_not_read_and_unreadable_metadata_is_named() {
        let store = StateStore::temporary().expect("opens");
        let mut commit = store.commit(0);
        commit.row(b"old", Some(&value(10, b"")));
        commit.row(b"new", Some(&value(30, b"")));
        commit.meta("clock", Some(b"not json"));
        store.write(commit).expect("writes");
        store.advance_clock(20);
        assert!(store.get(b"old").expect("reads").is_none());
        assert!(store.get(b"new").expect("reads").is_some());
        let error = store.meta_json::<u64>("clock").expect_err("corrupt");
        let text = error.to_string();
        assert!(text.contains("unreadable clock"), "{text}");
        assert!(text.contains(&store.path().display().to_string()), "{text}");
    }

    #[test]
    fn deletes_in_a_commit_remove_entries() {
        let store = StateStore::temporary().expect("opens");
        let mut commit = store.commit(0);
        commit.row(b"k", Some(&value(i64::MAX, b"x")));
        commit.meta("m", Some(b"1"));
        store.write(commit).expect("writes");
        let mut commit = store.commit(0);
        commit.row(b"k", None);
        commit.meta("m", None);
        store.write(commit).expect("writes");
        assert!(store.get(b"k").expect("reads").is_none());
        assert!(store.meta("m").expect("reads").is_none());
    }
}
