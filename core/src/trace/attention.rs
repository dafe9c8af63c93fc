//! The attention of one position at every recorded layer, packed (trace schema version 2).
//!
//! Version 1 wrote every row as a JSON object of keys and decimal weights: about 40 KB per token for 30 layers
//! of 11 rows of 8 keys, 55 KB per token with the lens, which made a 2,000-token run over 100 MB. A map holds the
//! same rows in three packed arrays, each written as base64:
//! - `keys`: each row's `width` keys, largest weight first, as the distance back from the query position
//!   (`query - key`) in LEB128, so the recent keys most rows look at take one byte and any context fits;
//! - `weights`: the matching weights as little-endian u16 of weight × 65535, steps of 1.5e-5: finer than the
//!   1e-4 version 1 rounded to, and than the panel prints (0.1 %, or 0.001 % below 0.1 %);
//! - `covered`: per row, the total weight of its kept keys, as the weights.
//!
//! Rows go layer by layer in `layers` order; within a layer one row per head, then the max over heads, then the
//! mean over heads. Every row of a map has the same width: the top-k of a query that sees fewer than k keys is
//! all of them.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

use super::{LayerAttention, SparseRow};

/// A weight w is stored as round(w × WEIGHT_SCALE).
pub const WEIGHT_SCALE: f32 = 65535.0;

/// The attention of the position `query` at each recorded layer: per head, max and mean over heads, the `width`
/// largest weights of each row.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(into = "Wire", try_from = "Wire")]
pub struct AttentionMap {
    query: usize,
    layers: Vec<usize>,
    heads: usize,
    width: usize,
    /// Absolute key positions, `rows × width`.
    keys: Vec<u32>,
    /// Quantized weights, `rows × width`.
    weights: Vec<u16>,
    /// Quantized kept weight per row (clamped to 1: the max row's total may pass 1, and no panel shows it).
    covered: Vec<u16>,
}

impl AttentionMap {
    /// An empty map for `query`'s attention with `heads` heads per layer and `width` keys per row.
    pub fn new(query: usize, heads: usize, width: usize) -> Self {
        Self {
            query,
            heads,
            width,
            ..Self::default()
        }
    }

    /// The position whose attention this is (the one before the token it predicted).
    pub fn query(&self) -> usize {
        self.query
    }

    /// The recorded layers, in order.
    pub fn layers(&self) -> &[usize] {
        &self.layers
    }

    pub fn heads(&self) -> usize {
        self.heads
    }

    /// Keys kept per row.
    pub fn width(&self) -> usize {
        self.width
    }

    fn rows_per_layer(&self) -> usize {
        self.heads + 2
    }

    /// Appends one layer: `keys` and `weights` hold `(heads + 2) × width` entries row by row (heads, max, mean;
    /// each row largest first), `covered` one entry per row.
    pub fn push_layer(
        &mut self,
        layer: usize,
        keys: &[u32],
        weights: &[f32],
        covered: &[f32],
    ) -> Result<(), String> {
        let rows = self.rows_per_layer();
        if keys.len() != rows * self.width || weights.len() != keys.len() || covered.len() != rows {
            return Err(format!(
                "layer {layer}: {} keys, {} weights and {} row totals for {rows} rows of {} keys",
                keys.len(),
                weights.len(),
                covered.len(),
                self.width
            ));
        }
        if let Some(&key) = keys.iter().find(|&&k| k as usize > self.query) {
            return Err(format!(
                "layer {layer}: key {key} comes after the query position {}",
                self.query
            ));
        }
        self.layers.push(layer);
        self.keys.extend_from_slice(keys);
        self.weights.extend(weights.iter().map(|&w| quantize(w)));
        self.covered.extend(covered.iter().map(|&w| quantize(w)));
        Ok(())
    }

    /// Row `row` (a head, then `heads` for the max and `heads + 1` for the mean) of the layer at `layer_index`
    /// in [`layers`](Self::layers).
    pub fn row(&self, layer_index: usize, row: usize) -> Option<SparseRow> {
        if layer_index >= self.layers.len() || row >= self.rows_per_layer() {
            return None;
        }
        let r = layer_index * self.rows_per_layer() + row;
        let span = r * self.width..(r + 1) * self.width;
        Some(SparseRow {
            keys: self.keys.get(span.clone())?.to_vec(),
            weights: self
                .weights
                .get(span)?
                .iter()
                .map(|&q| dequantize(q))
                .collect(),
            covered: dequantize(*self.covered.get(r)?),
        })
    }

