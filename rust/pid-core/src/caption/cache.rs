//! A bounded LRU of caption features, keyed by (encoder identity, caption) (pid_spec §8.4).
//!
//! The identity fingerprints everything the features depend on (weight, config and
//! tokenizer files by path, size and modification time, plus the softcap switch), so one
//! cache may serve several encoders and different weights never share an entry. Because
//! reopening unchanged files yields the same identity, a cache can outlive its encoder.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::Path;
use std::sync::Mutex;
use std::time::UNIX_EPOCH;

use candle_core::Tensor;

use crate::{Error, Result};

/// Fingerprint of a caption encoder: equal only for the same files and settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EncoderId(u64);

impl EncoderId {
    /// Hash each file's canonical path, size and modification time, then `settings`.
    pub fn of_files(files: &[&Path], settings: &str) -> Result<Self> {
        let mut h = DefaultHasher::new();
        for f in files {
            let meta = std::fs::metadata(f).map_err(|e| Error::io(*f, e))?;
            let path = f.canonicalize().map_err(|e| Error::io(*f, e))?;
            let mtime = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_nanos());
            (path, meta.len(), mtime).hash(&mut h);
        }
        settings.hash(&mut h);
        Ok(Self(h.finish()))
    }

    /// Hex form, for display and the Python binding.
    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

/// One caption's features `(300, D)` and how many of its tokens truncation dropped.
#[derive(Debug, Clone)]
pub struct CachedCaption {
    pub embeddings: Tensor,
    pub dropped: usize,
}

#[derive(Default)]
struct Lru {
    entries: HashMap<(EncoderId, String), (CachedCaption, u64)>,
    clock: u64,
    hits: u64,
    misses: u64,
}

/// Thread-safe LRU holding at most `capacity` captions (0 disables caching).
pub struct CaptionCache {
    capacity: usize,
    inner: Mutex<Lru>,
}

/// Hit and miss counts since creation, and the current size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub len: usize,
    pub capacity: usize,
}

impl CaptionCache {
    /// Each entry of gemma-2-2b-it features takes 300 x 2304 x 4 B = 2.8 MB.
    pub const DEFAULT_CAPACITY: usize = 32;

    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            inner: Mutex::new(Lru::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lru> {
        // The map stays consistent even if a holder panicked: every update is one insert/remove.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The entry for `(id, caption)`, marking it most recently used; counts a hit or a miss.
    pub fn get(&self, id: EncoderId, caption: &str) -> Option<CachedCaption> {
        let mut lru = self.lock();
        lru.clock += 1;
        let now = lru.clock;
        match lru.entries.get_mut(&(id, caption.to_string())) {
            Some((entry, used)) => {
                *used = now;
                let entry = entry.clone();
                lru.hits += 1;
                Some(entry)
            }
            None => {
                lru.misses += 1;
                None
            }
        }
    }

    /// Store an entry, evicting the least recently used ones beyond the capacity.
    pub fn insert(&self, id: EncoderId, caption: &str, entry: CachedCaption) {
        if self.capacity == 0 {
            return;
        }
        let mut lru = self.lock();
        lru.clock += 1;
        let now = lru.clock;
        lru.entries.insert((id, caption.to_string()), (entry, now));
        while lru.entries.len() > self.capacity {
            let oldest = lru
                .entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => lru.entries.remove(&k),
                None => break,
            };
        }
    }

    pub fn clear(&self) {
        self.lock().entries.clear();
    }

    pub fn stats(&self) -> CacheStats {
        let lru = self.lock();
        CacheStats {
            hits: lru.hits,
            misses: lru.misses,
            len: lru.entries.len(),
            capacity: self.capacity,
        }
    }
}

impl Default for CaptionCache {
    fn default() -> Self {
        Self::new(Self::DEFAULT_CAPACITY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn entry(v: f32) -> CachedCaption {
        CachedCaption {
            embeddings: Tensor::new(&[v], &Device::Cpu).expect("tensor"),
            dropped: 0,
        }
    }

    #[test]
    fn evicts_least_recently_used_and_keys_by_encoder() {
        let cache = CaptionCache::new(2);
        let (a, b) = (EncoderId(1), EncoderId(2));
        cache.insert(a, "x", entry(1.0));
        cache.insert(b, "x", entry(2.0));
        assert!(cache.get(a, "x").is_some()); // a/x is now the most recent
        cache.insert(a, "y", entry(3.0)); // evicts b/x
        assert!(cache.get(b, "x").is_none());
        assert!(cache.get(a, "x").is_some() && cache.get(a, "y").is_some());
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.misses, stats.len), (3, 1, 2));
    }

    #[test]
    fn zero_capacity_stores_nothing() {
        let cache = CaptionCache::new(0);
        cache.insert(EncoderId(1), "x", entry(1.0));
        assert_eq!(cache.stats().len, 0);
    }
}
