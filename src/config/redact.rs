//! Redacting a database URL's secrets (the password in the userinfo or
//! the query, a key's passphrase) from the URL and from messages that
//! may quote it.

/// The query parameters of a database URL whose values are secrets: the
/// password itself (libpq and sqlx accept it in the query as well as in the
/// userinfo) and the passphrase of an encrypted client key.
const SECRET_URL_PARAMETERS: &[&str] = &["password", "sslpassword"];

/// Replaces every secret of a database URL with `***`: the password in
/// `scheme://user:password@host/...`, and the values of the `password` and
/// `sslpassword` query parameters (matched case-insensitively, also when
/// percent-encoded). Everything else is kept as written.
pub(crate) fn redact_url(url: &str) -> String {
    // A password may hold an unescaped '#', '/' or '?' (the URL is then
    // invalid, and reported with the URL in the error): the userinfo runs
    // to the last '@', whatever comes between, so it is found first, on the
    // whole URL. (An '@' in the query makes this redact too much, never
    // too little.)
    if let Some((scheme, rest)) = url.split_once("://")
        && let Some((userinfo, after)) = rest.rsplit_once('@')
        && let Some((user, _password)) = userinfo.split_once(':')
    {
        return format!(
            "{scheme}://{user}:***@{}",
            redact_url(&format!("{scheme}://{after}"))
                .split_once("://")
                .map_or("", |(_, rest)| rest)
        );
    }
    let (before_fragment, fragment) = match url.find('#') {
        Some(i) => url.split_at(i),
        None => (url, ""),
    };
    let (base, query) = match before_fragment.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (before_fragment, None),
    };
    let mut out = redact_userinfo(base);
    if let Some(query) = query {
        out.push('?');
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((key, _)) if is_secret_parameter(key) => format!("{key}=***"),
                _ => pair.to_owned(),
            })
            .collect();
        out.push_str(&pairs.join("&"));
    }
    out.push_str(fragment);
    out
}

/// `text` (such as an error message about the database) with every secret
/// of `url` replaced by `***`: the URL itself, whole, and each secret value
/// as written and percent-decoded, wherever it appears.
pub fn redact_url_secrets(text: &str, url: &str) -> String {
    let mut out = text.replace(url, &redact_url(url));
    for secret in url_secrets(url) {
        // Very short values would blank out unrelated text; a password of
        // one or two characters is no secret anyway.
        if secret.len() >= 3 {
            out = out.replace(&secret, "***");
        }
    }
    out
}

/// Whether a query parameter name (possibly percent-encoded) is a secret.
fn is_secret_parameter(key: &str) -> bool {
    let key = percent_decode(key).to_ascii_lowercase();
    SECRET_URL_PARAMETERS.contains(&key.as_str())
}

/// The userinfo password of `base` (no query) replaced with `***`.
fn redact_userinfo(base: &str) -> String {
    let Some((scheme, rest)) = base.split_once("://") else {
        return base.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***@{host}{path}"),
            None => base.to_owned(),
        },
        None => base.to_owned(),
    }
}

/// Every secret value of `url`, as written and percent-decoded.
fn url_secrets(url: &str) -> Vec<String> {
    let mut secrets = Vec::new();
    let mut url = url;
    // The userinfo runs to the last '@' (see `redact_url`).
    if let Some((_, rest)) = url.split_once("://")
        && let Some((userinfo, after)) = rest.rsplit_once('@')
        && let Some((_, password)) = userinfo.split_once(':')
    {
        secrets.push(password.to_owned());
        url = after;
    }
    let before_fragment = url.split('#').next().unwrap_or(url);
    let query = before_fragment
        .split_once('?')
        .map_or("", |(_, query)| query);
    for pair in query.split('&') {
        if let Some((key, value)) = pair.split_once('=')
            && is_secret_parameter(key)
        {
            secrets.push(value.to_owned());
        }
    }
    let decoded: Vec<String> = secrets
        .iter()
        .map(|s| percent_decode(&s.replace('+', " ")))
        .chain(secrets.iter().map(|s| percent_decode(s)))
        .collect();
    secrets.extend(decoded);
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    secrets.dedup();
    secrets
}

/// Decodes `%XX` escapes (invalid ones are kept as written; invalid UTF-8
/// is replaced).
pub(super) fn percent_decode(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
