//! The page's HTML: one escaping function every user string goes through,
//! the layout every page shares, and the formatting of times. Templates are
//! plain Rust functions (in `pages`), compiled in.

use std::fmt::Write as _;

use crate::domain::time::Timestamp;

/// `raw` escaped for HTML text and double-quoted attribute values.
pub fn escape(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for c in raw.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Who the page is for, when someone is signed in: the header shows the
/// name and a sign-out form carrying the CSRF token.
pub struct Viewer<'a> {
    /// The signed-in username.
    pub username: &'a str,
    /// The session's CSRF token.
    pub csrf: &'a str,
}

/// A whole page: `title` and `body` (already HTML) in the shared layout.
/// No inline script or style: the stylesheet and the one script are
/// served from `/static/`.
pub fn layout(title: &str, viewer: Option<&Viewer<'_>>, body: &str) -> String {
    let mut nav = String::new();
    if let Some(viewer) = viewer {
        let _ = write!(
            nav,
            r#"<nav aria-label="Main"><a href="/tokens">Access tokens</a> · <a href="/account">Account</a></nav>
<span>Signed in as <strong>{}</strong></span>
<form method="post" action="/sign-out">{}<button type="submit" class="link">Sign out</button></form>"#,
            escape(viewer.username),
            csrf_field(viewer.csrf),
        );
    }
    format!(
        r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} · identity</title>
<link rel="stylesheet" href="/static/app.css">
<script src="/static/copy.js" defer></script>
</head>
<body>
<header><span class="brand">identity</span>{nav}</header>
<main id="main">
<h1>{title}</h1>
{body}
</main>
</body>
</html>
"#,
        title = escape(title),
    )
}

/// The hidden CSRF field of a form.
pub fn csrf_field(csrf: &str) -> String {
    format!(
        r#"<input type="hidden" name="csrf" value="{}">"#,
        escape(csrf)
    )
}

/// A field's error message, if any, tied to the input `id` by
/// `aria-describedby` (see [`described_by`]).
pub fn field_error(id: &str, message: Option<&str>) -> String {
    match message {
        Some(message) => format!(
            r#"<p class="error" id="{id}-error" role="alert">{}</p>"#,
            escape(message)
        ),
        None => String::new(),
    }
}

/// The attributes that mark input `id` invalid and point at its message.
pub fn described_by(id: &str, message: Option<&str>) -> String {
    match message {
        Some(_) => format!(r#" aria-invalid="true" aria-describedby="{id}-error""#),
        None => String::new(),
    }
}

/// `ts` as `YYYY-MM-DD HH:MM UTC`.
pub fn time(ts: Timestamp) -> String {
    let seconds = ts.as_micros().div_euclid(1_000_000);
    let (days, rest) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rest / 3600,
        rest % 3600 / 60
    )
}

/// The instant a `YYYY-MM-DD` date ends (its last second, UTC), or `None`
/// if `raw` is not such a date.
pub fn end_of_date(raw: &str) -> Option<Timestamp> {
    let bytes = raw.as_bytes();
    if bytes.len() != 10 || bytes[4] != b'-' || bytes[7] != b'-' {
        return None;
    }
    let number = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = raw.get(range)?;
        part.bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    let (y, m, d) = (number(0..4)?, number(5..7)?, number(8..10)?);
    if !(1..=12).contains(&m) || d < 1 || d > days_in_month(y, m) || y < 1 {
        return None;
    }
    let days = days_from_civil(y, m, d);
    Some(Timestamp::from_micros(
        (days * 86_400 + 86_399).checked_mul(1_000_000)?,
    ))
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_markup_character_is_escaped() {
        assert_eq!(
            escape(r#"<script>alert("x&'y")</script>"#),
            "&lt;script&gt;alert(&quot;x&amp;&#39;y&quot;)&lt;/script&gt;"
        );
        assert_eq!(escape("plain é"), "plain é");
    }

    #[test]
    fn times_and_dates_round_trip() {
        assert_eq!(time(Timestamp::from_micros(0)), "1970-01-01 00:00 UTC");
        assert_eq!(
            time(Timestamp::from_micros(951_782_400 * 1_000_000)),
            "2000-02-29 00:00 UTC"
        );
        let end = end_of_date("2000-02-29").expect("a date");
        assert_eq!(time(end), "2000-02-29 23:59 UTC");
        assert_eq!(end.as_micros(), (951_782_400 + 86_399) * 1_000_000);
        assert_eq!(
            time(end_of_date("1969-12-31").expect("a date")),
            "1969-12-31 23:59 UTC"
        );
        for bad in [
            "",
            "2001-02-29",
            "2000-13-01",
            "2000-00-10",
            "2000-1-01",
            "+200-01-01",
            "0000-01-01",
            "2000-01-32",
            "abcd-ef-gh",
        ] {
            assert_eq!(end_of_date(bad), None, "{bad}");
        }
    }
}
