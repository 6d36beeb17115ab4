//! Answers to StatefulSet and Pod admissions, kept for the next request that asks the same.
//!
//! The operator's repeated UPDATEs of a StatefulSet, and a pod recreated under its own name,
//! get the same patch: rendering, diffing and encoding it again (most of a review's cost)
//! gives the same bytes. An answer is kept under everything the mutation reads, compared
//! byte for byte on a hit (a hash only picks the bucket):
//!
//! - the kind of object (StatefulSet or Pod) and the operation;
//! - the KasprApp as the lookup returned it, serialized (its uid and resourceVersion are in
//!   it, and so is what builds add to it, which changes without a new resourceVersion);
//! - of the object: `metadata.name`, `generateName`, `namespace`, `labels`, `annotations`,
//!   `ownerReferences`, and the text of `spec` as it came (a changed byte misses);
//! - of the oldObject of a StatefulSet UPDATE: the text of `spec` (the previous template);
//! - the render configuration, compared whole.
//!
//! What the mutation does not read (status, resourceVersion, managedFields, the request's uid)
//! is left out, so that those UPDATEs and pods hit. The request's uid is put into the answer
//! when it is handed out. The cache is bounded by bytes (`serve --answer-cache-bytes`, by default
//! [`AnswerCache::BUDGET_BYTES`]) and forgets its oldest answers first. It is one map behind one mutex: a lookup holds the lock
//! for a hash and a comparison, far shorter than the review around it, and the webhook runs on
//! one or two cores; a concurrent map would add a dependency without a measured need.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use serde_json::Value;

use super::read::{self, Keep};
use super::{AdmissionRequest, Decision};
use crate::config::RenderConfig;

/// The inputs of one mutation, as bytes (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Key(Vec<u8>);

const OLD_SPEC: Keep = Keep::Keys(&[("spec", Keep::Raw(0))]);

impl Key {
    /// The key of `request`'s mutation for `kasprapp`; `None` when part of it cannot be read
    /// (the answer is then computed and not kept).
    pub(super) fn of(request: &AdmissionRequest, kasprapp: &Value, is_pod: bool) -> Option<Key> {
        let spec = request.spec_json.as_deref().map(|s| s.get().as_bytes());
        let mut bytes = Vec::with_capacity(spec.map_or(0, <[u8]>::len) + 2048);
        bytes.push(if is_pod { b'P' } else { b'S' });
        part(&mut bytes, Some(request.operation.as_bytes()));
        json_part(&mut bytes, Some(kasprapp))?;
        json_part(&mut bytes, request.view.get("metadata"))?;
        part(&mut bytes, spec);
        if !is_pod && request.operation == "UPDATE" {
            match request.old_object_json.as_deref() {
                Some(old) => {
                    let mut raws = [None];
                    read::read(old.get().as_bytes(), OLD_SPEC, &mut raws).ok()?;
                    let [old_spec] = raws;
                    part(&mut bytes, old_spec.as_deref().map(|s| s.get().as_bytes()));
                }
                None => part(&mut bytes, None),
            }
        }
        Some(Key(bytes))
    }
}

/// Appends a part that may be absent, with its length, so parts cannot run into each other.
fn part(bytes: &mut Vec<u8>, value: Option<&[u8]>) {
    match value {
        None => bytes.push(0),
        Some(value) => {
            bytes.push(1);
            bytes.extend_from_slice(&(value.len() as u64).to_le_bytes());
            bytes.extend_from_slice(value);
        }
    }
}

fn json_part(bytes: &mut Vec<u8>, value: Option<&Value>) -> Option<()> {
    let Some(value) = value else {
        bytes.push(0);
        return Some(());
    };
    bytes.push(1);
    let at = bytes.len();
    bytes.extend_from_slice(&[0; 8]);
    serde_json::to_writer(&mut *bytes, value).ok()?;
    let len = (bytes.len() - at - 8) as u64;
    bytes[at..at + 8].copy_from_slice(&len.to_le_bytes());
    Some(())
}

/// Answers kept by the inputs of their mutation; shared by all requests of a server.
#[derive(Debug)]
pub struct AnswerCache {
    state: Mutex<State>,
    /// The most bytes kept; 0 keeps nothing (every request is answered from scratch).
    budget: usize,
}

impl Default for AnswerCache {
    fn default() -> Self {
        AnswerCache::with_budget(AnswerCache::BUDGET_BYTES)
    }
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<Arc<[u8]>, Entry, foldhash::fast::RandomState>,
    /// Oldest first, with the sequence number of the entry when it was queued.
    order: VecDeque<(Arc<[u8]>, u64)>,
    bytes: usize,
    next_sequence: u64,
    /// The render configurations seen, so an answer is only handed out for its own.
    configs: Vec<RenderConfig>,
    hits: u64,
    misses: u64,
}

#[derive(Debug)]
struct Entry {
    config: usize,
    sequence: u64,
    weight: usize,
    /// The answer, without a uid.
    answer: Decision,
}

/// A kept answer.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Answer(Decision);

impl Answer {
    /// The answer to the request with `uid`.
    pub(super) fn for_uid(mut self, uid: &str) -> Decision {
        uid.clone_into(&mut self.0.uid);
        self.0
    }
}

/// How often the cache answered, for tests and benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub entries: usize,
    pub bytes: usize,
}

impl AnswerCache {
    /// The default for the most bytes of answers (patch, its base64, messages) and keys kept:
    /// about 40 StatefulSet answers of 100 KB (`serve --answer-cache-bytes`).
    pub const BUDGET_BYTES: usize = 4 << 20;

