//! Lua patterns, matched as LuaJIT's `lib_string.c` matches them (Lua 5.1
//! plus `%f` and `%z`), but in Rust and interruptible.
//!
//! LuaJIT's matcher is a C function: no instruction runs inside it, so no
//! count hook fires and the script budget cannot stop it, and its
//! backtracking is exponential in the number of `*`/`-`/`?` items (the
//! classic `("a"):rep(30):find(".-.-.-.-b")`). This one counts its steps and
//! asks, every [`CHECK_EVERY`] of them, whether the budget watchdog has
//! given up on the running slice; if so, it stops with [`Error::Stopped`]
//! and the phase fails as a runaway script does. Apart from that it is the
//! same algorithm step for step — captures, anchors, back references, the
//! depth limit and its error messages included — so scripts see the results
//! LuaJIT gives (checked against it in the tests).

/// Captures a pattern may have (`LUA_MAXCAPTURES`).
pub const MAX_CAPTURES: usize = 32;
/// Nesting of the recursive matcher before "pattern too complex" (`LJ_MAX_XLEVEL`).
const MAX_DEPTH: u32 = 200;
/// Steps between two looks at the budget: one look is a few atomic loads.
pub const CHECK_EVERY: u32 = 1 << 12;

const CAP_UNFINISHED: isize = -1;
const CAP_POSITION: isize = -2;

/// Why a match did not run to its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The pattern is malformed: LuaJIT's message for it.
    Pattern(&'static str),
    /// The budget watchdog gave up on the running script.
    Stopped,
}

pub type Result<T> = std::result::Result<T, Error>;

/// How an attempt inside the matcher failed: no match here (try on), or
/// the whole match is over — stopped, or a malformed pattern (LuaJIT's
/// messages). One byte, so that `Result<usize, Miss>` comes back in
/// registers from the recursive calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Miss {
    No,
    Stopped,
    MalformedPercent,
    MalformedBracket,
    MissingFrontierBracket,
    InvalidPatternCapture,
    Unbalanced,
    TooComplex,
    InvalidCaptureIndex,
    TooManyCaptures,
}

type Step = std::result::Result<usize, Miss>;

impl Miss {
    fn into_result(self) -> Result<Option<usize>> {
        Err(Error::Pattern(match self {
            Miss::No => return Ok(None),
            Miss::Stopped => return Err(Error::Stopped),
            Miss::MalformedPercent => "malformed pattern (ends with '%')",
            Miss::MalformedBracket => "malformed pattern (missing ']')",
            Miss::MissingFrontierBracket => "missing '[' after '%f' in pattern",
            Miss::InvalidPatternCapture => "invalid pattern capture",
            Miss::Unbalanced => "unbalanced pattern",
            Miss::TooComplex => "pattern too complex",
            Miss::InvalidCaptureIndex => INVALID_CAPTURE_INDEX,
            Miss::TooManyCaptures => "too many captures",
        }))
    }
}

pub const INVALID_CAPTURE_INDEX: &str = "invalid capture index";
const UNFINISHED_CAPTURE: &str = "unfinished capture";

/// `?` for a [`Step`] that must be a match to go on: a miss of any kind returns it.
macro_rules! hit {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(m) => return Err(m),
        }
    };
}

/// A recursive attempt: its match ends the caller's (returned), a plain
/// miss lets the caller try on, any other miss ends everything.
macro_rules! attempt {
    ($e:expr) => {
        match $e {
            Err(Miss::No) => {}
            other => return other,
        }
    };
}

/// What one single-character class of the pattern is, looked at once
/// before a run of bytes is tested against it.
#[derive(Clone, Copy)]
enum Single {
    Any,
    Byte(u8),
    Class(u8),
    /// `[set]`: the pattern index of its `[` and of its `]`.
    Set(usize, usize),
}

/// One capture of a successful match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capture {
    /// Bytes `start..end` of the subject.
    Text(usize, usize),
    /// A position capture `()`: 1-based.
    Position(usize),
}

/// A match of `pat` against `src` (`MatchState`). `src` is the whole
/// subject: matches start anywhere in it, `%f` looks at the byte before.
pub struct Matcher<'a> {
    src: &'a [u8],
    pat: &'a [u8],
    level: usize,
    depth: u32,
    capture: [(usize, isize); MAX_CAPTURES],
    steps: u32,
    stop: &'a dyn Fn() -> bool,
}

