//! How a key's frames are stored: append-only chunks per key ([`KeyAgg::save`]: the rows that
//! arrived since the last checkpoint, as a frame chunk and a pending chunk; past
//! [`MAX_FRAME_CHUNKS`], or for a key written whole, one chunk of every row held) and rebuilt
//! from them ([`KeyAgg::load`]), so that a checkpoint's size follows the input, not the
//! windows.

use rustc_hash::FxHashSet;

use rampart_state::Commit;
use rampart_state::codec::{FIRED_CHUNK, FRAME_CHUNK, PENDING_CHUNK};

#[cfg(test)]
use super::KeyChunks;
use super::{
    KeyAgg, Layout, MAX_FRAME_CHUNKS, RowBytes, Val, Waiting, push_frame_entry, reserve_small, take,
};

/// A stored frame row: time, chunk id, order in its chunk, where its arguments start. Chunks in
/// id order are in arrival order, so sorted, this is the order rows were held in.
type FrameRow = (i64, u64, u64, usize);

impl KeyAgg {
    /// Adds to `out` the chunk writes that bring the key on disk up to date: a frame chunk and
    /// a pending chunk of the rows that arrived since the last save (or, past
    /// [`MAX_FRAME_CHUNKS`], one frame chunk of every row held instead of the others), and
    /// deletes of chunks no frame or pending row needs any more. `chunk_key` names a chunk by
    /// kind and id; rows older than `decided_until` are decided; a frame chunk is of no use
    /// `horizon` µs after its newest row, a pending chunk `lateness` µs (and how far the
    /// frames look ahead) after. A key that
    /// holds nothing deletes every chunk.
    pub fn save(
        &mut self,
        chunk_key: impl Fn(u8, u64) -> Vec<u8>,
        decided_until: i64,
        horizon: i64,
        lateness: i64,
        out: &mut Commit<'_>,
    ) {
        if self.is_empty() {
            self.delete_chunks(&chunk_key, out);
            return;
        }
        self.fresh.sort_unstable();
        self.save_frame_chunk(&chunk_key, horizon, out);
        self.save_pending_chunk(&chunk_key, lateness, out);
        self.save_fired_chunk(&chunk_key, lateness, out);
        self.whole = false;
        // Chunks whose rows are all decided.
        let fired = self.fired.as_deref_mut().map(|f| &mut f.chunks);
        for (kind, chunks) in [
            (PENDING_CHUNK, Some(&mut self.pending_chunks)),
            (FIRED_CHUNK, fired),
        ] {
            let Some(chunks) = chunks else { continue };
            chunks.retain(|(id, newest)| {
                let keep = *newest >= decided_until;
                if !keep {
                    out.chunk(&chunk_key(kind, *id), None);
                }
                keep
            });
        }
        if self
            .fired
            .as_ref()
            .is_some_and(|f| f.log.is_empty() && f.chunks.is_empty())
        {
            self.fired = None;
        }
    }

    /// Deletes every chunk of a key that holds nothing.
    fn delete_chunks(&mut self, chunk_key: &impl Fn(u8, u64) -> Vec<u8>, out: &mut Commit<'_>) {
        for (id, _) in self.frame_chunks.drain(..) {
            out.chunk(&chunk_key(FRAME_CHUNK, id), None);
        }
        for (id, _) in self.pending_chunks.drain(..) {
            out.chunk(&chunk_key(PENDING_CHUNK, id), None);
        }
        for (id, _) in self.fired.take().map(|f| f.chunks).unwrap_or_default() {
            out.chunk(&chunk_key(FIRED_CHUNK, id), None);
        }
        self.fresh = Vec::new();
        self.whole = false;
    }

    /// The frame chunk of the rows that arrived since the last save (past
    /// [`MAX_FRAME_CHUNKS`], or when the key is to be written `whole`: of every row held,
    /// replacing the others), and deletes of the chunks whose rows every frame has left.
    fn save_frame_chunk(
        &mut self,
        chunk_key: &impl Fn(u8, u64) -> Vec<u8>,
        horizon: i64,
        out: &mut Commit<'_>,
    ) {
        if self.whole || !self.fresh.is_empty() {
            let id = self.next_chunk;
            self.next_chunk += 1;
            let (entries, newest) = if !self.whole && self.frame_chunks.len() < MAX_FRAME_CHUNKS {
                self.fresh_entries()
            } else {
                // Every row held, in order: `ord` is the position.
                for (old, _) in self.frame_chunks.drain(..) {
                    out.chunk(&chunk_key(FRAME_CHUNK, old), None);
                }
                let mut entries = Vec::new();
                for (i, time) in self.times.iter().enumerate() {
                    push_frame_entry(&mut entries, *time, i as u64, self.args.row(i));
                }
                (entries, self.times.back().copied().unwrap_or(i64::MIN))
            };
            // (Empty when every fresh row has left the frames already.)
            if !entries.is_empty() {
                let mut value = newest.saturating_add(horizon).to_le_bytes().to_vec();
                value.extend_from_slice(&entries);
                out.chunk(&chunk_key(FRAME_CHUNK, id), Some(&value));
                reserve_small(&mut self.frame_chunks);
                self.frame_chunks.push((id, newest));
            }
        }
        // Chunks whose rows every frame has left.
        let oldest = self.times.front().copied().unwrap_or(i64::MAX);
        self.frame_chunks.retain(|(id, newest)| {
            let keep = *newest >= oldest;
            if !keep {
                out.chunk(&chunk_key(FRAME_CHUNK, *id), None);
            }
            keep
        });
    }

