//! Assertions: the value matcher syntax shared by every expectation (`!absent`,
//! `~regex`, `<N`, …), dotted JSON paths, and the checks of HTTP, gRPC and raw
//! answers. Each check lists every mismatch as "what: expected X, got Y".

use std::collections::BTreeMap;

use serde_json::Value as J;
use serde_yaml_ng::Value;

use crate::case::{show, BackendCount, GrpcExpect, HttpExpect, Matcher, RawExpect};
use crate::client::{GrpcOutcome, HttpResponse, RawResponse};

/// Checks `actual` (None = absent) against one matcher.
///
/// Strings: `!absent`, `!present`, `~re` (regex matches the text form), `!~re`
/// (must not match; absent passes), `<N` `<=N` `>N` `>=N` (numeric; a grpc-timeout
/// value such as `4999m` or `1200u` is read as milliseconds), `=text` (literal), else
/// the exact text. Numbers and booleans compare by value; lists and maps as JSON.
/// The text form of a JSON list (a repeated header) is its items joined by ", ".
pub fn matches(expected: &Matcher, actual: Option<&J>) -> Result<(), String> {
    let actual = actual.filter(|a| !a.is_null());
    let got = || actual.map_or_else(|| "absent".to_string(), |a| a.to_string());
    let fail = |want: String| Err(format!("expected {want}, got {}", got()));
    match expected {
        Value::String(s) => {
            if s == "!absent" {
                return if actual.is_none() { Ok(()) } else { fail("absent".into()) };
            }
            if s == "!present" {
                return if actual.is_some() { Ok(()) } else { fail("present".into()) };
            }
            if let Some(re) = s.strip_prefix("!~") {
                let re = regex(re)?;
                return match actual {
                    Some(a) if re.is_match(&text(a)) => fail(format!("not matching /{re}/")),
                    _ => Ok(()),
                };
            }
            if let Some(re) = s.strip_prefix('~') {
                let re = regex(re)?;
                return match actual {
                    Some(a) if re.is_match(&text(a)) => Ok(()),
                    _ => fail(format!("matching /{re}/")),
                };
            }
            if let Some((op, n)) = comparison(s) {
                let ok = actual.and_then(number).is_some_and(|a| match op {
                    "<" => a < n,
                    "<=" => a <= n,
                    ">" => a > n,
                    _ => a >= n,
                });
                return if ok { Ok(()) } else { fail(s.clone()) };
            }
            let want = s.strip_prefix('=').unwrap_or(s);
            match actual {
                Some(a) if text(a) == want => Ok(()),
                _ => fail(format!("{want:?}")),
            }
        }
        Value::Number(n) => {
            let want = n.as_f64();
            match (actual.and_then(number), want) {
                (Some(a), Some(w)) if a == w => Ok(()),
                _ => fail(n.to_string()),
            }
        }
        Value::Bool(b) => match actual {
            Some(a) if text(a) == b.to_string() => Ok(()),
            _ => fail(b.to_string()),
        },
        Value::Null => {
            if actual.is_none() {
                Ok(())
            } else {
                fail("absent".into())
            }
        }
        other => {
            let want: J = serde_json::to_value(other).map_err(|e| e.to_string())?;
            if actual == Some(&want) {
                Ok(())
            } else {
                fail(want.to_string())
            }
        }
    }
}

fn regex(re: &str) -> Result<regex::Regex, String> {
    regex::Regex::new(re).map_err(|e| format!("bad regex in case: {e}"))
}

fn comparison(s: &str) -> Option<(&'static str, f64)> {
    for op in ["<=", ">=", "<", ">"] {
        if let Some(rest) = s.strip_prefix(op) {
            return rest.trim().parse().ok().map(|n| (op, n));
        }
    }
    None
}

/// The text form of a JSON value: strings bare, lists joined with ", ".
pub fn text(v: &J) -> String {
    match v {
        J::String(s) => s.clone(),
        J::Array(items) => items.iter().map(text).collect::<Vec<_>>().join(", "),
        other => other.to_string(),
    }
}