impl<'a> Matcher<'a> {
    /// `stop` is asked every [`CHECK_EVERY`] steps whether to give up.
    pub fn new(src: &'a [u8], pat: &'a [u8], stop: &'a dyn Fn() -> bool) -> Self {
        // LuaJIT reads the pattern as a C string: it ends at its first NUL.
        let pat = pat.iter().position(|&b| b == 0).map_or(pat, |n| &pat[..n]);
        Self { src, pat, level: 0, depth: 0, capture: [(0, 0); MAX_CAPTURES], steps: CHECK_EVERY, stop }
    }

    /// The pattern (up to its first NUL).
    pub fn pattern(&self) -> &'a [u8] {
        self.pat
    }

    /// Matches the pattern from byte `p` of it at byte `s` of the subject:
    /// the end of the match. Captures are those of this attempt.
    pub fn match_at(&mut self, s: usize, p: usize) -> Result<Option<usize>> {
        self.level = 0;
        self.depth = 0;
        match self.do_match(s, p) {
            Ok(e) => Ok(Some(e)),
            Err(miss) => miss.into_result(),
        }
    }

    /// Uses up `n` steps; every [`CHECK_EVERY`], asks whether to stop.
    #[inline(always)]
    fn tick(&mut self, n: u32) -> std::result::Result<(), Miss> {
        match self.steps.checked_sub(n) {
            Some(left) if left > 0 => self.steps = left,
            _ => {
                self.steps = CHECK_EVERY;
                if (self.stop)() {
                    return Err(Miss::Stopped);
                }
            }
        }
        Ok(())
    }

    /// Pattern byte `p`; 0 past the end, as C's terminating NUL.
    #[inline(always)]
    fn pat_at(&self, p: usize) -> u8 {
        self.pat.get(p).copied().unwrap_or(0)
    }

    /// Subject byte `s`; 0 at the end (where LuaJIT reads the string's NUL).
    #[inline(always)]
    fn src_at(&self, s: usize) -> u8 {
        self.src.get(s).copied().unwrap_or(0)
    }

    /// The captures of the last successful match, as `push_captures` gives
    /// them: none for `find` (`whole` None) if the pattern has none, else the
    /// whole match `whole` then.
    pub fn capture_count(&self, whole: Option<(usize, usize)>) -> usize {
        if self.level == 0 && whole.is_some() {
            1
        } else {
            self.level
        }
    }

    /// Capture `i` (`push_onecapture`); capture 0 is the whole match when the pattern has none.
    pub fn capture_at(&self, i: usize, whole: Option<(usize, usize)>) -> Result<Capture> {
        if i >= self.level {
            return match (i, whole) {
                (0, Some((s, e))) => Ok(Capture::Text(s, e)),
                _ => Err(Error::Pattern(INVALID_CAPTURE_INDEX)),
            };
        }
        let (init, len) = self.capture[i];
        match len {
            CAP_UNFINISHED => Err(Error::Pattern(UNFINISHED_CAPTURE)),
            CAP_POSITION => Ok(Capture::Position(init + 1)),
            len => Ok(Capture::Text(init, init + len as usize)),
        }
    }

    fn class_end(&self, mut p: usize) -> Step {
        let c = self.pat_at(p);
        p += 1;
        match c {
            b'%' => {
                if self.pat_at(p) == 0 {
                    return Err(Miss::MalformedPercent);
                }
                Ok(p + 1)
            }
            b'[' => {
                if self.pat_at(p) == b'^' {
                    p += 1;
                }
                loop {
                    if self.pat_at(p) == 0 {
                        return Err(Miss::MalformedBracket);
                    }
                    let c = self.pat_at(p);
                    p += 1;
                    if c == b'%' && self.pat_at(p) != 0 {
                        p += 1;
                    }
                    if self.pat_at(p) == b']' {
                        return Ok(p + 1);
                    }
                }
            }
            _ => Ok(p),
        }
    }

    /// `[set]` with `p` at its `[` and `ec` at its `]`.
    fn match_bracket(&self, c: u8, mut p: usize, ec: usize) -> bool {
        let mut sig = true;
        if self.pat_at(p + 1) == b'^' {
            sig = false;
            p += 1;
        }
        loop {
            p += 1;
            if p >= ec {
                return !sig;
            }
            if self.pat_at(p) == b'%' {
                p += 1;
                if match_class(c, self.pat_at(p)) {
                    return sig;
                }
            } else if self.pat_at(p + 1) == b'-' && p + 2 < ec {
                p += 2;
                if self.pat_at(p - 2) <= c && c <= self.pat_at(p) {
                    return sig;
                }
            } else if self.pat_at(p) == c {
                return sig;
            }
        }
    }

    /// The single-character class at `p` (ending before `ep`).
    #[inline(always)]
    fn single_at(&self, p: usize, ep: usize) -> Single {
        match self.pat_at(p) {
            b'.' => Single::Any,
            b'%' => Single::Class(self.pat_at(p + 1)),
            b'[' => Single::Set(p, ep - 1),
            x => Single::Byte(x),
        }
    }

    #[inline(always)]
    fn is(&self, c: u8, class: Single) -> bool {
        match class {
            Single::Any => true,
            Single::Byte(x) => x == c,
            Single::Class(cl) => match_class(c, cl),
            Single::Set(p, ec) => self.match_bracket(c, p, ec),
        }
    }

    /// How many bytes from `s` on are in `class` (what `max_expand` counts one by one).
    fn run_of(&mut self, s: usize, class: Single) -> Step {
        let rest = &self.src[s.min(self.src.len())..];
        let n = match class {
            Single::Any => rest.len(),
            Single::Byte(x) => rest.iter().take_while(|&&c| c == x).count(),
            _ => rest.iter().take_while(|&&c| self.is(c, class)).count(),
        };
        // Linear in the subject: the budget hears of it once the run is counted.
        self.tick(u32::try_from(n / 16).unwrap_or(u32::MAX))?;
        Ok(n)
    }

    fn do_match(&mut self, mut s: usize, mut p: usize) -> Step {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(Miss::TooComplex);
        }
        self.tick(1)?;
        // Each `continue` is the C version's `goto init` (a tail call).
        let r = loop {
            match self.pat_at(p) {
                b'(' => {
                    break if self.pat_at(p + 1) == b')' {
                        self.start_capture(s, p + 2, CAP_POSITION)
                    } else {
                        self.start_capture(s, p + 1, CAP_UNFINISHED)
                    };
                }
                b')' => break self.end_capture(s, p + 1),
                b'%' if self.pat_at(p + 1) == b'b' => {
                    s = hit!(self.match_balance(s, p + 2));
                    p += 4;
                }
                b'%' if self.pat_at(p + 1) == b'f' => {
                    p += 2;
                    if self.pat_at(p) != b'[' {
                        return Err(Miss::MissingFrontierBracket);
                    }
                    let ep = self.class_end(p)?;
                    let previous = if s == 0 { 0 } else { self.src_at(s - 1) };
                    if self.match_bracket(previous, p, ep - 1) || !self.match_bracket(self.src_at(s), p, ep - 1) {
                        break Err(Miss::No);
                    }
                    p = ep;
                }
                b'%' if self.pat_at(p + 1).is_ascii_digit() => {
                    s = hit!(self.match_capture(s, self.pat_at(p + 1)));
                    p += 2;
                }
                0 => break Ok(s),
                b'$' if self.pat_at(p + 1) == 0 => break if s == self.src.len() { Ok(s) } else { Err(Miss::No) },
                _ => {
                    let ep = self.class_end(p)?;
                    let class = self.single_at(p, ep);
                    let m = s < self.src.len() && self.is(self.src[s], class);
                    match self.pat_at(ep) {
                        b'?' => {
                            if m {
                                attempt!(self.do_match(s + 1, ep + 1));
                            }
                            p = ep + 1;
                        }
                        b'*' => break self.max_expand(s, class, ep),
                        b'+' => break if m { self.max_expand(s + 1, class, ep) } else { Err(Miss::No) },
                        b'-' => break self.min_expand(s, class, ep),
                        _ if m => {
                            s += 1;
                            p = ep;
                        }
                        _ => break Err(Miss::No),
                    }
                }
            }
        };
        self.depth -= 1;
        r
    }

    fn match_balance(&mut self, s: usize, p: usize) -> Step {
        let (b, e) = (self.pat_at(p), self.pat_at(p + 1));
        if b == 0 || e == 0 {
            return Err(Miss::Unbalanced);
        }
        if self.src_at(s) != b {
            return Err(Miss::No);
        }
        let mut depth = 1usize;
        for i in s + 1..self.src.len() {
            let c = self.src[i];
            if c == e {
                depth -= 1;
                if depth == 0 {
                    self.tick(u32::try_from((i - s) / 16).unwrap_or(u32::MAX))?;
                    return Ok(i + 1);
                }
            } else if c == b {
                depth += 1;
            }
        }
        self.tick(u32::try_from((self.src.len() - s) / 16).unwrap_or(u32::MAX))?;
        Err(Miss::No)
    }

    fn max_expand(&mut self, s: usize, class: Single, ep: usize) -> Step {
        let mut i = self.run_of(s, class)?;
        loop {
            attempt!(self.do_match(s + i, ep + 1));
            if i == 0 {
                return Err(Miss::No);
            }
            i -= 1;
        }
    }

    fn min_expand(&mut self, mut s: usize, class: Single, ep: usize) -> Step {
        loop {
            attempt!(self.do_match(s, ep + 1));
            if s < self.src.len() && self.is(self.src[s], class) {
                s += 1;
            } else {
                return Err(Miss::No);
            }
        }
    }

    fn start_capture(&mut self, s: usize, p: usize, what: isize) -> Step {
        let level = self.level;
        if level >= MAX_CAPTURES {
            return Err(Miss::TooManyCaptures);
        }
        self.capture[level] = (s, what);
        self.level = level + 1;
        let r = self.do_match(s, p);
        if r == Err(Miss::No) {
            self.level -= 1;
        }
        r
    }

    fn end_capture(&mut self, s: usize, p: usize) -> Step {
        let Some(l) = (0..self.level).rev().find(|&l| self.capture[l].1 == CAP_UNFINISHED) else {
            return Err(Miss::InvalidPatternCapture);
        };
        self.capture[l].1 = (s - self.capture[l].0) as isize;
        let r = self.do_match(s, p);
        if r == Err(Miss::No) {
            self.capture[l].1 = CAP_UNFINISHED;
        }
        r
    }

    /// `%1`–`%9`: the text of an earlier capture again.
    fn match_capture(&mut self, s: usize, digit: u8) -> Step {
        let l = usize::from(digit).wrapping_sub(usize::from(b'1'));
        if l >= self.level || self.capture[l].1 == CAP_UNFINISHED {
            return Err(Miss::InvalidCaptureIndex);
        }
        let (init, len) = self.capture[l];
        // A position capture's length is negative: in C, a huge size that never fits.
        let Ok(len) = usize::try_from(len) else { return Err(Miss::No) };
        self.tick(u32::try_from(len / 16).unwrap_or(u32::MAX))?;
        let fits = self.src.len() - s >= len;
        if fits && self.src[init..init + len] == self.src[s..s + len] {
            Ok(s + len)
        } else {
            Err(Miss::No)
        }
    }
}

