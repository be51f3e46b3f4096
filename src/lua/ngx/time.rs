//! Time functions of the `ngx` API: `ngx.now`, `ngx.time`, `ngx.today`, `ngx.localtime`,
//! `ngx.utctime`, `ngx.update_time`, `ngx.http_time`, `ngx.cookie_time`, `ngx.parse_http_time`.
//!
//! nginx serves `now`/`time` from a clock cached per event-loop iteration; here they read the
//! system clock on every call (truncated to milliseconds as nginx does), so `ngx.update_time()`
//! has nothing left to do. The formatting and parsing reproduce nginx's `ngx_gmtime`,
//! `ngx_http_time`, `ngx_http_cookie_time` and `ngx_parse_http_time`, clamps included.

use std::time::{SystemTime, UNIX_EPOCH};

use mlua::{Lua, MultiValue, Result, Table, Value};

use super::raise::{api_function, raise};
use super::util::{arg, one};

const WEEKDAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];

/// Broken-down time; `mon` is 1-based and `wday` counts from Sunday, as in `ngx_tm_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tm {
    year: i64,
    mon: u32,
    mday: u32,
    hour: u32,
    min: u32,
    sec: u32,
    wday: u32,
}

/// Seconds and milliseconds since the epoch.
fn clock() -> (i64, u32) {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    (d.as_secs() as i64, d.subsec_millis())
}

/// `ngx_gmtime`: negative times read as the epoch, and years stop at 9999-12-31 23:59:59.
fn gmtime(t: i64) -> Tm {
    let t = t.max(0);
    let (mut days, mut secs) = (t / 86400, t % 86400);
    if days > 2_932_896 {
        days = 2_932_896;
        secs = 86399;
    }
    // Civil-from-days (Howard Hinnant), valid for the whole clamped range.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let mday = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let mon = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(mon <= 2);
    Tm {
        year,
        mon,
        mday,
        hour: (secs / 3600) as u32,
        min: (secs % 3600 / 60) as u32,
        sec: (secs % 60) as u32,
        wday: ((4 + days) % 7) as u32,
    }
}

fn localtime(t: i64) -> Tm {
    let t = t as libc::time_t;
    // SAFETY: localtime_r only writes the tm it is given.
    let tm = unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&t, &mut tm).is_null() {
            return gmtime(t as i64);
        }
        tm
    };
    Tm {
        year: i64::from(tm.tm_year) + 1900,
        mon: (tm.tm_mon + 1) as u32,
        mday: tm.tm_mday as u32,
        hour: tm.tm_hour as u32,
        min: tm.tm_min as u32,
        sec: tm.tm_sec as u32,
        wday: tm.tm_wday as u32,
    }
}

fn date_time(tm: &Tm) -> String {
    format!("{:4}-{:02}-{:02} {:02}:{:02}:{:02}", tm.year, tm.mon, tm.mday, tm.hour, tm.min, tm.sec)
}

/// `Thu, 18 Nov 2010 11:27:35 GMT`.
fn http_time(t: i64) -> String {
    let tm = gmtime(t);
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} GMT",
        WEEKDAYS[tm.wday as usize],
        tm.mday,
        MONTHS[tm.mon as usize - 1],
        tm.year,
        tm.hour,
        tm.min,
        tm.sec
    )
}

/// `Thu, 18-Nov-10 11:27:35 GMT`; nginx writes the year in full after 2037 only.
fn cookie_time(t: i64) -> String {
    let tm = gmtime(t);
    let year = if tm.year > 2037 { format!("{}", tm.year) } else { format!("{:02}", tm.year % 100) };
    format!(
        "{}, {:02}-{}-{} {:02}:{:02}:{:02} GMT",
        WEEKDAYS[tm.wday as usize],
        tm.mday,
        MONTHS[tm.mon as usize - 1],
        year,
        tm.hour,
        tm.min,
        tm.sec
    )
}

