//! Pagination after AIP-158: a page size with a default and a ceiling, and
//! opaque page tokens that name the last item returned and the listing they
//! belong to, so a token from one listing is refused by another.

use super::DomainError;

/// Page size when the client asks for 0.
pub const DEFAULT_PAGE_SIZE: u32 = 50;
/// Largest page served; larger requests are clamped to it.
pub const MAX_PAGE_SIZE: u32 = 1000;

/// The listing name that scopes account page tokens.
pub const ACCOUNTS_LISTING: &str = "accounts";

/// The listing name that scopes one account's token page tokens.
pub fn tokens_listing(account: &super::account::AccountId) -> String {
    format!("tokens/{account}")
}

/// A validated request for one page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest {
    /// How many items to return at most (1..=MAX_PAGE_SIZE).
    pub size: u32,
    /// The id of the last item of the previous page, if any.
    pub after: Option<String>,
}

impl PageRequest {
    /// Parses `page_size` and `page_token` for the listing named `listing`
    /// (such as `accounts` or `tokens/<account id>`).
    pub fn parse(listing: &str, page_size: i32, page_token: &str) -> Result<Self, DomainError> {
        let size = match page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n < 0 => return Err(DomainError::invalid("page_size", "must not be negative")),
            n => u32::try_from(n).unwrap_or(MAX_PAGE_SIZE).min(MAX_PAGE_SIZE),
        };
        let after = if page_token.is_empty() {
            None
        } else {
            Some(decode(listing, page_token).ok_or_else(|| {
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
        mut items: Vec<T>,
        id: impl Fn(&T) -> &str,
    ) -> (Vec<T>, String) {
        let size = self.size as usize;
        if items.len() > size {
            items.truncate(size);
            let next = items
                .last()
                .map(|last| encode(listing, id(last)))
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

fn decode(listing: &str, token: &str) -> Option<String> {
    if !token.len().is_multiple_of(2) || token.len() > 512 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
        .collect();
    let plain = String::from_utf8(bytes?).ok()?;
    let (owner, last_id) = plain.split_once('\n')?;
    (owner == listing && uuid::Uuid::try_parse(last_id).is_ok()).then(|| last_id.to_owned())
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
