//! Pagination after AIP-158: a page size with a default and a ceiling, and
//! opaque page tokens that name the last item returned and the listing they
//! belong to, so a token from one listing is refused by another.
//!
//! Every listing is a keyset listing: the token names the last item's key
//! (its id, or for a listing ordered by time its time and id), and the next
//! page starts after it, so a deep page costs what the first does (an index
//! range scan), never an `OFFSET`.

use super::{DomainError, time::Timestamp};

/// Page size when the client asks for 0.
pub const DEFAULT_PAGE_SIZE: u32 = 50;
/// Largest page served; larger requests are clamped to it.
pub const MAX_PAGE_SIZE: u32 = 1000;

/// The listing name that scopes account page tokens.
pub const ACCOUNTS_LISTING: &str = "accounts";

/// The listing name that scopes token page tokens: one account's tokens, or
/// every account's (`None`, the operators' fleet-wide listing).
pub fn tokens_listing(account: Option<&super::account::AccountId>) -> String {
    match account {
        Some(account) => format!("tokens/{account}"),
        None => "tokens/*".to_owned(),
    }
}

/// The key of an item in a listing ordered by time, then id: what
/// [`PageRequest::parse_timed`] accepts and [`split_time_key`] reads back.
pub fn time_key(time: Timestamp, id: &str) -> String {
    format!("{}.{id}", time.as_micros())
}

/// The time and id of a key made by [`time_key`]; `None` for anything else.
pub fn split_time_key(key: &str) -> Option<(Timestamp, &str)> {
    let (micros, id) = key.split_once('.')?;
    let micros: i64 = micros.parse().ok()?;
    let time = Timestamp::from_micros(micros);
    ((Timestamp::MIN..=Timestamp::MAX).contains(&time) && uuid::Uuid::try_parse(id).is_ok())
        .then_some((time, id))
}

/// A validated request for one page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest {
    /// How many items to return at most (1..=MAX_PAGE_SIZE).
    pub size: u32,
    /// The key of the last item of the previous page, if any: its id, or
    /// for a listing parsed with [`Self::parse_timed`] a [`time_key`].
    pub after: Option<String>,
}

impl PageRequest {
    /// Parses `page_size` and `page_token` for the listing named `listing`
    /// (such as `accounts` or `tokens/<account id>`), ordered by id.
    pub fn parse(listing: &str, page_size: i32, page_token: &str) -> Result<Self, DomainError> {
        Self::parse_keyed(listing, page_size, page_token, |key| {
            uuid::Uuid::try_parse(key).is_ok()
        })
    }

    /// As [`Self::parse`], for a listing ordered by time, then id, whose
    /// tokens carry a [`time_key`].
    pub fn parse_timed(
        listing: &str,
        page_size: i32,
        page_token: &str,
    ) -> Result<Self, DomainError> {
        Self::parse_keyed(listing, page_size, page_token, |key| {
            split_time_key(key).is_some()
        })
    }

    fn parse_keyed(
        listing: &str,
        page_size: i32,
        page_token: &str,
        valid_key: impl Fn(&str) -> bool,
    ) -> Result<Self, DomainError> {
        let size = match page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n < 0 => return Err(DomainError::invalid("page_size", "must not be negative")),
            n => u32::try_from(n).unwrap_or(MAX_PAGE_SIZE).min(MAX_PAGE_SIZE),
        };
        let after = if page_token.is_empty() {
            None
        } else {
            Some(decode(listing, page_token, valid_key).ok_or_else(|| {
                DomainError::invalid("page_token", "is not a page token of this listing")
            })?)
        };
        Ok(Self { size, after })
    }

    /// How many rows to fetch: one more than the page, to learn whether
    /// another page follows without a second query.
    pub fn fetch_limit(&self) -> u32 {
        self.size + 1
    }

    /// Trims a fetched batch to the page and returns the next page token
    /// (empty when this is the last page). `id` gives an item's id.
    pub fn finish<T>(
        &self,
        listing: &str,
        items: Vec<T>,
        id: impl Fn(&T) -> &str,
    ) -> (Vec<T>, String) {
        self.finish_keyed(listing, items, |item| id(item).to_owned())
    }

    /// As [`Self::finish`], where `key` gives an item's key (a
    /// [`time_key`] for a listing parsed with [`Self::parse_timed`]).
    pub fn finish_keyed<T>(
        &self,
        listing: &str,
        mut items: Vec<T>,
        key: impl Fn(&T) -> String,
    ) -> (Vec<T>, String) {
        let size = self.size as usize;
        if items.len() > size {
            items.truncate(size);
            let next = items
                .last()
                .map(|last| encode(listing, &key(last)))
                .unwrap_or_default();
            (items, next)
        } else {
            (items, String::new())
        }
    }
}