    /// A version-1 attention (one [`LayerAttention`] per layer) as a map.
    pub fn from_layers(query: usize, layers: &[LayerAttention]) -> Result<Self, String> {
        let first = layers.first().ok_or("no layer")?;
        let heads = first
            .heads
            .len()
            .checked_sub(2)
            .ok_or("a layer without its max and mean rows")?;
        let width = first.heads.first().map_or(0, |r| r.keys.len());
        let mut map = Self::new(query, heads, width);
        for layer in layers {
            if layer.heads.len() != heads + 2 {
                return Err(format!(
                    "layer {} has {} rows, layer {} has {}",
                    layer.layer,
                    layer.heads.len(),
                    first.layer,
                    first.heads.len()
                ));
            }
            let mut keys = Vec::with_capacity((heads + 2) * width);
            let mut weights = Vec::with_capacity(keys.capacity());
            for row in &layer.heads {
                if row.keys.len() != width || row.weights.len() != width {
                    return Err(format!(
                        "layer {}: a row of {} keys and {} weights among rows of {width}",
                        layer.layer,
                        row.keys.len(),
                        row.weights.len()
                    ));
                }
                keys.extend_from_slice(&row.keys);
                weights.extend_from_slice(&row.weights);
            }
            let covered: Vec<f32> = layer.heads.iter().map(|r| r.covered).collect();
            map.push_layer(layer.layer, &keys, &weights, &covered)?;
        }
        Ok(map)
    }
}

fn quantize(w: f32) -> u16 {
    if w.is_nan() {
        return 0;
    }
    (w.clamp(0.0, 1.0) * WEIGHT_SCALE).round() as u16
}

fn dequantize(q: u16) -> f32 {
    f32::from(q) / WEIGHT_SCALE
}

/// A map as a trace line holds it.
#[derive(Serialize, Deserialize)]
struct Wire {
    query: usize,
    layers: Vec<usize>,
    heads: usize,
    width: usize,
    keys: String,
    weights: String,
    covered: String,
}

impl From<AttentionMap> for Wire {
    fn from(map: AttentionMap) -> Self {
        let mut keys = Vec::with_capacity(map.keys.len() * 2);
        for &k in &map.keys {
            // `push_layer` and `try_from` keep every key at or before the query.
            write_leb128(&mut keys, map.query.saturating_sub(k as usize) as u64);
        }
        let le =
            |values: &[u16]| -> Vec<u8> { values.iter().flat_map(|v| v.to_le_bytes()).collect() };
        Wire {
            query: map.query,
            layers: map.layers,
            heads: map.heads,
            width: map.width,
            keys: STANDARD.encode(keys),
            weights: STANDARD.encode(le(&map.weights)),
            covered: STANDARD.encode(le(&map.covered)),
        }
    }
}

impl TryFrom<Wire> for AttentionMap {
    type Error = String;

    fn try_from(wire: Wire) -> Result<Self, String> {
        let rows = wire
            .layers
            .len()
            .checked_mul(wire.heads.checked_add(2).ok_or("too many heads")?)
            .ok_or("too many rows")?;
        let entries = rows.checked_mul(wire.width).ok_or("too many keys")?;
        let bytes = |field: &str, text: &str| {
            STANDARD
                .decode(text)
                .map_err(|e| format!("attention map `{field}` is not base64: {e}"))
        };
        let u16s = |field: &str, text: &str, count: usize| -> Result<Vec<u16>, String> {
            let raw = bytes(field, text)?;
            if raw.len() != count * 2 {
                return Err(format!(
                    "attention map `{field}` holds {} bytes, {count} values need {}",
                    raw.len(),
                    count * 2
                ));
            }
            Ok(raw
                .chunks_exact(2)
                .map(|p| u16::from_le_bytes([p[0], p[1]]))
                .collect())
        };
        let weights = u16s("weights", &wire.weights, entries)?;
        let covered = u16s("covered", &wire.covered, rows)?;
        let raw = bytes("keys", &wire.keys)?;
        let mut keys = Vec::with_capacity(entries);
        let mut at = 0;
        while at < raw.len() {
            let (distance, used) = read_leb128(&raw[at..])
                .ok_or("attention map `keys` ends inside a number or holds one too large")?;
            at += used;
            let key = u64::try_from(wire.query)
                .ok()
                .and_then(|q| q.checked_sub(distance))
                .and_then(|k| u32::try_from(k).ok())
                .ok_or_else(|| {
                    format!(
                        "attention map key {distance} positions back from {} is before the sequence",
                        wire.query
                    )
                })?;
            keys.push(key);
        }
        if keys.len() != entries {
            return Err(format!(
                "attention map holds {} keys, {} layers of {} rows of {} need {entries}",
                keys.len(),
                wire.layers.len(),
                wire.heads + 2,
                wire.width
            ));
        }
        Ok(Self {
            query: wire.query,
            layers: wire.layers,
            heads: wire.heads,
            width: wire.width,
            keys,
            weights,
            covered,
        })
    }
}