    pub fn new() -> Self {
        AnswerCache::default()
    }

    /// A cache keeping at most `budget` bytes; 0 keeps nothing.
    pub fn with_budget(budget: usize) -> Self {
        AnswerCache {
            state: Mutex::default(),
            budget,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic under the lock leaves a consistent map (every change is one insert or
        // remove), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn get(&self, key: &Key, config: &RenderConfig) -> Option<Answer> {
        let mut state = self.lock();
        let config = state.configs.iter().position(|c| c == config);
        let found = state
            .entries
            .get(key.0.as_slice())
            .filter(|e| Some(e.config) == config)
            .map(|e| Answer(e.answer.clone()));
        match found {
            Some(_) => state.hits += 1,
            None => state.misses += 1,
        }
        found
    }

    pub(super) fn insert(&self, key: Key, config: &RenderConfig, decision: &Decision) {
        let mut answer = decision.clone();
        answer.uid.clear();
        let weight = key.0.len()
            + answer
                .patch
                .as_ref()
                .map_or(0, |p| p.json().len() + p.base64().len())
            + answer.message.as_ref().map_or(0, String::len)
            + answer.warnings.iter().map(String::len).sum::<usize>()
            + 128;
        if weight > self.budget {
            return;
        }
        let mut state = self.lock();
        let config = match state.configs.iter().position(|c| c == config) {
            Some(i) => i,
            None => {
                // One configuration per server in practice; a few more are kept (tests), and
                // past that everything is forgotten rather than compared with a long list.
                if state.configs.len() >= 4 {
                    *state = State::default();
                }
                state.configs.push(config.clone());
                state.configs.len() - 1
            }
        };
        let sequence = state.next_sequence;
        state.next_sequence += 1;
        let key: Arc<[u8]> = Arc::from(key.0);
        let entry = Entry {
            config,
            sequence,
            weight,
            answer,
        };
        if let Some(old) = state.entries.insert(Arc::clone(&key), entry) {
            state.bytes -= old.weight;
        }
        state.bytes += weight;
        state.order.push_back((key, sequence));
        if state.order.len() > 2 * state.entries.len() + 64 {
            let State { order, entries, .. } = &mut *state;
            order.retain(|(key, sequence)| {
                entries.get(key).is_some_and(|e| e.sequence == *sequence)
            });
        }
        while state.bytes > self.budget {
            let Some((oldest, sequence)) = state.order.pop_front() else {
                break;
            };
            // A key answered again was queued again; only its newest entry counts.
            if state
                .entries
                .get(&oldest)
                .is_some_and(|e| e.sequence == sequence)
                && let Some(removed) = state.entries.remove(&oldest)
            {
                state.bytes -= removed.weight;
            }
        }
    }

    pub fn stats(&self) -> CacheStats {
        let state = self.lock();
        CacheStats {
            hits: state.hits,
            misses: state.misses,
            entries: state.entries.len(),
            bytes: state.bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::{EncodedPatch, Outcome};

    fn decision(patch_bytes: usize) -> Decision {
        Decision {
            uid: "u".into(),
            allowed: true,
            message: None,
            warnings: vec!["w".into()],
            patch: Some(EncodedPatch::new(vec![b'x'; patch_bytes])),
            outcome: Outcome::Patched,
        }
    }

    #[test]
    fn the_cache_stays_within_its_budget_forgetting_the_oldest_first() {
        let cache = AnswerCache::new();
        let config = RenderConfig::default();
        // Each answer weighs about 230 KB (the patch and its base64).
        for i in 0..100u8 {
            cache.insert(Key(vec![i]), &config, &decision(100_000));
            assert!(cache.stats().bytes <= AnswerCache::BUDGET_BYTES);
        }
        let stats = cache.stats();
        assert!(stats.entries > 10 && stats.entries < 30, "{stats:?}");
        assert!(cache.get(&Key(vec![0]), &config).is_none());
        let newest = cache.get(&Key(vec![99]), &config).expect("kept");
        assert_eq!(newest.for_uid("v").uid, "v");
        // Another configuration does not see it, and its own answers are kept apart.
        let other = RenderConfig {
            revision: Some("other".into()),
            ..RenderConfig::default()
        };
        assert!(cache.get(&Key(vec![99]), &other).is_none());
        // An answer larger than the whole budget is not kept.
        cache.insert(
            Key(vec![200]),
            &config,
            &decision(AnswerCache::BUDGET_BYTES),
        );
        assert!(cache.get(&Key(vec![200]), &config).is_none());
    }

    #[test]
    fn a_cache_without_a_budget_keeps_nothing() {
        let cache = AnswerCache::with_budget(0);
        let config = RenderConfig::default();
        cache.insert(Key(vec![1]), &config, &decision(10));
        assert!(cache.get(&Key(vec![1]), &config).is_none());
        let stats = cache.stats();
        assert_eq!((stats.entries, stats.bytes, stats.misses), (0, 0, 1));
    }

    #[test]
    fn answering_the_same_key_again_keeps_one_entry() {
        let cache = AnswerCache::new();
        let config = RenderConfig::default();
        for _ in 0..1000 {
            cache.insert(Key(vec![1]), &config, &decision(10));
        }
        let stats = cache.stats();
        assert_eq!(stats.entries, 1);
        assert!(cache.lock().order.len() <= 66);
    }
}