    /// The pending chunk of the fresh rows still waiting to be decided (`fresh` is emptied);
    /// when the key is to be written `whole`, of every row waiting, replacing the others.
    fn save_pending_chunk(
        &mut self,
        chunk_key: &impl Fn(u8, u64) -> Vec<u8>,
        lateness: i64,
        out: &mut Commit<'_>,
    ) {
        if self.whole || !self.fresh.is_empty() {
            let mut value = Vec::new();
            let mut newest = i64::MIN;
            let mut push = |Waiting { time, row, bytes, .. }: &Waiting| {
                let bytes = bytes.get();
                value.extend_from_slice(&time.to_le_bytes());
                value.extend_from_slice(&row.to_le_bytes());
                value.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
                value.extend_from_slice(bytes);
                newest = newest.max(*time);
            };
            if self.whole {
                for (old, _) in self.pending_chunks.drain(..) {
                    out.chunk(&chunk_key(PENDING_CHUNK, old), None);
                }
                self.pending.iter().for_each(&mut push);
            }
            // (Taken, not drained: the buffer is freed until rows arrive again.)
            for (time, row) in std::mem::take(&mut self.fresh) {
                let at = self.pending.partition_point(|w| (w.time, w.row) < (time, row));
                if let Some(waiting) = self.pending.get(at).filter(|w| (w.time, w.row) == (time, row)) {
                    push(waiting);
                }
            }
            if !value.is_empty() {
                let id = self.next_chunk;
                self.next_chunk += 1;
                // (Its rows wait for the watermark to pass them by how far the frames look
                // ahead.)
                let expires = newest.saturating_add(self.following).saturating_add(lateness);
                let mut chunk = expires.to_le_bytes().to_vec();
                chunk.extend_from_slice(&value);
                out.chunk(&chunk_key(PENDING_CHUNK, id), Some(&chunk));
                reserve_small(&mut self.pending_chunks);
                self.pending_chunks.push((id, newest));
            }
        }
    }

    /// The chunk of rows fired at once since the last save: time, row id, the detector's tag.
    fn save_fired_chunk(
        &mut self,
        chunk_key: &impl Fn(u8, u64) -> Vec<u8>,
        lateness: i64,
        out: &mut Commit<'_>,
    ) {
        let Some(fired) = self.fired.as_deref_mut() else {
            return;
        };
        if !fired.log.is_empty() {
            let newest = fired.log.iter().map(|f| f.0).max().unwrap_or(i64::MIN);
            let mut chunk = newest.saturating_add(lateness).to_le_bytes().to_vec();
            for (time, row, tag) in std::mem::take(&mut fired.log) {
                chunk.extend_from_slice(&time.to_le_bytes());
                chunk.extend_from_slice(&row.to_le_bytes());
                chunk.extend_from_slice(&tag.to_le_bytes());
            }
            let id = self.next_chunk;
            self.next_chunk += 1;
            out.chunk(&chunk_key(FIRED_CHUNK, id), Some(&chunk));
            reserve_small(&mut fired.chunks);
            fired.chunks.push((id, newest));
        }
    }

    /// The frame chunk entries of the rows that arrived since the last save (`fresh`, sorted),
    /// and the newest time among them. Rows of equal time are held in arrival order, so the
    /// fresh rows of a time are the last ones of that time; rows every frame has already left
    /// are not needed.
    pub(super) fn fresh_entries(&self) -> (Vec<u8>, i64) {
        let stride = self.stride();
        let mut entries = Vec::with_capacity(self.fresh.len() * (16 + stride * 9));
        let mut newest = i64::MIN;
        for same in self.fresh.chunk_by(|a, b| a.0 == b.0) {
            let time = same[0].0;
            let end = self.times.partition_point(|t| *t <= time);
            let start = self
                .times
                .partition_point(|t| *t < time)
                .max(end.saturating_sub(same.len()));
            let held = &same[same.len() - (end - start)..];
            for (&(_, row), at) in held.iter().zip(start..end) {
                push_frame_entry(&mut entries, time, row, self.args.row(at));
                newest = time;
            }
        }
        (entries, newest)
    }