fn write_leb128(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let low = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(low);
            return;
        }
        out.push(low | 0x80);
    }
}

/// The number at the start of `bytes` and the bytes it took; `None` when it is cut off or exceeds 64 bits.
fn read_leb128(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, &b) in bytes.iter().enumerate().take(10) {
        let part = u64::from(b & 0x7f);
        let shifted = part.checked_shl(7 * i as u32)?;
        if shifted >> (7 * i as u32) != part {
            return None;
        }
        v |= shifted;
        if b & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// Two layers of 2 heads (4 rows each: 2 heads, max, mean) of width 3, query 300.
    fn sample() -> AttentionMap {
        let mut map = AttentionMap::new(300, 2, 3);
        let keys: Vec<u32> = vec![300, 299, 0, 5, 200, 7, 300, 5, 0, 300, 0, 5];
        let weights = [
            0.5, 0.25, 0.125, 0.9, 0.05, 0.01, 0.9, 0.5, 0.125, 0.3, 0.2, 0.1,
        ];
        let covered = [0.875, 0.96, 1.525, 0.6];
        map.push_layer(3, &keys, &weights, &covered).unwrap();
        let keys: Vec<u32> = keys.iter().map(|k| k / 2).collect();
        map.push_layer(7, &keys, &weights, &covered).unwrap();
        map
    }

    #[test]
    fn round_trips_through_json_and_gives_its_rows_back() {
        let map = sample();
        let json = serde_json::to_string(&map).unwrap();
        let back: AttentionMap = serde_json::from_str(&json).unwrap();
        assert_eq!(back, map);
        assert_eq!(back.layers(), &[3, 7]);
        let mean = back.row(0, 3).unwrap();
        assert_eq!(mean.keys, vec![300, 0, 5]);
        assert!((mean.weights[0] - 0.3).abs() < 1e-5);
        assert!((mean.covered - 0.6).abs() < 1e-5);
        // The max row's total is no distribution and may pass 1; it is kept clamped.
        assert_eq!(back.row(0, 2).unwrap().covered, 1.0);
        assert_eq!(back.row(1, 0).unwrap().keys, vec![150, 149, 0]);
        assert!(back.row(2, 0).is_none() && back.row(0, 4).is_none());
    }

    #[test]
    fn keys_are_one_byte_when_recent_and_weights_are_finer_than_version_1() {
        let mut map = AttentionMap::new(100_000, 1, 2);
        map.push_layer(
            0,
            &[99_999, 99_990, 0, 1, 5, 2],
            &[0.3, 0.2, 0.1, 0.0, 0.2, 0.1],
            &[0.5, 0.1, 0.3],
        )
        .unwrap();
        let wire = Wire::from(map.clone());
        // Distances 1, 10, 100000, 99999, 99995, 99998: one byte, one byte, then three each.
        assert_eq!(STANDARD.decode(&wire.keys).unwrap().len(), 2 + 4 * 3);
        let back = AttentionMap::try_from(wire).unwrap();
        assert_eq!(back, map);
        for w in [0.0, 1e-4, 0.0123, 0.4831, 1.0] {
            assert!((dequantize(quantize(w)) - w).abs() <= 0.5 / WEIGHT_SCALE);
        }
    }

    #[test]
    fn malformed_maps_are_errors_not_panics() {
        let good = serde_json::to_value(sample()).unwrap();
        let broken = |field: &str, value: serde_json::Value| {
            let mut v = good.clone();
            v[field] = value;
            serde_json::from_value::<AttentionMap>(v)
                .unwrap_err()
                .to_string()
        };
        assert!(broken("keys", "!!".into()).contains("base64"));
        assert!(broken("weights", "AAAA".into()).contains("`weights` holds 3 bytes"));
        assert!(broken("width", 4.into()).contains("need"));
        assert!(broken("heads", usize::MAX.into()).contains("too many"));
        assert!(broken("query", 10.into()).contains("before the sequence"));
        // A number cut off in the middle.
        assert!(broken("keys", STANDARD.encode([0x80u8]).into()).contains("ends inside"));
        let mut map = AttentionMap::new(4, 0, 1);
        assert!(
            map.push_layer(0, &[5, 0], &[1.0, 1.0], &[1.0, 1.0])
                .is_err()
        );
        assert!(map.push_layer(0, &[1], &[1.0], &[1.0, 1.0]).is_err());
        assert!(map.layers().is_empty());
    }
}