/// `ngx_parse_http_time`: RFC 822 (`Thu, 18 Nov 2010 11:27:35 GMT`), RFC 850
/// (`Thursday, 18-Nov-10 11:27:35 GMT`) and asctime (`Thu Nov 18 11:27:35 2010`). Like nginx it
/// ignores the weekday and anything after the time, and its arithmetic wraps the same way.
fn parse_http_time(s: &[u8]) -> Option<i64> {
    #[derive(PartialEq)]
    enum Fmt {
        Rfc822,
        Rfc850,
        Isoc,
    }
    const MDAY: [u64; 12] = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    // Past the end reads as NUL, which fails every check below, as nginx's length checks do.
    let at = |i: usize| s.get(i).copied().unwrap_or(0);
    let digit = |i: usize| at(i).is_ascii_digit().then(|| u64::from(at(i) - b'0'));
    let two = |i: usize| Some(digit(i)? * 10 + digit(i + 1)?);
    let four = |i: usize| Some(two(i)? * 100 + two(i + 2)?);
    let end = s.len();

    let mut fmt = None;
    let mut p = 0;
    while p < end {
        if s[p] == b',' {
            break;
        }
        if s[p] == b' ' {
            fmt = Some(Fmt::Isoc);
            break;
        }
        p += 1;
    }
    p += 1;
    while p < end && s[p] == b' ' {
        p += 1;
    }
    if end < p + 18 {
        return None;
    }
    let mut day = 0;
    if fmt.is_none() {
        day = two(p)?;
        p += 2;
        fmt = Some(match at(p) {
            b' ' if end >= p + 18 => Fmt::Rfc822,
            b'-' => Fmt::Rfc850,
            _ => return None,
        });
        p += 1;
    }
    let fmt = fmt.expect("format decided");
    let month: u64 = match at(p) {
        b'J' if at(p + 1) == b'a' => 0,
        b'J' if at(p + 2) == b'n' => 5,
        b'J' => 6,
        b'F' => 1,
        b'M' if at(p + 2) == b'r' => 2,
        b'M' => 4,
        b'A' if at(p + 1) == b'p' => 3,
        b'A' => 7,
        b'S' => 8,
        b'O' => 9,
        b'N' => 10,
        b'D' => 11,
        _ => return None,
    };
    p += 3;
    if (fmt == Fmt::Rfc822 && at(p) != b' ') || (fmt == Fmt::Rfc850 && at(p) != b'-') {
        return None;
    }
    p += 1;
    let mut year = 0;
    match fmt {
        Fmt::Rfc822 => {
            year = four(p)?;
            p += 4;
        }
        Fmt::Rfc850 => {
            year = two(p)?;
            year += if year < 70 { 2000 } else { 1900 };
            p += 2;
        }
        Fmt::Isoc => {
            if at(p) == b' ' {
                p += 1;
            }
            day = digit(p)?;
            p += 1;
            if at(p) != b' ' {
                day = day * 10 + digit(p)?;
                p += 1;
            }
            if end < p + 14 {
                return None;
            }
        }
    }
    if at(p) != b' ' {
        return None;
    }
    p += 1;
    let hour = two(p)?;
    if at(p + 2) != b':' {
        return None;
    }
    let min = two(p + 3)?;
    if at(p + 5) != b':' {
        return None;
    }
    let sec = two(p + 6)?;
    if fmt == Fmt::Isoc {
        if at(p + 8) != b' ' {
            return None;
        }
        year = four(p + 9)?;
    }
    if hour > 23 || min > 59 || sec > 59 {
        return None;
    }
    if day == 29 && month == 1 {
        if year & 3 != 0 || (year % 100 == 0 && year % 400 != 0) {
            return None;
        }
    } else if day > MDAY[month as usize] {
        return None;
    }
    // Gauss' formula over a year shifted to start on March 1st, months counted from 1.
    let (mut month, mut year) = (month as i64 - 1, year);
    if month <= 0 {
        month += 12;
        year = year.wrapping_sub(1);
    }
    let month = month as u64;
    let days = (365u64.wrapping_mul(year))
        .wrapping_add(year / 4)
        .wrapping_sub(year / 100)
        .wrapping_add(year / 400)
        .wrapping_add(367 * month / 12)
        .wrapping_sub(30)
        .wrapping_add(day)
        .wrapping_sub(1)
        .wrapping_sub(719_527 - 31 - 28);
    let time = days.wrapping_mul(86400).wrapping_add(hour * 3600 + min * 60 + sec);
    Some(time as i64)
}