    /// The pending rows of a pending chunk's value (after its expiry): time, row id, bytes.
    pub fn pending_rows(value: &[u8]) -> Option<Vec<(i64, u64, &[u8])>> {
        let mut input = value.get(8..)?;
        let input = &mut input;
        let mut out = Vec::new();
        while !input.is_empty() {
            let time = i64::from_le_bytes(take(input, 8)?.try_into().ok()?);
            let row = u64::from_le_bytes(take(input, 8)?.try_into().ok()?);
            let len = u32::from_le_bytes(take(input, 4)?.try_into().ok()?) as usize;
            out.push((time, row, take(input, len)?));
        }
        Some(out)
    }

    /// Rebuilds a key from its chunks: [`Self::load_frames`], then [`Self::load_undecided`].
    #[cfg(test)]
    pub fn load(layout: &Layout, chunks: &KeyChunks, tags: &[u64], decided_until: i64) -> Option<Self> {
        let mut agg = Self::load_frames(layout, &chunks.frame, decided_until)?;
        agg.load_undecided(&chunks.pending, &chunks.fired, tags, decided_until)?;
        Some(agg)
    }

    /// Rebuilds a key's frames from its frame chunks ((id, value)), given that every row older
    /// than `decided_until` was decided (and so entered the accumulators) and no other: the
    /// frames end at the newest of those rows, and rows older than every frame are dropped.
    /// Its rows not decided yet are read by [`Self::load_undecided`]; there are none unless
    /// [`Self::newest_stored`] is at or after `decided_until`. `None` when a chunk does not
    /// decode.
    pub fn load_frames(layout: &Layout, frame: &[(u64, Vec<u8>)], decided_until: i64) -> Option<Self> {
        let mut agg = Self::new(layout);
        let (mut rows, mut values) = agg.load_frame_chunks(frame, layout.stride)?;
        agg.enter_decided(layout, &mut rows, &mut values, decided_until);
        Some(agg)
    }

    /// The newest row time of the frame chunks read (`None`: none held a row). Pending rows are
    /// frame rows too: with none as new as the time up to which rows are decided, a key has no
    /// pending chunk to read. (Read from the rows themselves, not from the chunks' expiry: that
    /// depends on the windows' reach and the lateness when they were written.)
    pub fn newest_stored(&self) -> Option<i64> {
        self.frame_chunks
            .iter()
            .map(|(_, newest)| *newest)
            .max()
            .filter(|t| *t > i64::MIN)
    }

    /// Reads a rebuilt key's pending rows (those of its pending chunks not older than
    /// `decided_until`), and marks those its fired chunks say fired at once, for the detectors
    /// (`tags`) reading the state now. `None` when a chunk does not decode.
    pub fn load_undecided(
        &mut self,
        pending: &[(u64, Vec<u8>)],
        fired: &[(u64, Vec<u8>)],
        tags: &[u64],
        decided_until: i64,
    ) -> Option<()> {
        self.load_pending_chunks(pending, decided_until)?;
        self.load_fired_chunks(fired, tags)
    }

    /// The rows of the frame chunks ([`FrameRow`]), and their arguments, `n` per row.
    fn load_frame_chunks(&mut self, frame: &[(u64, Vec<u8>)], n: usize) -> Option<(Vec<FrameRow>, Vec<Val>)> {
        let mut rows: Vec<FrameRow> = Vec::new();
        let mut values: Vec<Val> = Vec::new();
        let mut texts = FxHashSet::default();
        for (id, value) in frame {
            let mut input = value.get(8..)?;
            let input = &mut input;
            let mut newest = i64::MIN;
            while !input.is_empty() {
                let time = i64::from_le_bytes(take(input, 8)?.try_into().ok()?);
                let ord = u64::from_le_bytes(take(input, 8)?.try_into().ok()?);
                rows.push((time, *id, ord, values.len()));
                for _ in 0..n {
                    values.push(Val::decode(input, &mut texts)?);
                }
                newest = newest.max(time);
            }
            self.frame_chunks.push((*id, newest));
            self.next_chunk = self.next_chunk.max(id + 1);
        }
        Some((rows, values))
    }

