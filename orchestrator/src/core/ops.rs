//! The book of operations: every deploy/start/stop/remove request from
//! issue to outcome, indexed so a device report touches only that device's
//! open operations, and bounded: finished operations beyond the newest
//! [`FINISHED_IN_MEMORY`] live only in redb (the service reads them back on
//! demand). Open operations are never evicted.

use std::collections::{BTreeSet, HashMap, VecDeque};

use drover_shared::{DeviceId, Name};

use crate::core::records::OperationRecord;

/// Finished operations kept in memory for listing and lookups.
pub const FINISHED_IN_MEMORY: usize = 20_000;

#[derive(Debug)]
pub struct OpBook {
    by_id: HashMap<String, OperationRecord>,
    /// Open (non-final) operations per device, by generation.
    open: HashMap<DeviceId, BTreeSet<(u64, String)>>,
    /// The newest generation of any operation per device and app, final or
    /// not: an open operation below it was overtaken.
    latest: HashMap<(DeviceId, Name), u64>,
    /// Finished operation ids, oldest first, for eviction.
    finished: VecDeque<String>,
    max_finished: usize,
}

impl Default for OpBook {
    fn default() -> Self {
        OpBook::with_capacity(FINISHED_IN_MEMORY)
    }
}

impl OpBook {
    pub fn with_capacity(max_finished: usize) -> OpBook {
        OpBook {
            by_id: HashMap::new(),
            open: HashMap::new(),
            latest: HashMap::new(),
            finished: VecDeque::new(),
            max_finished,
        }
    }

    /// Rebuilds the book from stored operations (any order).
    pub fn load(mut ops: Vec<OperationRecord>) -> OpBook {
        ops.sort_by_key(|o| (o.updated_at_ms, o.generation));
        let mut book = OpBook::default();
        for op in ops {
            book.insert(op);
        }
        book
    }

    /// Adds or replaces an operation, keeping the indexes right.
    pub fn insert(&mut self, op: OperationRecord) {
        let key = (op.device.clone(), op.app.clone());
        let latest = self.latest.entry(key).or_default();
        *latest = (*latest).max(op.generation);
        if let Some(old) = self.by_id.get(&op.id) {
            if !old.status.is_final() {
                if let Some(set) = self.open.get_mut(&old.device) {
                    set.remove(&(old.generation, old.id.clone()));
                }
            }
        }
        if op.status.is_final() {
            self.finished.push_back(op.id.clone());
        } else {
            self.open
                .entry(op.device.clone())
                .or_default()
                .insert((op.generation, op.id.clone()));
        }
        self.by_id.insert(op.id.clone(), op);
        self.evict();
    }

    fn evict(&mut self) {
        while self.finished.len() > self.max_finished {
            let Some(id) = self.finished.pop_front() else {
                break;
            };
            if self.by_id.get(&id).is_some_and(|o| o.status.is_final()) {
                self.by_id.remove(&id);
            }
        }
        self.open.retain(|_, s| !s.is_empty());
    }

    /// Drops an operation that was never stored (its write failed).
    pub fn forget(&mut self, id: &str) {
        if let Some(op) = self.by_id.remove(id) {
            if let Some(set) = self.open.get_mut(&op.device) {
                set.remove(&(op.generation, op.id.clone()));
            }
            self.finished.retain(|f| f != id);
        }
    }

    pub fn get(&self, id: &str) -> Option<&OperationRecord> {
        self.by_id.get(id)
    }

    /// Applies `f` to an open operation; if that made it final, it moves to
    /// the finished list. Returns the updated operation when `f` changed it.
    pub fn update(
        &mut self,
        id: &str,
        f: impl FnOnce(&mut OperationRecord) -> bool,
    ) -> Option<OperationRecord> {
        let op = self.by_id.get_mut(id)?;
        if op.status.is_final() || !f(op) {
            return None;
        }
        let op = op.clone();
        if op.status.is_final() {
            if let Some(set) = self.open.get_mut(&op.device) {
                set.remove(&(op.generation, op.id.clone()));
            }
            self.finished.push_back(op.id.clone());
            self.evict();
        }
        Some(op)
    }

    /// Ids of a device's open operations at or below `generation`.
    pub fn open_up_to(&self, device: &DeviceId, generation: u64) -> Vec<String> {
        self.open
            .get(device)
            .map(|s| {
                s.range(..=(generation, String::from("\u{10ffff}")))
                    .map(|(_, id)| id.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The newest generation any operation gave this app on this device.
    pub fn latest_generation(&self, device: &DeviceId, app: &Name) -> u64 {
        self.latest
            .get(&(device.clone(), app.clone()))
            .copied()
            .unwrap_or(0)
    }

    /// Newest first, from what is in memory.
    pub fn list(&self, device: Option<&DeviceId>, limit: usize) -> Vec<OperationRecord> {
        let mut ops: Vec<&OperationRecord> = self
            .by_id
            .values()
            .filter(|o| device.is_none_or(|d| &o.device == d))
            .collect();
        ops.sort_by(|a, b| {
            b.created_at_ms
                .cmp(&a.created_at_ms)
                .then(b.generation.cmp(&a.generation))
        });
        ops.into_iter().take(limit).cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::OpStatus;
    use drover_shared::payload::Op;

    fn op(id: &str, generation: u64, status: OpStatus) -> OperationRecord {
        OperationRecord {
            id: id.into(),
            device: DeviceId::new("pi").expect("id"),
            app: Name::new("web").expect("name"),
            op: Op::Deploy,
            generation,
            status,
            detail: String::new(),
            progress: None,
            created_at_ms: generation,
            updated_at_ms: generation,
        }
    }

    #[test]
    fn finished_operations_are_bounded_and_open_ones_kept() {
        let mut b = OpBook::with_capacity(3);
        b.insert(op("open", 1, OpStatus::Sent));
        for g in 2..10 {
            b.insert(op(&format!("f{g}"), g, OpStatus::Succeeded));
        }
        assert_eq!(b.len(), 4, "3 finished + 1 open");
        assert!(b.get("open").is_some());
        assert!(b.get("f2").is_none(), "oldest finished evicted");
        assert!(b.get("f9").is_some());
        assert_eq!(
            b.latest_generation(
                &DeviceId::new("pi").expect("id"),
                &Name::new("web").expect("n")
            ),
            9
        );
    }

    #[test]
    fn open_index_follows_updates() {
        let mut b = OpBook::default();
        let pi = DeviceId::new("pi").expect("id");
        b.insert(op("a", 1, OpStatus::Sent));
        b.insert(op("b", 2, OpStatus::Sent));
        b.insert(op("c", 3, OpStatus::Sent));
        assert_eq!(b.open_up_to(&pi, 2), vec!["a".to_string(), "b".to_string()]);
        let changed = b.update("a", |o| {
            o.status = OpStatus::Succeeded;
            true
        });
        assert!(changed.is_some());
        assert_eq!(b.open_up_to(&pi, 3), vec!["b".to_string(), "c".to_string()]);
        assert!(
            b.update("a", |_| true).is_none(),
            "final operations do not change"
        );
    }
}