/// The `sec` argument of `http_time`/`cookie_time`, converted as the FFI's `long` parameter is.
fn seconds(lua: &Lua, args: &MultiValue) -> std::result::Result<i64, Result<MultiValue>> {
    match arg(args, 0) {
        Value::Integer(n) => Ok(*n),
        Value::Number(n) => Ok(*n as i64),
        _ => Err(raise(lua, "number argument only")),
    }
}

/// Installs the time functions into `ngx`.
pub fn register(lua: &Lua, ngx: &Table) -> Result<()> {
    ngx.raw_set(
        "now",
        lua.create_function(|_, ()| {
            let (sec, msec) = clock();
            Ok(sec as f64 + f64::from(msec) / 1000.0)
        })?,
    )?;
    ngx.raw_set("time", lua.create_function(|_, ()| Ok(clock().0))?)?;
    ngx.raw_set("update_time", lua.create_function(|_, ()| Ok(()))?)?;
    ngx.raw_set(
        "today",
        lua.create_function(|_, ()| {
            let tm = localtime(clock().0);
            Ok(format!("{:4}-{:02}-{:02}", tm.year, tm.mon, tm.mday))
        })?,
    )?;
    ngx.raw_set("localtime", lua.create_function(|_, ()| Ok(date_time(&localtime(clock().0))))?)?;
    ngx.raw_set("utctime", lua.create_function(|_, ()| Ok(date_time(&gmtime(clock().0))))?)?;
    ngx.raw_set(
        "http_time",
        api_function(lua, |lua, args| match seconds(lua, &args) {
            Ok(t) => one(lua, http_time(t)),
            Err(raised) => raised,
        })?,
    )?;
    ngx.raw_set(
        "cookie_time",
        api_function(lua, |lua, args| match seconds(lua, &args) {
            Ok(t) => one(lua, cookie_time(t)),
            Err(raised) => raised,
        })?,
    )?;
    ngx.raw_set(
        "parse_http_time",
        api_function(lua, |lua, args| match arg(&args, 0) {
            // ngx_http_lua_ffi_parse_http_time reports failure as -1, so that instant reads as nil too.
            Value::String(s) => match parse_http_time(&s.as_bytes()) {
                Some(t) if t != -1 => one(lua, t),
                _ => one(lua, Value::Nil),
            },
            _ => raise(lua, "string argument only"),
        })?,
    )?;
    Ok(())
}

/// Expected values below were printed by nginx 1.22 with lua-nginx-module 0.10.23 and
/// lua-resty-core 0.1.25 running the same expressions.
#[cfg(test)]
mod tests {
    use super::super::util::testing::{eval, state};

