//! A strict `application/x-www-form-urlencoded` parser, for request bodies
//! and query strings: `+` is a space, `%XX` a byte, the result must be
//! UTF-8; a malformed escape or invalid UTF-8 refuses the whole form.

/// A parsed form: its fields in order (a name may repeat, as ticked
/// checkboxes do).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Form(Vec<(String, String)>);

/// Why a form could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed;

/// The most fields one form may have.
pub const MAX_FIELDS: usize = 64;

impl Form {
    /// Parses `raw` (a body or a query string without its `?`).
    pub fn parse(raw: &[u8]) -> Result<Self, Malformed> {
        let mut fields = Vec::new();
        for pair in raw.split(|&b| b == b'&') {
            if pair.is_empty() {
                continue;
            }
            if fields.len() == MAX_FIELDS {
                return Err(Malformed);
            }
            let (name, value) = match pair.iter().position(|&b| b == b'=') {
                Some(at) => (&pair[..at], &pair[at + 1..]),
                None => (pair, &b""[..]),
            };
            fields.push((decode(name)?, decode(value)?));
        }
        Ok(Self(fields))
    }

    /// The first value of `name`, or `""`.
    pub fn get(&self, name: &str) -> &str {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map_or("", |(_, v)| v.as_str())
    }

    /// Every value of `name`, in order.
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

fn decode(raw: &[u8]) -> Result<String, Malformed> {
    let mut out = Vec::with_capacity(raw.len());
    let mut bytes = raw.iter();
    while let Some(&b) = bytes.next() {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hi = bytes.next().and_then(|&h| hex(h)).ok_or(Malformed)?;
                let lo = bytes.next().and_then(|&l| hex(l)).ok_or(Malformed)?;
                out.push(hi << 4 | lo);
            }
            b => out.push(b),
        }
    }
    String::from_utf8(out).map_err(|_| Malformed)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// `raw` percent-encoded for a query string value.
pub fn encode(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for b in raw.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_decoded_in_order_and_may_repeat() {
        let form = Form::parse(b"name=my+token%21&scope=a&scope=b&empty=&bare").expect("parses");
        assert_eq!(form.get("name"), "my token!");
        assert_eq!(form.all("scope").collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(form.get("empty"), "");
        assert_eq!(form.get("bare"), "");
        assert_eq!(form.get("missing"), "");
        assert_eq!(
            Form::parse("n=%C3%A9".as_bytes()).expect("UTF-8").get("n"),
            "é"
        );
    }

    #[test]
    fn malformed_escapes_invalid_utf8_and_too_many_fields_are_refused() {
        for bad in [&b"a=%"[..], b"a=%4", b"a=%zz", b"a=%FF", b"%C3=1"] {
            assert_eq!(Form::parse(bad), Err(Malformed), "{bad:?}");
        }
        let many = "a=1&".repeat(MAX_FIELDS + 1);
        assert_eq!(Form::parse(many.as_bytes()), Err(Malformed));
        assert!(Form::parse("a=1&".repeat(MAX_FIELDS).as_bytes()).is_ok());
    }

    #[test]
    fn encoding_round_trips() {
        let raw = "a b&c=d/é%";
        let encoded = encode(raw);
        let form = Form::parse(format!("x={encoded}").as_bytes()).expect("parses");
        assert_eq!(form.get("x"), raw);
    }
}
