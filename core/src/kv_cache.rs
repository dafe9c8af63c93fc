//! The per-run key/value cache: what a forward appends to, a rejected draft is truncated from, an accepted tree
//! path is compacted to, and a fork clones cheaply.

use std::sync::Arc;

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::error::{Error, Result};

/// How the cache stores keys and values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// As llama.cpp's cache does: half the memory, and half the bytes every attention step reads.
    F16,
    /// Plain f32, for the arithmetic that must equal candle's f32 forward.
    F32,
}

/// One batch row's keys (or values) of a layer: its positions in order, each `kv × d` values.
#[derive(Clone, Debug)]
pub enum Row {
    F16(Vec<f16>),
    F32(Vec<f32>),
}

/// A borrowed [`Row`], or part of one.
#[derive(Clone, Copy, Debug)]
pub enum RowSlice<'a> {
    F16(&'a [f16]),
    F32(&'a [f32]),
}

impl Row {
    fn empty(precision: Precision) -> Self {
        match precision {
            Precision::F16 => Row::F16(Vec::new()),
            Precision::F32 => Row::F32(Vec::new()),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Row::F16(v) => v.len(),
            Row::F32(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn as_slice(&self) -> RowSlice<'_> {
        match self {
            Row::F16(v) => RowSlice::F16(v),
            Row::F32(v) => RowSlice::F32(v),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Row::F16(v) => v.capacity() * size_of::<f16>(),
            Row::F32(v) => v.capacity() * size_of::<f32>(),
        }
    }

    fn truncate(&mut self, len: usize) {
        match self {
            Row::F16(v) => v.truncate(len),
            Row::F32(v) => v.truncate(len),
        }
    }

    /// A copy of the first `len` values.
    fn prefix(&self, len: usize) -> Row {
        match self {
            Row::F16(v) => Row::F16(v.get(..len).unwrap_or(v).to_vec()),
            Row::F32(v) => Row::F32(v.get(..len).unwrap_or(v).to_vec()),
        }
    }

    /// Copies `width` values from position `from` to position `to`, if both are held.
    fn move_position(&mut self, from: usize, to: usize, width: usize) {
        if (from.max(to) + 1) * width > self.len() {
            return;
        }
        match self {
            Row::F16(v) => v.copy_within(from * width..(from + 1) * width, to * width),
            Row::F32(v) => v.copy_within(from * width..(from + 1) * width, to * width),
        }
    }

    /// The given positions' values, in the given order.
    fn select(&self, positions: &[usize], width: usize) -> Row {
        fn pick<T: Copy>(row: &[T], positions: &[usize], width: usize) -> Vec<T> {
            positions
                .iter()
                .flat_map(|&p| row.get(p * width..(p + 1) * width).unwrap_or_default())
                .copied()
                .collect()
        }
        match self {
            Row::F16(v) => Row::F16(pick(v, positions, width)),
            Row::F32(v) => Row::F32(pick(v, positions, width)),
        }
    }

    /// Appends `fresh` (rounded to f16 in an f16 row), reserving `slack` more values when the row must grow.
    fn extend(&mut self, fresh: &[f32], slack: usize) {
        fn grow<T>(v: &mut Vec<T>, more: usize, slack: usize) {
            if v.capacity() < v.len() + more {
                v.reserve_exact(more + slack);
            }
        }
        match self {
            Row::F16(v) => {
                grow(v, fresh.len(), slack);
                let start = v.len();
                v.resize(start + fresh.len(), f16::ZERO);
                if let Some(new) = v.get_mut(start..) {
                    new.convert_from_f32_slice(fresh);
                }
            }
            Row::F32(v) => {
                grow(v, fresh.len(), slack);
                v.extend_from_slice(fresh);
            }
        }
    }
}

impl<'a> RowSlice<'a> {
    pub fn len(&self) -> usize {
        match self {
            RowSlice::F16(v) => v.len(),
            RowSlice::F32(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Values `range` as f32: borrowed from an f32 row, converted into `buffer` from an f16 one. Empty if out of
    /// range.
    pub fn f32s<'b>(&self, range: std::ops::Range<usize>, buffer: &'b mut Vec<f32>) -> &'b [f32]
    where
        'a: 'b,
    {
        match *self {
            RowSlice::F32(v) => v.get(range).unwrap_or_default(),
            RowSlice::F16(v) => {
                let half = v.get(range).unwrap_or_default();
                buffer.clear();
                buffer.resize(half.len(), 0.0);
                half.convert_to_f32_slice(buffer);
                buffer
            }
        }
    }
}

/// Per-layer keys and values. Each batch row holds its positions in order, each position `kv × d` values, so a
/// step appends at the end instead of copying the cache.
///
/// Cloning is cheap: rows are reference counted and copied only when a clone appends to, truncates or compacts a
/// row it shares (forked runs, beams that share a parent).
#[derive(Clone, Debug)]
pub struct KvCache {
    precision: Precision,
    pub(crate) layers: Vec<LayerCache>,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct LayerCache {
    /// Positions held (the same for every batch row).
    len: usize,
    pub(crate) keys: Vec<Arc<Row>>,
    pub(crate) values: Vec<Arc<Row>>,
}

/// Positions reserved beyond the current length when a row grows: few reallocations, little slack memory.
const CACHE_GROWTH: usize = 256;

impl LayerCache {
    fn width(&self) -> usize {
        self.keys
            .first()
            .map_or(0, |row| row.len() / self.len.max(1))
    }
}

impl KvCache {
    pub fn new(n_layers: usize, precision: Precision) -> Self {
        Self {
            precision,
            layers: vec![LayerCache::default(); n_layers],
        }
    }

    /// Cached positions in a layer. Layers differ only on a draft copy that skipped some layers.
    pub fn layer_len(&self, layer: usize) -> usize {
        self.layers.get(layer).map_or(0, |l| l.len)
    }

    /// Cached positions of the full model (the longest layer).
    pub fn len(&self) -> usize {
        self.layers.iter().map(|l| l.len).max().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Batch rows (beams) held.
    pub fn batch(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.keys.len())
            .find(|&n| n > 0)
            .unwrap_or(1)
    }

    /// Bytes of keys and values held (shared rows counted once per cache that holds them).
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| l.keys.iter().chain(&l.values))
            .map(|row| row.bytes())
            .sum()
    }

    /// Forgets every position from `len` on (rolling back rejected drafts).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        for layer in &mut self.layers {
            if len < layer.len {
                let keep = len * layer.width();
                for row in layer.keys.iter_mut().chain(layer.values.iter_mut()) {
                    match Arc::get_mut(row) {
                        Some(unique) => unique.truncate(keep),
                        // Shared with a clone: copy only what is kept.
                        None => *row = Arc::new(row.prefix(keep)),
                    }
                }
                layer.len = len;
            }
        }
        Ok(())
    }

    /// Keeps only the given positions, in the given order (the accepted path of a verified draft tree).
    pub fn keep(&mut self, positions: &[usize]) -> Result<()> {
        for layer in &mut self.layers {
            if layer.keys.is_empty() {
                continue;
            }
            if let Some(bad) = positions.iter().find(|&&p| p >= layer.len) {
                return Err(Error::InvalidInput(format!(
                    "cannot keep position {bad} of a cache holding {}",
                    layer.len
                )));
            }
            let width = layer.width();
            if positions.windows(2).all(|w| w[0] < w[1]) {
                // The usual case, an accepted path: an unchanged prefix, then a few later positions moved down.
                // Moving in increasing order never overwrites a position still to be read, so it is done in
                // place and costs the moved positions, not the whole cache.
                let unchanged = positions
                    .iter()
                    .enumerate()
                    .take_while(|&(i, &p)| i == p)
                    .count();
                for row in layer.keys.iter_mut().chain(layer.values.iter_mut()) {
                    let row = Arc::make_mut(row);
                    for (to, &from) in positions.iter().enumerate().skip(unchanged) {
                        row.move_position(from, to, width);
                    }
                    row.truncate(positions.len() * width);
                }
            } else {
                for row in layer.keys.iter_mut().chain(layer.values.iter_mut()) {
                    *row = Arc::new(row.select(positions, width));
                }
            }
            layer.len = positions.len();
        }
        Ok(())
    }

    /// Rebuilds the batch from the given rows, repeating or reordering them (beam search).
    pub fn select_batch(&mut self, rows: &[usize]) -> Result<()> {
        for layer in &mut self.layers {
            let b = layer.keys.len();
            if b == 0 {
                continue;
            }
            if let Some(bad) = rows.iter().find(|&&r| r >= b) {
                return Err(Error::InvalidInput(format!(
                    "cannot select batch row {bad} of a cache holding {b}"
                )));
            }
            layer.keys = rows
                .iter()
                .filter_map(|&r| layer.keys.get(r).cloned())
                .collect();
            layer.values = rows
                .iter()
                .filter_map(|&r| layer.values.get(r).cloned())
                .collect();
        }
        Ok(())
    }

    /// Appends `t` positions for each of `b` batch rows: `keys` and `values` hold (b × t) rows of `width` values.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        b: usize,
        t: usize,
        keys: &[f32],
        values: &[f32],
    ) -> Result<()> {
        let slot = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| Error::InvalidInput(format!("no cache slot for layer {layer}")))?;
        if slot.keys.is_empty() {
            let empty = Arc::new(Row::empty(self.precision));
            slot.keys = vec![empty.clone(); b];
            slot.values = vec![empty; b];
        }
        if slot.keys.len() != b {
            return Err(Error::InvalidInput(format!(
                "forward of {b} batch rows on a cache holding {}",
                slot.keys.len()
            )));
        }
        let per_row = keys.len() / b.max(1);
        let width = per_row / t.max(1);
        for (rows, new) in [(&mut slot.keys, keys), (&mut slot.values, values)] {
            for (row, fresh) in rows.iter_mut().zip(new.chunks_exact(per_row)) {
                Arc::make_mut(row).extend(fresh, CACHE_GROWTH * width);
            }
        }
        slot.len += t;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A cache of `len` positions whose values name their layer, position and element (small integers, exact in
    /// f16 too).
    fn cache(len: usize, precision: Precision) -> KvCache {
        let mut cache = KvCache::new(2, precision);
        for layer in 0..2 {
            let values: Vec<f32> = (0..len * 3).map(|i| (layer * 100 + i) as f32).collect();
            cache.append(layer, 1, len, &values, &values).unwrap();
        }
        cache
    }

    fn rows(cache: &KvCache) -> Vec<Vec<f32>> {
        let mut buffer = Vec::new();
        cache
            .layers
            .iter()
            .flat_map(|l| l.keys.iter().chain(&l.values))
            .map(|r| r.as_slice().f32s(0..r.len(), &mut buffer).to_vec())
            .collect()
    }

    #[test]
    fn keeping_positions_moves_them_in_place_and_leaves_clones_alone() {
        for precision in [Precision::F16, Precision::F32] {
            for positions in [
                vec![0, 1, 2, 3, 4, 5, 7, 9],
                vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
                vec![2, 5],
                vec![9, 3, 4],
            ] {
                let original = cache(10, precision);
                let mut kept = original.clone();
                kept.keep(&positions).unwrap();
                assert_eq!(kept.len(), positions.len());
                let want: Vec<Vec<f32>> = rows(&original)
                    .iter()
                    .map(|row| {
                        positions
                            .iter()
                            .flat_map(|&p| row[p * 3..p * 3 + 3].to_vec())
                            .collect()
                    })
                    .collect();
                assert_eq!(rows(&kept), want, "{positions:?}");
                assert_eq!(
                    rows(&original),
                    rows(&cache(10, precision)),
                    "the clone must not change"
                );
            }
            assert!(cache(4, precision).keep(&[1, 4]).is_err());
        }
    }

    #[test]
    fn truncating_a_clone_leaves_the_original_and_f16_halves_the_bytes() {
        for precision in [Precision::F16, Precision::F32] {
            let original = cache(10, precision);
            let mut short = original.clone();
            short.truncate(4).unwrap();
            assert_eq!(short.len(), 4);
            assert!(rows(&short).iter().all(|r| r.len() == 12));
            assert_eq!(rows(&original), rows(&cache(10, precision)));
        }
        let (half, full) = (cache(10, Precision::F16), cache(10, Precision::F32));
        assert_eq!(2 * half.bytes(), full.bytes());
    }

    #[test]
    fn an_f16_cache_rounds_to_the_nearest_f16() {
        let mut cache = KvCache::new(1, Precision::F16);
        let values = [1.0 + 1.0 / 4096.0, 0.1, -65504.0, 1e-8];
        cache.append(0, 1, 1, &values, &values).unwrap();
        let mut want = values.to_vec();
        crate::kernels::f16::round_to_f16(&mut want);
        assert_eq!(rows(&cache)[0], want);
    }
}