/// A number, or a numeric string, or a grpc-timeout (`5S`, `4999m`, `120u`) in ms.
fn number(v: &J) -> Option<f64> {
    match v {
        J::Number(n) => n.as_f64(),
        J::String(s) => {
            if let Ok(n) = s.trim().parse() {
                return Some(n);
            }
            let (digits, unit) = s.split_at(s.len().checked_sub(1)?);
            let n: f64 = digits.parse().ok()?;
            let ms_per = match unit {
                "H" => 3_600_000.0,
                "M" => 60_000.0,
                "S" => 1_000.0,
                "m" => 1.0,
                "u" => 0.001,
                "n" => 0.000_001,
                _ => return None,
            };
            Some(n * ms_per)
        }
        _ => None,
    }
}

/// Follows a dotted path (`headers.x-forwarded-for`, `items.0.id`) into a JSON value.
pub fn json_path<'a>(doc: &'a J, path: &str) -> Option<&'a J> {
    let mut cur = doc;
    for seg in path.split('.') {
        cur = match cur {
            J::Object(m) => m.get(seg)?,
            J::Array(a) => a.get(seg.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// Checks every entry of `expected`, looking actual values up with `get`; collects
/// the failures as "`prefix`KEY: …".
pub fn check_map(
    prefix: &str,
    expected: &BTreeMap<String, Matcher>,
    get: impl Fn(&str) -> Option<J>,
    errors: &mut Vec<String>,
) {
    for (k, m) in expected {
        if let Err(e) = matches(m, get(k).as_ref()) {
            errors.push(format!("{prefix}{k}: {e}"));
        }
    }
}

/// Joins collected failures, or Ok when there are none.
pub fn done(errors: Vec<String>) -> Result<(), String> {
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// At most `n` characters of `b`, lossily decoded, for messages.
pub fn preview(b: &[u8], n: usize) -> String {
    let s = String::from_utf8_lossy(&b[..b.len().min(n)]).into_owned();
    if b.len() > n {
        format!("{s}…({} bytes)", b.len())
    } else {
        s
    }
}

pub fn check_http(exp: &HttpExpect, resp: &HttpResponse, sent_body: &[u8]) -> Result<(), String> {
    let mut errors = Vec::new();
    let want_status = exp.status.unwrap_or(200);
    if resp.status != want_status {
        errors.push(format!("status: expected {want_status}, got {}", resp.status));
    }
    if let Some(v) = &exp.version {
        let got = match resp.version {
            http::Version::HTTP_2 => "2",
            http::Version::HTTP_10 => "1.0",
            _ => "1.1",
        };
        if got != v {
            errors.push(format!("version: expected {v}, got {got}"));
        }
    }
    check_map(
        "header ",
        &exp.headers,
        |name| {
            let vals: Vec<J> = resp
                .headers
                .get_all(name)
                .iter()
                .map(|v| J::String(String::from_utf8_lossy(v.as_bytes()).into_owned()))
                .collect();
            match vals.len() {
                0 => None,
                1 => vals.into_iter().next(),
                _ => Some(J::Array(vals)),
            }
        },
        &mut errors,
    );
    if let Some(b) = &exp.body {
        if resp.body.as_ref() != b.as_bytes() {
            errors.push(format!("body: expected {b:?}, got {:?}", preview(&resp.body, 300)));
        }
    }
    let body_text = String::from_utf8_lossy(&resp.body);
    for needle in &exp.body_contains.0 {
        if !body_text.contains(needle.as_str()) {
            errors.push(format!("body: expected to contain {needle:?}, got {:?}", preview(&resp.body, 300)));
        }
    }
    if let Some(n) = exp.body_len {
        if resp.body.len() != n {
            errors.push(format!("body_len: expected {n}, got {}", resp.body.len()));
        }
    }
    if exp.echo_body && resp.body.as_ref() != sent_body {
        let first_diff =
            resp.body.iter().zip(sent_body).position(|(a, b)| a != b).unwrap_or(resp.body.len().min(sent_body.len()));
        errors.push(format!(
            "echo_body: response ({} bytes) differs from the request body ({} bytes) at byte {first_diff}",
            resp.body.len(),
            sent_body.len()
        ));
    }
    if !exp.json.is_empty() {
        match serde_json::from_slice::<J>(&resp.body) {
            Ok(doc) => check_map("json ", &exp.json, |p| json_path(&doc, p).cloned(), &mut errors),
            Err(e) => errors.push(format!("json: body is not JSON ({e}): {:?}", preview(&resp.body, 300))),
        }
    }
    if let Some(m) = &exp.time_ms {
        let ms = J::from(resp.elapsed.as_millis() as u64);
        if let Err(e) = matches(m, Some(&ms)) {
            errors.push(format!("time_ms: {e}"));
        }
    }
    if let Some(m) = &exp.first_byte_ms {
        let ms = J::from(resp.first_byte.as_millis() as u64);
        if let Err(e) = matches(m, Some(&ms)) {
            errors.push(format!("first_byte_ms: {e}"));
        }
    }
    match (&resp.cut, exp.cut) {
        (Some(e), false) => errors.push(e.clone()),
        (None, true) => errors.push("cut: expected the body to be cut, it ended normally".into()),
        _ => {}
    }
    if !errors.is_empty() && !errors.iter().all(|e| e.starts_with("body")) {
        errors.push(format!("(response body: {:?})", preview(&resp.body, 300)));
    }
    done(errors)
}

pub fn check_grpc(exp: &GrpcExpect, out: &GrpcOutcome) -> Result<(), String> {
    let mut errors = Vec::new();
    if out.code != exp.code {
        errors.push(format!("code: expected {}, got {} (message {:?})", exp.code, out.code, out.message));
    }
    if let Some(s) = &exp.error_contains {
        if !out.message.contains(s.as_str()) {
            errors.push(format!("error_contains: expected {s:?} in the status message, got {:?}", out.message));
        }
    }
    if let Some(n) = exp.replies {
        if out.replies.len() as u32 != n {
            errors.push(format!("replies: expected {n}, got {}", out.replies.len()));
        }
    }
    let first = out.replies.first();
    let field = |name: &str, m: &Option<Matcher>, v: Option<J>, errors: &mut Vec<String>| {
        if let Some(m) = m {
            if let Err(e) = matches(m, v.as_ref()) {
                errors.push(format!("{name}: {e}"));
            }
        }
    };
    field("message", &exp.message, first.map(|r| J::from(r.message.clone())), &mut errors);
    field("backend", &exp.backend, first.map(|r| J::from(r.backend.clone())), &mut errors);
    let num = |n: Option<u64>| n.map(|n| Value::Number(n.into()));
    field("payload_len", &num(exp.payload_len.map(|n| n as u64)), first.map(|r| J::from(r.payload.len())), &mut errors);
    field(
        "received_messages",
        &num(exp.received_messages.map(u64::from)),
        first.map(|r| J::from(r.received_messages)),
        &mut errors,
    );
    field("received_bytes", &num(exp.received_bytes), first.map(|r| J::from(r.received_bytes)), &mut errors);
    if !exp.metadata.is_empty() {
        match first {
            Some(r) => {
                check_map("metadata ", &exp.metadata, |k| r.metadata.get(k).map(|v| J::from(v.clone())), &mut errors)
            }
            None => errors.push("metadata: no reply to read it from".into()),
        }
    }
    if !errors.is_empty() {
        if let Some(r) = first {
            let meta: BTreeMap<_, _> = r.metadata.iter().collect();
            errors.push(format!("(first reply: message {:?}, backend {:?}, metadata {meta:?})", r.message, r.backend));
        }
    }
    done(errors)
}

pub fn check_raw(exp: &RawExpect, resp: &RawResponse) -> Result<(), String> {
    let Some(head) = &resp.head else {
        if (exp.no_answer && resp.partial.is_empty()) || (exp.no_head && !resp.partial.is_empty()) {
            return Ok(());
        }
        let what = if resp.partial.is_empty() {
            "the connection closed without an answer".to_string()
        } else {
            format!("the connection closed after {:?}, not a complete response head", preview(&resp.partial, 300))
        };
        return Err(if exp.no_answer {
            format!("no_answer: expected no byte at all, but {what}")
        } else if exp.no_head {
            format!("no_head: expected some bytes before the close, but {what}")
        } else {
            what
        });
    };
    if exp.no_answer || exp.no_head {
        return Err(format!("expected the connection closed without a response head, got {head:?}"));
    }
    let mut errors = Vec::new();
    let status_line = head.lines().next().unwrap_or_default();
    if let Some(s) = &exp.status_line_contains {
        if !status_line.contains(s.as_str()) {
            errors.push(format!("status line: expected to contain {s:?}, got {status_line:?}"));
        }
    }
    for needle in &exp.head_contains.0 {
        if !head.contains(needle.as_str()) {
            errors.push(format!("head: expected to contain {needle:?}, got {head:?}"));
        }
    }
    if let Some(c) = exp.closed {
        if resp.closed != c {
            errors.push(format!(
                "closed: expected the connection {} after the answer, but it was {} (head {head:?})",
                if c { "closed" } else { "kept open" },
                if resp.closed { "closed" } else { "still open after 2 s" },
            ));
        }
    }
    done(errors)
}

/// Checks how many answers each backend gave over a repeated step of `repeat`
/// answers (each counted answer named its backend: the caller checks that).
pub fn check_backends(
    want: &BackendCount,
    counts: &BTreeMap<String, u32>,
    repeat: u32,
    all: impl Iterator<Item = String>,
) -> Result<(), String> {
    if matches!(want, BackendCount::Any) {
        return Ok(());
    }
    let total: u32 = counts.values().sum();
    if total != repeat {
        return Err(format!("backends: {total} of {repeat} answers counted ({counts:?})"));
    }
    match want {
        BackendCount::Any => Ok(()),
        BackendCount::One => {
            if counts.len() == 1 {
                Ok(())
            } else {
                Err(format!("expected every answer from one backend, got {counts:?}"))
            }
        }
        BackendCount::Exact(m) => {
            let zero = Value::Number(0.into());
            let mut errors = Vec::new();
            let all: Vec<String> = all.collect();
            for b in &all {
                let got = J::from(counts.get(b).copied().unwrap_or(0));
                if let Err(e) = matches(m.get(b).unwrap_or(&zero), Some(&got)) {
                    errors.push(format!("{b}: {e}"));
                }
            }
            for name in counts.keys().filter(|k| !all.contains(k)) {
                errors.push(format!("{name:?} is not a backend of the case"));
            }
            if errors.is_empty() {
                Ok(())
            } else {
                Err(format!("backends: {} (counts {counts:?})", errors.join("; ")))
            }
        }
    }
}

/// Each needle must occur in `hay`; returns the missing ones.
pub fn missing<'a>(hay: &str, needles: &'a [String]) -> Vec<&'a str> {
    needles.iter().filter(|n| !hay.contains(n.as_str())).map(String::as_str).collect()
}

/// Some line of `text` is a JSON object matching all of `fields`.
pub fn json_line_matches(text: &str, fields: &BTreeMap<String, Matcher>) -> bool {
    text.lines().any(|line| {
        serde_json::from_str::<J>(line.trim())
            .is_ok_and(|doc| doc.is_object() && fields.iter().all(|(k, m)| matches(m, json_path(&doc, k)).is_ok()))
    })
}

/// One line describing a matcher map, for messages.
pub fn show_map(m: &BTreeMap<String, Matcher>) -> String {
    let parts: Vec<String> = m.iter().map(|(k, v)| format!("{k}: {}", show(v))).collect();
    format!("{{{}}}", parts.join(", "))
}