    #[test]
    fn http_and_cookie_time() {
        let lua = state(super::register);
        assert_eq!(
            eval(&lua, "show(ngx.http_time(0), ngx.http_time(1290079655), ngx.http_time(1290079655.9), ngx.http_time(-1))"),
            "Thu, 01 Jan 1970 00:00:00 GMT | Thu, 18 Nov 2010 11:27:35 GMT | Thu, 18 Nov 2010 11:27:35 GMT | Thu, 01 Jan 1970 00:00:00 GMT"
        );
        assert_eq!(
            eval(&lua, "show(ngx.http_time(253402300799), ngx.http_time(253402300800))"),
            "Fri, 31 Dec 9999 23:59:59 GMT | Fri, 31 Dec 9999 23:59:59 GMT"
        );
        assert_eq!(
            eval(&lua, "show(ngx.cookie_time(1290079655), ngx.cookie_time(2200000000), ngx.cookie_time(0), ngx.cookie_time(-1))"),
            "Thu, 18-Nov-10 11:27:35 GMT | Sun, 18-Sep-2039 23:06:40 GMT | Thu, 01-Jan-70 00:00:00 GMT | Thu, 01-Jan-70 00:00:00 GMT"
        );
        assert_eq!(
            eval(&lua, "show(ngx.cookie_time(2145916799), ngx.cookie_time(2145916800), ngx.cookie_time(946684800))"),
            "Thu, 31-Dec-37 23:59:59 GMT | Fri, 01-Jan-2038 00:00:00 GMT | Sat, 01-Jan-00 00:00:00 GMT"
        );
        assert_eq!(eval(&lua, r#"select(2, pcall(ngx.http_time, "12"))"#), "number argument only");
        assert_eq!(eval(&lua, "select(2, pcall(ngx.cookie_time))"), "number argument only");
    }

    #[test]
    fn parse_http_time() {
        let lua = state(super::register);
        let cases = [
            ("Thu, 18 Nov 2010 11:27:35 GMT", "1290079655"),
            ("Thursday, 18-Nov-10 11:27:35 GMT", "1290079655"),
            ("Thu Nov 18 11:27:35 2010", "1290079655"),
            ("Thu, 18 Nov 2010 11:27:35", "1290079655"),
            ("Thu, 18 Nov 2010 11:27:35 GMT junk", "1290079655"),
            ("Xyz, 18 Nov 2010 11:27:35 GMT", "1290079655"),
            ("Thu,  18 Nov 2010 11:27:35 GMT", "1290079655"),
            ("thu, 18 Nov 2010 11:27:35 GMT", "1290079655"),
            ("Thu, 18 Nov 1969 11:27:35 GMT", "-3760345"),
            ("Mon, 31 Dec 9999 23:59:59 GMT", "253402300799"),
            ("Sun Nov  6 08:49:37 1994", "784111777"),
            ("Sun Nov 6 08:49:37 1994", "784111777"),
            ("Sun, 29 Feb 2000 08:49:37 GMT", "951814177"),
            ("garbage", "nil"),
            ("", "nil"),
            ("Thu, 31 Feb 2010 11:27:35 GMT", "nil"),
            ("Thu, 18 Nov 70 11:27:35 GMT", "nil"),
            ("Thu, 1 Nov 2010 11:27:35 GMT", "nil"),
            ("Thu, 18 Nov 2010 24:00:00 GMT", "nil"),
            ("Thu, 18 nov 2010 11:27:35 GMT", "nil"),
            ("Thu 18 Nov 2010 11:27:35 GMT", "nil"),
            ("Thu, 18-Nov-2010 11:27:35 GMT", "nil"),
            ("Thu, 18 Nov 2010 11:27:60 GMT", "nil"),
            ("Sun, 29 Feb 1900 08:49:37 GMT", "nil"),
        ];
        for (input, expected) in cases {
            assert_eq!(eval(&lua, &format!("show(ngx.parse_http_time({input:?}))")), expected, "{input}");
        }
        assert_eq!(eval(&lua, "select(2, pcall(ngx.parse_http_time, nil))"), "string argument only");
    }

    #[test]
    fn clock() {
        let lua = state(super::register);
        let ok = |expr: &str| eval(&lua, &format!("tostring({expr})"));
        assert_eq!(ok(r#"ngx.today():match("^%d%d%d%d%-%d%d%-%d%d$") ~= nil"#), "true");
        assert_eq!(ok(r#"ngx.localtime():match("^%d%d%d%d%-%d%d%-%d%d %d%d:%d%d:%d%d$") ~= nil"#), "true");
        assert_eq!(ok(r#"ngx.utctime():match("^%d%d%d%d%-%d%d%-%d%d %d%d:%d%d:%d%d$") ~= nil"#), "true");
        assert_eq!(ok("ngx.time() % 1 == 0 and ngx.time() > 1.7e9"), "true");
        assert_eq!(ok("math.abs(ngx.now() * 1000 - math.floor(ngx.now() * 1000 + 0.5)) < 1e-3"), "true");
        assert_eq!(ok("math.abs(ngx.now() - ngx.time()) < 2"), "true");
        assert_eq!(ok("select('#', ngx.update_time())"), "0");
        assert_eq!(
            ok(r#"ngx.utctime() == os.date("!%Y-%m-%d %H:%M:%S") or ngx.utctime() > os.date("!%Y-%m-%d %H:%M:%S")"#),
            "true"
        );
    }
}
