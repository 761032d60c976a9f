//! The one work queue the trainer uses for CPU-bound jobs (tuning trials,
//! tract scoring): scoped threads take items in order from a shared counter.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Runs `work(index, item)` for every item on up to `threads` threads and
/// returns the results in item order. A panicking worker propagates.
pub fn map<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    work: impl Fn(usize, &T) -> R + Sync,
) -> Vec<R> {
    let next = AtomicUsize::new(0);
    let slots: Vec<Mutex<Option<R>>> = items.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..threads.clamp(1, items.len().max(1)) {
            scope.spawn(|| {
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = items.get(index) else { break };
                    let result = work(index, item);
                    if let Ok(mut slot) = slots[index].lock() {
                        *slot = Some(result);
                    }
                }
            });
        }
    });
    // Every slot is filled: the scope joined all workers and a panic would have propagated.
    slots
        .into_iter()
        .filter_map(|slot| slot.into_inner().ok().flatten())
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn results_keep_item_order() {
        let items: Vec<u64> = (0..100).collect();
        let out = super::map(&items, 3, |i, &x| (i as u64, x * x));
        assert_eq!(out, items.iter().map(|&x| (x, x * x)).collect::<Vec<_>>());
        assert!(super::map(&[] as &[u8], 2, |_, &x| x).is_empty());
    }
}
