//! The per-run key/value cache: what a forward appends to, a rejected draft is truncated from, an accepted tree
//! path is compacted to, and a fork clones cheaply.

use std::sync::Arc;

use crate::error::{Error, Result};

/// Per-layer keys and values. Each batch row holds its positions in order, each position `kv × d` values, so a
/// step appends at the end instead of copying the cache.
///
/// Cloning is cheap: rows are reference counted and copied only when a clone appends to, truncates or compacts a
/// row it shares (forked runs, beams that share a parent).
#[derive(Clone, Debug)]
pub struct KvCache {
    pub(crate) layers: Vec<LayerCache>,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct LayerCache {
    /// Positions held (the same for every batch row).
    len: usize,
    pub(crate) keys: Vec<Arc<Vec<f32>>>,
    pub(crate) values: Vec<Arc<Vec<f32>>>,
}

/// Positions reserved beyond the current length when a row grows: few reallocations, little slack memory.
const CACHE_GROWTH: usize = 256;

impl LayerCache {
    fn width(&self) -> usize {
        self.keys
            .first()
            .map_or(0, |row| row.len() / self.len.max(1))
    }

    fn map_rows(&mut self, f: impl Fn(&[f32]) -> Vec<f32>) {
        for row in self.keys.iter_mut().chain(self.values.iter_mut()) {
            *row = Arc::new(f(row));
        }
    }
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        Self {
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
            .map(|row| row.capacity() * size_of::<f32>())
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
                        None => *row = Arc::new(row.get(..keep).unwrap_or_default().to_vec()),
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
                        if (from + 1) * width <= row.len() {
                            row.copy_within(from * width..(from + 1) * width, to * width);
                        }
                    }
                    row.truncate(positions.len() * width);
                }
            } else {
                layer.map_rows(|row| {
                    positions
                        .iter()
                        .flat_map(|&p| row.get(p * width..(p + 1) * width).unwrap_or_default())
                        .copied()
                        .collect()
                });
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
            slot.keys = (0..b).map(|_| Arc::default()).collect();
            slot.values = (0..b).map(|_| Arc::default()).collect();
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
                let row = Arc::make_mut(row);
                let needed = row.len() + fresh.len();
                if row.capacity() < needed {
                    row.reserve_exact(fresh.len() + CACHE_GROWTH * width);
                }
                row.extend_from_slice(fresh);
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

    /// A cache of `len` positions whose values name their layer, position and element.
    fn cache(len: usize) -> KvCache {
        let mut cache = KvCache::new(2);
        for layer in 0..2 {
            let values: Vec<f32> = (0..len * 3).map(|i| (layer * 10_000 + i) as f32).collect();
            cache.append(layer, 1, len, &values, &values).unwrap();
        }
        cache
    }

    fn rows(cache: &KvCache) -> Vec<Vec<f32>> {
        cache
            .layers
            .iter()
            .flat_map(|l| l.keys.iter().chain(&l.values).map(|r| r.to_vec()))
            .collect()
    }

    #[test]
    fn keeping_positions_moves_them_in_place_and_leaves_clones_alone() {
        for positions in [
            vec![0, 1, 2, 3, 4, 5, 7, 9],
            vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
            vec![2, 5],
            vec![9, 3, 4],
        ] {
            let original = cache(10);
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
                rows(&cache(10)),
                "the clone must not change"
            );
        }
        assert!(cache(4).keep(&[1, 4]).is_err());
    }
}
