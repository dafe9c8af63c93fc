//! Weight storage on huge pages. Decoding reads every weight once per token, 98 MB in 4 KB pages: each page
//! needs its own address translation, and under virtualisation (two-level page tables) those walks measured
//! close to half of a decode step on one host here. `QuantMatrix::pack` moves a model's blocks, in the order
//! the forward reads them, into one anonymous mapping advised for transparent huge pages (2 MB), so the walks
//! become rare.
//! Where the advice is not available (not Linux, THP off) the mapping works as plain memory; where even the
//! mapping fails, the blocks stay where they were.

use std::ops::Deref;
use std::sync::Arc;

use bytemuck::Pod;
use memmap2::MmapMut;

/// The size of a transparent huge page on x86-64 and most of arm64: a mapping whose length is a multiple of it
/// is placed on a huge-page boundary.
const HUGE_PAGE: usize = 2 << 20;
/// Each buffer starts on a cache line.
const ALIGN: usize = 64;

/// An immutable array of blocks: its own `Vec` until `QuantMatrix::pack` moves it into a shared mapping.
pub struct BlockBuffer<T> {
    storage: Storage<T>,
}

enum Storage<T> {
    Owned(Vec<T>),
    Packed {
        arena: Arc<MmapMut>,
        offset: usize,
        len: usize,
    },
}

impl<T: Pod> BlockBuffer<T> {
    fn bytes(&self) -> &[u8] {
        bytemuck::cast_slice(self)
    }
}

impl<T: Pod> FromIterator<T> for BlockBuffer<T> {
    fn from_iter<I: IntoIterator<Item = T>>(items: I) -> Self {
        Self {
            storage: Storage::Owned(items.into_iter().collect()),
        }
    }
}

impl<T: Pod> Deref for BlockBuffer<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        match &self.storage {
            Storage::Owned(items) => items,
            // `ArenaWriter` placed the `len` items at `offset`, a multiple of 64 from the mapping's
            // page-aligned start.
            Storage::Packed { arena, offset, len } => {
                bytemuck::cast_slice(&arena[*offset..*offset + len * std::mem::size_of::<T>()])
            }
        }
    }
}

impl<T: Pod> Clone for BlockBuffer<T> {
    fn clone(&self) -> Self {
        self.iter().copied().collect()
    }
}

impl<T: Pod + PartialEq> PartialEq for BlockBuffer<T> {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl<T> std::fmt::Debug for BlockBuffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.storage {
            Storage::Owned(items) => write!(f, "BlockBuffer({} blocks)", items.len()),
            Storage::Packed { len, offset, .. } => {
                write!(f, "BlockBuffer({len} blocks packed at {offset})")
            }
        }
    }
}

/// Writes buffers one after another into a fresh mapping advised for huge pages. Each buffer gives up its own
/// blocks as it is written (so a model is never held twice), and points at the arena once it is finished.
pub(crate) struct ArenaWriter {
    map: MmapMut,
    at: usize,
}

/// Where [`ArenaWriter::write`] put a buffer's blocks.
pub(crate) struct Written {
    offset: usize,
    len: usize,
}

impl ArenaWriter {
    /// Room for `bytes` (what [`Self::room_for`] says the buffers need), or `None` if the mapping fails.
    pub fn new(bytes: usize) -> Option<Self> {
        let map = MmapMut::map_anon(bytes.max(1).div_ceil(HUGE_PAGE) * HUGE_PAGE).ok()?;
        // Advice before the first write, so the pages are huge from their first fault. Refused advice (THP
        // off) leaves ordinary pages, which work the same.
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage);
        Some(Self { map, at: 0 })
    }

    /// The bytes `buffer` takes in an arena.
    pub fn room_for<T: Pod>(buffer: &BlockBuffer<T>) -> usize {
        buffer.bytes().len().div_ceil(ALIGN) * ALIGN
    }

    /// Copies `buffer` in and empties it until [`place`] points it at the finished arena. `None` (the arena
    /// is full) leaves the buffer as it was.
    pub fn write<T: Pod>(&mut self, buffer: &mut BlockBuffer<T>) -> Option<Written> {
        let bytes = buffer.bytes();
        let offset = self.at;
        self.map
            .get_mut(offset..offset + bytes.len())?
            .copy_from_slice(bytes);
        self.at += Self::room_for(buffer);
        let len = buffer.len();
        buffer.storage = Storage::Owned(Vec::new());
        Some(Written { offset, len })
    }

    pub fn finish(self) -> Arc<MmapMut> {
        Arc::new(self.map)
    }
}

/// Points `buffer`, emptied by [`ArenaWriter::write`], at its blocks in the finished `arena`.
pub(crate) fn place<T: Pod>(buffer: &mut BlockBuffer<T>, arena: &Arc<MmapMut>, written: Written) {
    buffer.storage = Storage::Packed {
        arena: arena.clone(),
        offset: written.offset,
        len: written.len,
    };
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn packed_buffers_hold_what_they_held() {
        let words: Vec<u32> = (0..1_000_000).map(|i| i * 7).collect();
        let triples: Vec<[u8; 3]> = (0..1001u32).map(|i| [i as u8, 1, 2]).collect();
        let mut a: BlockBuffer<u32> = words.iter().copied().collect();
        let mut b: BlockBuffer<[u8; 3]> = triples.iter().copied().collect();
        let mut writer =
            ArenaWriter::new(ArenaWriter::room_for(&a) + ArenaWriter::room_for(&b)).unwrap();
        let (at_a, at_b) = (writer.write(&mut a).unwrap(), writer.write(&mut b).unwrap());
        assert_eq!(at_b.offset % ALIGN, 0);
        assert!(a.is_empty(), "a written buffer gives up its own blocks");
        let arena = writer.finish();
        place(&mut a, &arena, at_a);
        place(&mut b, &arena, at_b);
        assert!(format!("{b:?}").contains("packed"));
        assert_eq!(&*a, &words[..]);
        assert_eq!(&*b, &triples[..]);
        assert_eq!(a.clone(), a);
    }
}
