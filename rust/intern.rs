//! Process-wide string interning for the few distinct strings every cell repeats:
//! node ids, component keys and type URLs. A cell stores 4-byte symbols instead of
//! three heap strings, which is most of what keeps a track under 1 KiB.
//!
//! Reading a symbol's string takes no lock (the hot path compares them constantly):
//! strings live in an append-only table of fixed chunks, each filled once. Only
//! interning a new string takes the write lock; each thread also remembers the few it
//! met last, so the write path's repeated keys and type URLs take no lock at all.
//! Symbols are never freed: the set of such strings is small and bounded in practice (at
//! most `CHUNK * CHUNKS`).
use ahash::AHashMap;
use parking_lot::RwLock;
use std::sync::{LazyLock, OnceLock};

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct Sym(u32);

const CHUNK: usize = 1 << 12;
const CHUNKS: usize = 1 << 10;

type Chunk = Box<[OnceLock<&'static str>]>;
static STRINGS: [OnceLock<Chunk>; CHUNKS] = [const { OnceLock::new() }; CHUNKS];
static IDS: LazyLock<RwLock<AHashMap<&'static str, Sym>>> = LazyLock::new(|| RwLock::new(AHashMap::new()));

/// How many of a thread's recent strings it remembers: a write path meets the same few
/// keys and type URLs over and over.
const RECENT: usize = 8;

thread_local! {
    static RECENT_SYMS: std::cell::RefCell<Vec<(&'static str, Sym)>> = const { std::cell::RefCell::new(Vec::new()) };
}

pub fn intern(s: &str) -> Sym {
    // Most calls find a string this thread met just before: no lock, no hashing.
    let recent = RECENT_SYMS.with_borrow(|r| r.iter().find(|(known, _)| *known == s).map(|&(_, sym)| sym));
    if let Some(sym) = recent {
        return sym;
    }
    let sym = intern_shared(s);
    RECENT_SYMS.with_borrow_mut(|r| {
        if r.len() == RECENT {
            r.remove(0);
        }
        r.push((sym.as_str(), sym));
    });
    sym
}

fn intern_shared(s: &str) -> Sym {
    if let Some(&sym) = IDS.read().get(s) {
        return sym;
    }
    let mut ids = IDS.write();
    if let Some(&sym) = ids.get(s) {
        return sym;
    }
    let n = ids.len();
    assert!(n < CHUNK * CHUNKS, "more than {} distinct keys, type URLs and node ids", CHUNK * CHUNKS);
    let leaked: &'static str = Box::leak(s.to_owned().into_boxed_str());
    let chunk = STRINGS[n / CHUNK].get_or_init(|| (0..CHUNK).map(|_| OnceLock::new()).collect());
    chunk[n % CHUNK].set(leaked).expect("each slot is filled once, under the write lock");
    let sym = Sym(n as u32);
    ids.insert(leaked, sym);
    sym
}

/// The symbol of `s` if it was ever interned: a string no entity holds needs none, and
/// looking it up leaves nothing behind (a request's keys must not grow the table).
pub fn existing(s: &str) -> Option<Sym> {
    IDS.read().get(s).copied()
}

impl Sym {
    pub fn as_str(self) -> &'static str {
        let i = self.0 as usize;
        STRINGS[i / CHUNK].get().and_then(|chunk| chunk[i % CHUNK].get()).expect("a Sym is only made by intern")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_string_same_symbol() {
        assert_eq!(intern("position"), intern("position"));
        assert_ne!(intern("position"), intern("velocity"));
        assert_eq!(intern("velocity").as_str(), "velocity");
    }

    #[test]
    fn interning_from_threads_agrees() {
        let handles: Vec<_> = (0..4)
            .map(|_| std::thread::spawn(|| (0..5000).map(|i| intern(&format!("k{i}"))).collect::<Vec<_>>()))
            .collect();
        let all: Vec<Vec<Sym>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert!(all.windows(2).all(|w| w[0] == w[1]));
        assert_eq!(all[0][4321].as_str(), "k4321");
    }
}
