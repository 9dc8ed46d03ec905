//! Process-wide string interning for the few distinct strings every cell repeats:
//! node ids, component keys and type URLs. A cell stores 4-byte symbols instead of
//! three heap strings, which is most of what keeps a track under 1 KiB.
//! Symbols are never freed: the set of such strings is small and bounded in practice.
use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::LazyLock;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct Sym(u32);

struct Interner {
    ids: HashMap<&'static str, Sym>,
    strings: Vec<&'static str>,
}

static INTERNER: LazyLock<RwLock<Interner>> =
    LazyLock::new(|| RwLock::new(Interner { ids: HashMap::new(), strings: Vec::new() }));

pub fn intern(s: &str) -> Sym {
    if let Some(&sym) = INTERNER.read().ids.get(s) {
        return sym;
    }
    let mut table = INTERNER.write();
    if let Some(&sym) = table.ids.get(s) {
        return sym;
    }
    let leaked: &'static str = Box::leak(s.to_owned().into_boxed_str());
    let sym = Sym(table.strings.len() as u32);
    table.strings.push(leaked);
    table.ids.insert(leaked, sym);
    sym
}

impl Sym {
    pub fn as_str(self) -> &'static str {
        INTERNER.read().strings[self.0 as usize]
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
}