    /// Holds the frame rows (`rows` from [`Self::load_frame_chunks`]) given that every row
    /// older than `decided_until` entered the accumulators and no other: the frames end at the
    /// newest of those rows, and rows older than every frame are dropped.
    fn enter_decided(
        &mut self,
        layout: &Layout,
        rows: &mut [FrameRow],
        values: &mut [Val],
        decided_until: i64,
    ) {
        let aggregates = &layout.aggregates;
        let n = layout.stride;
        rows.sort_unstable_by_key(|(t, id, ord, _)| (*t, *id, *ord));
        if self.following > 0 {
            // Frames that look ahead held rows past the decided ones: rebuilt empty, they take
            // their rows again when the next row is decided. Rows older than every frame of an
            // undecided row are gone.
            let first = rows.partition_point(|r| r.0 < decided_until.saturating_sub(layout.longest()));
            self.keep_rows(rows, values, first, n);
            return;
        }
        let entered = rows.partition_point(|r| r.0 < decided_until);
        let first = match entered.checked_sub(1).map(|last| rows[last].0) {
            // The frames end at the newest decided row: rows older than every frame are gone.
            Some(end) => {
                self.frame_end = end;
                self.evaluated_to = end;
                let oldest_start = aggregates
                    .iter()
                    .map(|a| end.saturating_sub(a.length))
                    .min()
                    .unwrap_or(end);
                let first = rows[..entered].partition_point(|r| r.0 < oldest_start);
                for (k, a) in aggregates.iter().enumerate() {
                    let from = end.saturating_sub(a.length);
                    self.starts[k] = (rows[first..entered].partition_point(|r| r.0 < from)) as u64;
                }
                first
            }
            None => 0,
        };
        self.added = (entered - first) as u64;
        self.keep_rows(rows, values, first, n);
        for (k, acc) in self.accs.iter_mut().enumerate() {
            for seq in self.starts[k]..self.added {
                acc.add(&self.args.get(seq as usize, layout.slot[k]), seq);
            }
        }
    }

    /// Holds the frame rows from `first` on (sorted [`FrameRow`]s), `n` arguments each.
    fn keep_rows(&mut self, rows: &[FrameRow], values: &mut [Val], first: usize, n: usize) {
        self.times.reserve_exact(rows.len() - first);
        self.args.reserve(rows.len() - first);
        for &(time, _, _, at) in &rows[first..] {
            self.times.push_back(time);
            self.args.push(values[at..at + n].iter_mut().map(std::mem::take));
        }
    }

    /// The pending rows of the pending chunks not older than `decided_until`.
    fn load_pending_chunks(&mut self, pending: &[(u64, Vec<u8>)], decided_until: i64) -> Option<()> {
        for (id, value) in pending {
            let mut newest = i64::MIN;
            for (time, row, bytes) in Self::pending_rows(value)? {
                newest = newest.max(time);
                if time >= decided_until {
                    self.pending.push(Waiting {
                        time,
                        row,
                        bytes: RowBytes::Own(bytes.into()),
                        settled: 0,
                        fired: 0,
                        evaluated: false,
                        values: None,
                    });
                }
            }
            self.pending_chunks.push((*id, newest));
            self.next_chunk = self.next_chunk.max(id + 1);
        }
        self.pending.sort_unstable_by_key(|w| (w.time, w.row));
        Some(())
    }

    /// Marks the pending rows the fired chunks say fired at once, for the detectors (`tags`)
    /// reading the state now.
    fn load_fired_chunks(&mut self, fired: &[(u64, Vec<u8>)], tags: &[u64]) -> Option<()> {
        for (id, value) in fired {
            let mut input = value.get(8..)?;
            let input = &mut input;
            let mut newest = i64::MIN;
            while !input.is_empty() {
                let time = i64::from_le_bytes(take(input, 8)?.try_into().ok()?);
                let row = u64::from_le_bytes(take(input, 8)?.try_into().ok()?);
                let tag = u64::from_le_bytes(take(input, 8)?.try_into().ok()?);
                newest = newest.max(time);
                // (A detector changed since has another tag: it decides afresh.)
                let Some(bit) = tags.iter().position(|t| *t == tag) else {
                    continue;
                };
                let at = self.pending.partition_point(|w| (w.time, w.row) < (time, row));
                if let Some(w) = self
                    .pending
                    .get_mut(at)
                    .filter(|w| (w.time, w.row) == (time, row))
                {
                    w.fired |= 1 << bit;
                    w.settled |= 1 << bit;
                }
            }
            self.fired
                .get_or_insert_with(Box::default)
                .chunks
                .push((*id, newest));
            self.next_chunk = self.next_chunk.max(id + 1);
        }
        Some(())
    }
}
