//! Per-subject concurrency caps (watch streams per user, per upload token; uploads per user):
//! a [`Tally`] hands out [`Slot`]s up to a limit per key, and a slot frees itself when dropped.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
};

/// At most `max` slots at once per key.
#[derive(Debug, Clone)]
pub struct Tally {
    max: usize,
    taken: Arc<Mutex<HashMap<String, usize>>>,
}

/// One of a key's slots; given back when dropped.
#[derive(Debug)]
pub struct Slot {
    key: String,
    taken: Arc<Mutex<HashMap<String, usize>>>,
}

impl Tally {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            taken: Arc::default(),
        }
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// A slot of `key`, or `None` when it has `max` already.
    pub fn take(&self, key: &str) -> Option<Slot> {
        let mut taken = self.taken.lock().unwrap_or_else(PoisonError::into_inner);
        let count = taken.entry(key.to_owned()).or_default();
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(Slot {
            key: key.to_owned(),
            taken: Arc::clone(&self.taken),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut taken = self.taken.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = taken.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                taken.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_capped_per_key_and_freed_on_drop() {
        let tally = Tally::new(2);
        let a = tally.take("alice").expect("first");
        let b = tally.take("alice").expect("second");
        assert!(tally.take("alice").is_none(), "a third is over");
        let _bob = tally.take("bob").expect("another key is apart");
        drop(a);
        let _c = tally.take("alice").expect("freed");
        drop(b);
        assert_eq!(tally.taken.lock().unwrap().get("alice"), Some(&1));
    }
}
