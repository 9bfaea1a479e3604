//! Grouped windows (`GROUP BY` a `date_bin` bucket and keys, with `HAVING`): a group fires
//! once, at the first event after which its HAVING holds (found by evaluating prefixes of the
//! batch's new rows), and then keeps no rows until its bucket has passed.

use std::collections::HashMap;

use rampart_sql::WindowedDetector;
use rampart_state::codec::{FIRED, StoredRow, expires_at, flags, rows_of, set_header};

use super::{DecideContext, Decided, KeyedState, Touched};
use crate::decide::DecisionMaker;

impl KeyedState {
    /// Grouped windows: fires the groups in `touched` whose HAVING now holds, each at the first
    /// of this batch's events after which it holds, and marks them fired.
    pub fn decide_grouped<'d>(
        &mut self,
        window: WindowedDetector<'d>,
        ctx: &DecideContext<'_>,
        touched: Touched,
    ) -> Decided<'d> {
        let WindowedDetector { detector, split } = window;
        let Some(events) = ctx.events else {
            return Ok(Vec::new());
        };
        let parser = self.row_converter.parser();
        // The newest row of each touched group: the row id its result row carries.
        let mut group_of_row: HashMap<u64, usize> = HashMap::new();
        let mut input = Vec::new();
        for (g, (key, _)) in touched.iter().enumerate() {
            let Some(entry) = self.cache.get(key) else {
                continue;
            };
            if flags(&entry.value) & FIRED != 0 {
                continue;
            }
            let mut newest = None;
            for r in rows_of(&entry.value) {
                input.push(parser.parse(r.bytes));
                newest = newest.max(Some(r.row));
            }
            if let Some(row) = newest {
                group_of_row.insert(row, g);
            }
        }
        let results = self.post(ctx.engine, split, &input)?;
        let mut satisfied: Vec<usize> = Vec::new();
        for result in &results {
            let Some(ids) = DecisionMaker::row_ids(detector, result) else {
                continue;
            };
            satisfied.extend((0..result.num_rows()).filter_map(|r| group_of_row.get(&ids.value(r)).copied()));
        }
        satisfied.sort_unstable();
        satisfied.dedup();
        let mut out = Vec::new();
        for &g in &satisfied {
            let entry = self.cache.get(&touched[g].0).expect("touched keys are cached");
            let mut by_arrival: Vec<StoredRow<'_>> = rows_of(&entry.value).collect();
            by_arrival.sort_by_key(|r| r.row);
            let new = by_arrival
                .iter()
                .filter(|r| events.index_of(r.row).is_some())
                .count();
            let old = by_arrival.len() - new;
            let prefix = |n: usize| -> Vec<_> {
                by_arrival[..old + n]
                    .iter()
                    .map(|r| parser.parse(r.bytes))
                    .collect()
            };
            // The smallest prefix of this batch's rows (in input order) after which HAVING
            // holds: it holds with all of them, so search 1..=new.
            let (mut lo, mut hi) = (1, new.max(1));
            while lo < hi {
                let mid = (lo + hi) / 2;
                let fires = self
                    .post(ctx.engine, split, &prefix(mid))?
                    .iter()
                    .any(|b| b.num_rows() > 0);
                if fires {
                    hi = mid;
                } else {
                    lo = mid + 1;
                }
            }
            let last = by_arrival[old + lo - 1].row;
            out.extend(self.run(detector, split, &prefix(lo), |row| row == last, ctx)?);
        }
        // Fired groups keep only their header (the expiry) until the bucket has passed.
        for g in satisfied {
            let entry = self.entry(ctx.store, &touched[g].0)?;
            let expires = expires_at(&entry.value);
            let before = entry.value.capacity();
            entry.value = Vec::new();
            set_header(&mut entry.value, expires, FIRED);
            entry.dirty = true;
            self.cache_bytes = self.cache_bytes.saturating_sub(before);
        }
        Ok(out)
    }
}
