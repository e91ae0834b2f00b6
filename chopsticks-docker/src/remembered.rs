//! What this process already learned about an Engine, so later tunnels skip
//! the requests that would find it out again.

use std::sync::{Mutex, MutexGuard};

/// A bounded set of string pairs; the oldest are forgotten first.
pub(crate) struct Remembered {
    pairs: Mutex<Vec<(String, String)>>,
    limit: usize,
}

impl Remembered {
    pub(crate) const fn new(limit: usize) -> Remembered {
        Remembered {
            pairs: Mutex::new(Vec::new()),
            limit,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<(String, String)>> {
        self.pairs
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    pub(crate) fn contains(&self, first: &str, second: &str) -> bool {
        self.lock()
            .iter()
            .any(|(known_first, known_second)| known_first == first && known_second == second)
    }

    pub(crate) fn insert(&self, first: &str, second: &str) {
        let mut pairs = self.lock();
        if pairs.len() >= self.limit {
            pairs.remove(0);
        }
        pairs.push((first.to_string(), second.to_string()));
    }
}
