//! A tiny `--key value` parser. Every scenario reads its options through [`Args`], and
//! [`Args::finish`] rejects options nobody read, so a typo fails loudly instead of silently
//! benchmarking the default.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;

pub struct Args {
    values: BTreeMap<String, String>,
    used: RefCell<BTreeSet<String>>,
}

impl Args {
    /// Parses `--key value` and `--key=value` pairs.
    pub fn parse(words: impl IntoIterator<Item = String>) -> Result<Args, String> {
        let mut values = BTreeMap::new();
        let mut words = words.into_iter();
        while let Some(word) = words.next() {
            let Some(key) = word.strip_prefix("--") else {
                return Err(format!("unexpected argument {word:?}"));
            };
            let (key, value) = match key.split_once('=') {
                Some((k, v)) => (k.to_owned(), v.to_owned()),
                None => {
                    let value = words
                        .next()
                        .ok_or_else(|| format!("--{key} needs a value"))?;
                    (key.to_owned(), value)
                }
            };
            values.insert(key, value);
        }
        Ok(Args {
            values,
            used: RefCell::new(BTreeSet::new()),
        })
    }

    pub fn opt(&self, key: &str) -> Option<String> {
        self.used.borrow_mut().insert(key.to_owned());
        self.values.get(key).cloned()
    }

    pub fn get<T: FromStr>(&self, key: &str, default: T) -> Result<T, String> {
        match self.opt(key) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| format!("--{key}: cannot parse {v:?}")),
        }
    }

    pub fn string(&self, key: &str, default: &str) -> String {
        self.opt(key).unwrap_or_else(|| default.to_owned())
    }

    /// Fails on options that no scenario read.
    pub fn finish(&self) -> Result<(), String> {
        let used = self.used.borrow();
        let unknown: Vec<_> = self.values.keys().filter(|k| !used.contains(*k)).collect();
        if unknown.is_empty() {
            Ok(())
        } else {
            Err(format!("unknown options: {unknown:?}"))
        }
    }
}