fn encode(listing: &str, last_id: &str) -> String {
    let plain = format!("{listing}\n{last_id}");
    plain.bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode(listing: &str, token: &str, valid_key: impl Fn(&str) -> bool) -> Option<String> {
    if !token.len().is_multiple_of(2) || token.len() > 512 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
        .collect();
    let plain = String::from_utf8(bytes?).ok()?;
    let (owner, last_id) = plain.split_once('\n')?;
    (owner == listing && valid_key(last_id)).then(|| last_id.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_default_and_clamp() {
        assert_eq!(
            PageRequest::parse("a", 0, "").expect("ok").size,
            DEFAULT_PAGE_SIZE
        );
        assert_eq!(
            PageRequest::parse("a", 5000, "").expect("ok").size,
            MAX_PAGE_SIZE
        );
        assert!(PageRequest::parse("a", -1, "").is_err());
    }

    #[test]
    fn tokens_round_trip_and_stay_in_their_listing() {
        let id = uuid::Uuid::now_v7().to_string();
        let page = PageRequest {
            size: 1,
            after: None,
        };
        let (items, next) = page.finish("accounts", vec![id.clone(), "x".into()], |s| s);
        assert_eq!(items, std::slice::from_ref(&id));
        assert_eq!(
            PageRequest::parse("accounts", 1, &next).expect("ok").after,
            Some(id)
        );
        assert!(PageRequest::parse("tokens/x", 1, &next).is_err());
        assert!(PageRequest::parse("accounts", 1, "zz").is_err());
        assert!(PageRequest::parse("accounts", 1, "abc").is_err());
    }

    #[test]
    fn timed_tokens_carry_time_and_id_and_only_those() {
        let id = uuid::Uuid::now_v7().to_string();
        let at = Timestamp::from_micros(-5);
        let page = PageRequest {
            size: 1,
            after: None,
        };
        let (_, next) = page.finish_keyed("audit/*", vec![1, 2], |_| time_key(at, &id));
        let parsed = PageRequest::parse_timed("audit/*", 1, &next).expect("ok");
        assert_eq!(
            parsed.after.as_deref().and_then(split_time_key),
            Some((at, id.as_str()))
        );
        // A plain id is not a key of a timed listing, nor the reverse.
        let (_, plain) = page.finish("audit/*", vec![id.clone(), id.clone()], |s| s);
        assert!(PageRequest::parse_timed("audit/*", 1, &plain).is_err());
        assert!(PageRequest::parse("audit/*", 1, &next).is_err());
        for bad in [
            "1.x".to_owned(),
            format!("x.{id}"),
            format!("99999999999999999999.{id}"),
        ] {
            assert_eq!(split_time_key(&bad), None, "{bad}");
        }
    }

    #[test]
    fn the_last_page_has_no_next_token() {
        let page = PageRequest {
            size: 2,
            after: None,
        };
        let (items, next) = page.finish("a", vec!["1".to_string(), "2".to_string()], |s| s);
        assert_eq!(items.len(), 2);
        assert!(next.is_empty());
    }
}
