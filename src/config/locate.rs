//! Maps a config key path such as `routes[2].match.path_regex` to a line and
//! column in the YAML source.
//!
//! Every config error is reported as `FILE:LINE:COLUMN: message`. serde gives
//! positions for syntax and type errors, but checks that run after
//! deserialization only know the key path; this module fills that gap by
//! re-reading the source as a yaml-rust2 event stream, which carries positions.

use std::collections::HashMap;
use std::fmt::Write as _;

use yaml_rust2::parser::{Event, Parser};

/// A position in the source; `line` and `column` are both 1-based, and the
/// column counts characters, not bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

/// Positions of every mapping key and sequence item of the first document,
/// by key path (`listen[0].addr`, `upstreams.users.lb`).
#[derive(Debug, Clone, Default)]
pub struct Locator {
    positions: HashMap<String, Pos>,
}

/// One open container; `base` is the length of its own path in the path buffer.
enum Frame {
    Map {
        base: usize,
        next: MapNext,
        /// Set for a mapping that is a sequence item: yaml-rust2 marks a block
        /// mapping's start after its first key, so that key's position may be
        /// the better position for the item.
        fix_item: bool,
    },
    Seq {
        base: usize,
        next_index: usize,
    },
}

#[derive(Clone, Copy)]
enum MapNext {
    Key,
    Value,
    /// The value of a key that is not a scalar: it has no path.
    SkipValue,
}

impl Locator {
    /// Parses `source` and records where each key and item starts. A source
    /// that does not parse yields an empty Locator: serde reports that error
    /// with its own position.
    pub fn new(source: &str) -> Self {
        collect(source).map(|positions| Self { positions }).unwrap_or_default()
    }

    /// Position of the key (for mappings) or the item (for sequences) at
    /// `path`; if the path is missing, the position of its longest existing
    /// ancestor; None if no ancestor exists either.
    pub fn find(&self, path: &str) -> Option<Pos> {
        let mut path = path;
        loop {
            if let Some(pos) = self.positions.get(path) {
                return Some(*pos);
            }
            // `a.b[2].c` -> `a.b[2]` -> `a.b` -> `a`
            let cut = path.rfind(['.', '['])?;
            path = &path[..cut];
        }
    }
}