/// `%a`, `%d`, … as LuaJIT's ASCII tables have them (no locale); an
/// uppercase class is the complement; any other byte stands for itself.
#[inline]
fn match_class(c: u8, cl: u8) -> bool {
    let res = match cl.to_ascii_lowercase() {
        b'a' => c.is_ascii_alphabetic(),
        b'c' => c.is_ascii_control(),
        b'd' => c.is_ascii_digit(),
        b'g' => c.is_ascii_graphic(),
        b'l' => c.is_ascii_lowercase(),
        b'p' => c.is_ascii_punctuation(),
        // C's isspace: \t \n \v \f \r and space (Rust's is_ascii_whitespace lacks \v).
        b's' => c == b' ' || (9..=13).contains(&c),
        b'u' => c.is_ascii_uppercase(),
        b'w' => c.is_ascii_alphanumeric(),
        b'x' => c.is_ascii_hexdigit(),
        b'z' => return if cl == b'z' { c == 0 } else { c != 0 },
        _ => return cl == c,
    };
    if cl.is_ascii_lowercase() {
        res
    } else {
        !res
    }
}

/// Whether a `find` pattern has a special character, else it is searched
/// for as plain text (`lj_str_haspattern`).
pub fn has_specials(pat: &[u8]) -> bool {
    pat.iter().any(|c| b"^$*+?.([%-".contains(c))
}