fn collect(source: &str) -> Option<HashMap<String, Pos>> {
    let mut parser = Parser::new_from_str(source);
    let mut positions: HashMap<String, Pos> = HashMap::new();
    let mut stack: Vec<Frame> = Vec::new();
    let mut path = String::new();
    // Nesting depth inside a node that has no path (a complex key or its value).
    let mut skip = 0usize;
    // Set after the first document: later ones are still parsed, so that a
    // syntax error anywhere still yields an empty Locator, but not recorded.
    let mut done = false;

    loop {
        let (event, mark) = parser.next_token().ok()?;
        let is_container = matches!(event, Event::MappingStart(..) | Event::SequenceStart(..));
        match event {
            Event::StreamEnd => break,
            Event::DocumentEnd => done = true,
            _ if done => {}
            Event::MappingEnd | Event::SequenceEnd => {
                if skip > 0 {
                    skip -= 1;
                } else {
                    stack.pop();
                }
            }
            Event::Scalar(..) | Event::Alias(..) | Event::MappingStart(..) | Event::SequenceStart(..) => {
                if skip > 0 {
                    if is_container {
                        skip += 1;
                    }
                    continue;
                }
                // yaml-rust2's Marker: line is 1-based, column 0-based (its doc
                // says both are 1-indexed; the tests pin the real behaviour).
                let pos = Pos { line: mark.line(), column: mark.col() + 1 };
                match stack.last_mut() {
                    None => path.clear(),
                    Some(Frame::Map { base, next, fix_item }) => match *next {
                        MapNext::Key => {
                            path.truncate(*base);
                            if std::mem::take(fix_item) {
                                if let Some(item) = positions.get_mut(path.as_str()) {
                                    if (pos.line, pos.column) < (item.line, item.column) {
                                        *item = pos;
                                    }
                                }
                            }
                            if let Event::Scalar(key, ..) = &event {
                                if *base > 0 {
                                    path.push('.');
                                }
                                path.push_str(key);
                                positions.entry(path.clone()).or_insert(pos);
                                *next = MapNext::Value;
                            } else {
                                *next = MapNext::SkipValue;
                                if is_container {
                                    skip = 1;
                                }
                            }
                            // A key never opens a frame of its own.
                            continue;
                        }
                        // The path buffer still holds this value's key.
                        MapNext::Value => *next = MapNext::Key,
                        MapNext::SkipValue => {
                            *next = MapNext::Key;
                            if is_container {
                                skip = 1;
                            }
                            continue;
                        }
                    },
                    Some(Frame::Seq { base, next_index }) => {
                        path.truncate(*base);
                        // Writing to a String cannot fail.
                        let _ = write!(path, "[{next_index}]");
                        *next_index += 1;
                        positions.entry(path.clone()).or_insert(pos);
                    }
                }
                if is_container {
                    let base = path.len();
                    let fix_item = matches!(stack.last(), Some(Frame::Seq { .. }));
                    stack.push(if matches!(event, Event::MappingStart(..)) {
                        Frame::Map { base, next: MapNext::Key, fix_item }
                    } else {
                        Frame::Seq { base, next_index: 0 }
                    });
                }
            }
            Event::Nothing | Event::StreamStart | Event::DocumentStart => {}
        }
    }
    Some(positions)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(line: usize, column: usize) -> Option<Pos> {
        Some(Pos { line, column })
    }

    const BLOCK: &str = "\
# luagate config
listen:
  - addr: 127.0.0.1:8080
    name: public
  -   addr: \"[::1]:8443\"
upstreams:
  users:
    lb: round_robin
    peers:
      - addr: 10.0.0.1:80
        weight: 2
      - addr: 10.0.0.2:80
routes:
  - match:
      path_regex: ^/a
    upstream: users
";

    #[test]
    fn block_mapping_keys_exact_positions() {
        let loc = Locator::new(BLOCK);
        assert_eq!(loc.find("listen"), at(2, 1));
        assert_eq!(loc.find("upstreams"), at(6, 1));
        assert_eq!(loc.find("upstreams.users"), at(7, 3));
        assert_eq!(loc.find("upstreams.users.lb"), at(8, 5));
        assert_eq!(loc.find("upstreams.users.peers"), at(9, 5));
        assert_eq!(loc.find("routes"), at(13, 1));
    }

    #[test]
    fn sequence_items_and_keys_inside_them() {
        let loc = Locator::new(BLOCK);
        // An item that is a block mapping starts at its first key.
        assert_eq!(loc.find("listen[0]"), at(3, 5));
        assert_eq!(loc.find("listen[0].addr"), at(3, 5));
        assert_eq!(loc.find("listen[0].name"), at(4, 5));
        assert_eq!(loc.find("listen[1]"), at(5, 7));
        assert_eq!(loc.find("listen[1].addr"), at(5, 7));
    }

    #[test]
    fn nested_sequences_of_mappings() {
        let loc = Locator::new(BLOCK);
        assert_eq!(loc.find("upstreams.users.peers[0].addr"), at(10, 9));
        assert_eq!(loc.find("upstreams.users.peers[0].weight"), at(11, 9));
        assert_eq!(loc.find("upstreams.users.peers[1].addr"), at(12, 9));
        assert_eq!(loc.find("routes[0].match"), at(14, 5));
        assert_eq!(loc.find("routes[0].match.path_regex"), at(15, 7));
        assert_eq!(loc.find("routes[0].upstream"), at(16, 5));
    }

    #[test]
    fn missing_path_falls_back_to_longest_ancestor() {
        let loc = Locator::new(BLOCK);
        assert_eq!(loc.find("routes[0].match.path_prefix"), at(14, 5));
        assert_eq!(loc.find("upstreams.users.peers[7].addr"), at(9, 5));
        assert_eq!(loc.find("upstreams.nope.lb"), at(6, 1));
        assert_eq!(loc.find("nothing.here"), None);
        assert_eq!(loc.find("[0]"), None);
        assert_eq!(loc.find(""), None);
    }

    #[test]
    fn flow_style_mappings_and_sequences() {
        let src = "\
listen: [{ addr: \"127.0.0.1:80\", name: a }, {addr: x}]
hosts: [a.example.com,  b.example.com]
upstream: {lb: random, peers: [ {addr: p1}, {addr: p2} ]}
";
        let loc = Locator::new(src);
        assert_eq!(loc.find("listen"), at(1, 1));
        // A flow mapping item starts at its brace.
        assert_eq!(loc.find("listen[0]"), at(1, 10));
        assert_eq!(loc.find("listen[0].addr"), at(1, 12));
        assert_eq!(loc.find("listen[0].name"), at(1, 34));
        assert_eq!(loc.find("listen[1]"), at(1, 45));
        assert_eq!(loc.find("listen[1].addr"), at(1, 46));
        assert_eq!(loc.find("hosts[0]"), at(2, 9));
        assert_eq!(loc.find("hosts[1]"), at(2, 25));
        assert_eq!(loc.find("upstream.lb"), at(3, 12));
        assert_eq!(loc.find("upstream.peers[1].addr"), at(3, 46));
    }

    #[test]
    fn nested_sequences_and_root_sequence() {
        let src = "- [a, b]\n- - c\n  - d: 1\n";
        let loc = Locator::new(src);
        assert_eq!(loc.find("[0]"), at(1, 3));
        assert_eq!(loc.find("[0][1]"), at(1, 7));
        assert_eq!(loc.find("[1]"), at(2, 3));
        assert_eq!(loc.find("[1][1]"), at(3, 5));
        assert_eq!(loc.find("[1][0]"), at(2, 5));
        assert_eq!(loc.find("[1][1].d"), at(3, 5));
    }

    #[test]
    fn columns_count_characters_and_quoted_keys_start_at_quote() {
        let src = "name: \"ünïcödé\"\nm: {é: 1, \"b\": 2}\n";
        let loc = Locator::new(src);
        assert_eq!(loc.find("m.é"), at(2, 5));
        assert_eq!(loc.find("m.b"), at(2, 11));
    }

    #[test]
    fn complex_keys_and_aliases_do_not_confuse_paths() {
        let src = "\
base: &b {x: 1}
? [k1, k2]
: {inner: 1}
other: *b
after: 2
";
        let loc = Locator::new(src);
        assert_eq!(loc.find("base.x"), at(1, 11));
        assert_eq!(loc.find("inner"), None);
        let mut paths: Vec<&str> = loc.positions.keys().map(String::as_str).collect();
        paths.sort_unstable();
        assert_eq!(paths, ["after", "base", "base.x", "other"]);
        assert_eq!(loc.find("other"), at(4, 1));
        assert_eq!(loc.find("after"), at(5, 1));
    }

    #[test]
    fn only_the_first_document_is_recorded() {
        let loc = Locator::new("a: 1\n---\nb: 2\n");
        assert_eq!(loc.find("a"), at(1, 1));
        assert_eq!(loc.find("b"), None);
    }

    #[test]
    fn duplicate_keys_keep_the_first() {
        let loc = Locator::new("a: 1\nb: 2\na: 3\n");
        assert_eq!(loc.find("a"), at(1, 1));
        assert_eq!(loc.find("b"), at(2, 1));
    }

    #[test]
    fn invalid_yaml_gives_an_empty_locator() {
        for src in ["a: [1, 2\nb: 3\n", "a: 1\n b: 2\n  - c\n", "a: 1\n---\nb: {\n"] {
            let loc = Locator::new(src);
            assert_eq!(loc.find("a"), None, "{src:?}");
        }
    }

    #[test]
    fn empty_and_scalar_documents() {
        assert_eq!(Locator::new("").find("a"), None);
        assert_eq!(Locator::new("just a string").find("a"), None);
    }
}
