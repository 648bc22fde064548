//! The page's templates: Rust functions returning HTML, every user string
//! escaped with [`escape`].

use std::fmt::Write as _;

use http::StatusCode;

use super::{
    form::{Form, encode},
    html::{Viewer, csrf_field, described_by, escape, field_error, layout, time},
};
use crate::domain::{
    DomainError,
    audit::AuditEvent,
    scope::BUILT_IN,
    time::Timestamp,
    token::{Token, TokenState},
};

/// The stylesheet, embedded.
pub const CSS: &str = include_str!("assets/app.css");
/// The copy button's script, embedded.
pub const JS: &str = include_str!("assets/copy.js");

/// A form's messages: by field, and general ones.
#[derive(Debug, Default)]
pub struct Errors {
    fields: Vec<(String, String)>,
    general: Vec<String>,
}

impl Errors {
    /// Records `message` for `field`.
    pub fn field(&mut self, field: &str, message: &str) {
        self.fields.push((field.to_owned(), message.to_owned()));
    }

    /// Records a message about the whole form.
    pub fn general(&mut self, message: String) {
        self.general.push(message);
    }

    /// Records a domain error: an invalid field under its field (the
    /// request field's name, `scopes[2]` under `scopes`), anything else
    /// as a general message.
    pub fn add(&mut self, err: &DomainError) {
        match err {
            DomainError::InvalidArgument(violations) => {
                for v in violations {
                    let field = v.field.split('[').next().unwrap_or_default();
                    self.field(field, &super::sentence(&v.description));
                }
            }
            DomainError::TokenLifetime(v) => self.field(&v.field, &super::sentence(&v.description)),
            DomainError::TokenNameTaken => {
                self.field("name", "You already have a live token with this name.");
            }
            other => self.general(super::problem(other).1),
        }
    }

    /// Whether nothing is wrong.
    pub fn is_empty(&self) -> bool {
        self.fields.is_empty() && self.general.is_empty()
    }

    /// The message of `field`, if any (several joined).
    fn get(&self, field: &str) -> Option<String> {
        let found: Vec<&str> = self
            .fields
            .iter()
            .filter(|(f, _)| f == field)
            .map(|(_, m)| m.as_str())
            .collect();
        (!found.is_empty()).then(|| found.join(" "))
    }

    /// The summary at the top of a form: general messages, and messages of
    /// fields the form does not show.
    fn summary(&self, shown: &[&str]) -> String {
        let mut lines: Vec<&str> = self.general.iter().map(String::as_str).collect();
        lines.extend(
            self.fields
                .iter()
                .filter(|(f, _)| !shown.contains(&f.as_str()))
                .map(|(_, m)| m.as_str()),
        );
        if lines.is_empty() {
            return String::new();
        }
        let mut out = String::from(r#"<div class="alert" role="alert">"#);
        for line in lines {
            let _ = write!(out, "<p>{}</p>", escape(line));
        }
        out.push_str("</div>");
        out
    }
}

/// A labelled input with its message.
fn input(errors: &Errors, id: &str, label: &str, kind: &str, value: &str, extra: &str) -> String {
    let message = errors.get(id);
    format!(
        r#"<label for="{id}">{label}</label>{error}<input type="{kind}" id="{id}" name="{id}" value="{value}"{described}{extra}>"#,
        error = field_error(id, message.as_deref()),
        value = escape(value),
        described = described_by(id, message.as_deref()),
    )
}

/// The sign-in form.
pub fn sign_in(csrf: &str, username: &str, errors: &Errors) -> String {
    let body = format!(
        r#"{summary}<form method="post" action="/sign-in">{csrf}
<fieldset><legend>Sign in with your username and password</legend>
{username}
{password}
<p><button type="submit" class="primary">Sign in</button></p>
</fieldset></form>"#,
        summary = errors.summary(&["username", "password"]),
        csrf = csrf_field(csrf),
        username = input(
            errors,
            "username",
            "Username",
            "text",
            username,
            r#" autocomplete="username" required autofocus"#
        ),
        password = input(
            errors,
            "password",
            "Password",
            "password",
            "",
            r#" autocomplete="current-password" required"#
        ),
    );
    layout("Sign in", None, &body)
}

/// A page with one message, for errors.
pub fn message(status: StatusCode, text: &str) -> String {
    let title = status.canonical_reason().unwrap_or("Error");
    layout(
        title,
        None,
        &format!(
            r#"<p role="alert">{}</p><p><a href="/tokens">Back to your access tokens</a></p>"#,
            escape(text)
        ),
    )
}

fn state_name(state: TokenState) -> &'static str {
    match state {
        TokenState::Active => "active",
        TokenState::Expired => "expired",
        TokenState::Revoked => "revoked",
        TokenState::Exhausted => "exhausted",
    }
}

fn scopes_text(token: &Token) -> String {
    if token.scopes.is_full() {
        "full access".to_owned()
    } else {
        escape(&token.scopes.names().collect::<Vec<_>>().join(", "))
    }
}

fn resources_text(token: &Token) -> String {
    if token.resources.is_all() {
        "all".to_owned()
    } else {
        escape(&token.resources.names().collect::<Vec<_>>().join(", "))
    }
}

fn expires_text(token: &Token, state: TokenState, now: Timestamp) -> String {
    let Some(at) = token.expire_time else {
        return "never".to_owned();
    };
    let left = at.as_micros().saturating_sub(now.as_micros()) / 1_000_000;
    if state == TokenState::Active && left < 7 * 86_400 {
        let days = left / 86_400;
        let soon = match days {
            0 => "expires in less than a day".to_owned(),
            1 => "expires in 1 day".to_owned(),
            n => format!("expires in {n} days"),
        };
        format!(r#"{}<br><span class="warning">{soon}</span>"#, time(at))
    } else {
        time(at)
    }
}

/// The columns of the token list, in order: each a heading and the cell
/// of a token.
type Column = (&'static str, fn(&Token, TokenState, Timestamp) -> String);

const COLUMNS: &[Column] = &[
    ("Name", |t, _, _| escape(t.name.as_str())),
    ("Scopes", |t, _, _| scopes_text(t)),
    ("Resources", |t, _, _| resources_text(t)),
    ("Created", |t, _, _| time(t.create_time)),
    ("Expires", expires_text),
    ("Last used", |t, _, _| match t.last_used_time {
        Some(at) if t.last_used_address.is_empty() => time(at),
        Some(at) => format!("{} from {}", time(at), escape(&t.last_used_address)),
        None => "never".to_owned(),
    }),
    ("Uses left", |t, _, _| {
        match (t.uses_remaining, t.max_uses) {
            (Some(left), Some(max)) => format!("{left} of {max}"),
            (Some(left), None) => left.to_string(),
            _ => "unlimited".to_owned(),
        }
    }),
    ("State", |t, state, _| {
        let rotated = if t.replaced_by.is_some() {
            " (regenerated)"
        } else {
            ""
        };
        format!(
            r#"<span class="state-{0}">{0}</span>{rotated}"#,
            state_name(state)
        )
    }),
];

/// The token list, filtered by `state` (`""` for all).
pub fn tokens(
    viewer: &Viewer<'_>,
    tokens: &[Token],
    now: Timestamp,
    state: &str,
    next_page: &str,
    notice: Option<&str>,
) -> String {
    let mut body = String::new();
    if let Some(notice) = notice {
        let _ = write!(
            body,
            r#"<p class="notice" role="status">{}</p>"#,
            escape(notice)
        );
    }
    body.push_str(r#"<div class="actions"><a href="/tokens/new">Create a token</a>"#);
    body.push_str(
        r#"<form method="get" action="/tokens"><label class="inline" for="state">Show</label><select id="state" name="state">"#,
    );
    for (value, label) in [
        ("all", "all tokens"),
        ("active", "active"),
        ("expired", "expired"),
        ("revoked", "revoked"),
        ("exhausted", "exhausted"),
    ] {
        let selected = if value == state || (state.is_empty() && value == "all") {
            " selected"
        } else {
            ""
        };
        let _ = write!(
            body,
            r#"<option value="{value}"{selected}>{label}</option>"#
        );
    }
    body.push_str(r#"</select> <button type="submit">Filter</button></form></div>"#);
    if tokens.is_empty() {
        body.push_str("<p>No tokens to show.</p>");
    } else {
        body.push_str(r#"<table><caption class="hint">Your personal access tokens, oldest first</caption><thead><tr>"#);
        for (heading, _) in COLUMNS {
            let _ = write!(body, r#"<th scope="col">{heading}</th>"#);
        }
        body.push_str(r#"<th scope="col">Actions</th></tr></thead><tbody>"#);
        for token in tokens {
            let state = token.state(now);
            let _ = write!(
                body,
                r#"<tr data-token-id="{}">"#,
                escape(token.id.as_str())
            );
            for (_, cell) in COLUMNS {
                let _ = write!(body, "<td>{}</td>", cell(token, state, now));
            }
            body.push_str("<td>");
            if state == TokenState::Active && token.replaced_by.is_none() {
                let id = encode(token.id.as_str());
                let name = escape(token.name.as_str());
                let _ = write!(
                    body,
                    r#"<a href="/tokens/rotate?id={id}" aria-label="Regenerate {name}">Regenerate</a> · <a href="/tokens/revoke?id={id}" aria-label="Revoke {name}">Revoke</a>"#
                );
            }
            body.push_str("</td></tr>");
        }
        body.push_str("</tbody></table>");
    }
    if !next_page.is_empty() {
        let _ = write!(
            body,
            r#"<p><a href="/tokens?state={}&amp;page={}">Next page</a></p>"#,
            encode(state),
            encode(next_page)
        );
    }
    layout("Access tokens", Some(viewer), &body)
}

/// The creation form, filled with `values` after an error.
pub fn new_token(viewer: &Viewer<'_>, values: &Form, errors: &Errors) -> String {
    let mut scopes = String::new();
    for scope in BUILT_IN {
        let checked = if values.all("scope").any(|s| s == scope) {
            " checked"
        } else {
            ""
        };
        let id = format!("scope-{}", scope.replace(':', "-"));
        let _ = write!(
            scopes,
            r#"<label class="inline" for="{id}"><input type="checkbox" id="{id}" name="scope" value="{scope}"{checked}> <code>{scope}</code></label>"#
        );
    }
    let expires = values.get("expires");
    let expires = if expires.is_empty() { "30" } else { expires };
    let mut presets = String::new();
    for (value, label) in [
        ("7", "7 days"),
        ("30", "30 days"),
        ("60", "60 days"),
        ("90", "90 days"),
        ("date", "on a date:"),
    ] {
        let checked = if value == expires { " checked" } else { "" };
        let _ = write!(
            presets,
            r#"<label class="inline" for="expires-{value}"><input type="radio" id="expires-{value}" name="expires" value="{value}"{checked}> {label}</label>"#
        );
    }
    let date_error = errors.get("expire_date");
    let body = format!(
        r#"{summary}<form method="post" action="/tokens">{csrf}
<fieldset><legend>Token</legend>
{name}
<p class="hint">What the token is for, such as the script or machine that holds it.</p>
</fieldset>
<fieldset><legend>Scopes</legend>
{scopes_error}
<p class="hint">Tick nothing and type nothing for full access to your account.</p>
{scopes}
{other}
<p class="hint">Other scopes, separated by spaces or commas (such as <code>projects:read</code>).</p>
</fieldset>
<fieldset><legend>Resources</legend>
{resources}
<p class="hint">Leave empty for every resource of your account. Otherwise the resources the token may be used on, by their stable ids, separated by spaces or commas: <code>projects/3f9c2a</code> for one project, <code>projects/3f9c2a/*</code> for everything in it.</p>
</fieldset>
<fieldset><legend>Expiration</legend>
{expires_error}
{presets}
<label class="inline" for="expire_date">Date (UTC, the token expires at the end of the day)</label>
{date_message}<input type="date" id="expire_date" name="expire_date" value="{date}"{date_described}>
</fieldset>
<fieldset><legend>Use limit</legend>
{max_uses}
<p class="hint">Leave empty for no limit; 1 gives one-time access.</p>
</fieldset>
<p><button type="submit" class="primary">Create token</button> <a href="/tokens">Cancel</a></p>
</form>"#,
        summary = errors.summary(&[
            "name",
            "scopes",
            "resources",
            "expires",
            "expire_date",
            "max_uses"
        ]),
        csrf = csrf_field(viewer.csrf),
        name = input(
            errors,
            "name",
            "Name",
            "text",
            values.get("name"),
            r#" required maxlength="100" autofocus"#
        ),
        scopes_error = field_error("scopes", errors.get("scopes").as_deref()),
        other = input(
            errors,
            "other_scopes",
            "Other scopes",
            "text",
            values.get("other_scopes"),
            ""
        ),
        resources = input(
            errors,
            "resources",
            "Resources",
            "text",
            values.get("resources"),
            ""
        ),
        expires_error = field_error("expires", errors.get("expires").as_deref()),
        date_message = field_error("expire_date", date_error.as_deref()),
        date = escape(values.get("expire_date")),
        date_described = described_by("expire_date", date_error.as_deref()),
        max_uses = input(
            errors,
            "max_uses",
            "Uses allowed",
            "number",
            values.get("max_uses"),
            r#" min="1" inputmode="numeric""#
        ),
    );
    layout("Create a token", Some(viewer), &body)
}

/// The new secret, shown once.
pub fn secret(viewer: &Viewer<'_>, token: &Token, secret: &str, regenerated: bool) -> String {
    let secret = escape(secret);
    let body = format!(
        r#"<div class="alert" role="alert"><p><strong>Copy the token now: it will not be shown again.</strong> Anyone who has it can act as you within its scopes; keep it like a password.</p></div>
<p>{what} <strong>{name}</strong>{scopes}.</p>
<label for="secret">Token</label>
<input type="text" id="secret" class="secret" value="{secret}" readonly data-testid="secret">
<p><button type="button" data-copy="secret" hidden>Copy to clipboard</button></p>
<h2>Using it</h2>
<p>In a shell:</p>
<pre><code>export IDENTITY_TOKEN={secret}</code></pre>
<p>As a gRPC or HTTP header:</p>
<pre><code>authorization: Bearer {secret}</code></pre>
<p><a href="/tokens">I have copied it: back to the access tokens</a></p>"#,
        what = if regenerated {
            "The new token that replaces"
        } else {
            "Your new token"
        },
        name = escape(token.name.as_str()),
        scopes = if token.scopes.is_full() {
            ", with full access".to_owned()
        } else {
            format!(", with the scopes {}", scopes_text(token))
        },
    );
    layout(
        if regenerated {
            "Token regenerated"
        } else {
            "Token created"
        },
        Some(viewer),
        &body,
    )
}

/// The confirmation of a revocation (or, `rotate`, a regeneration).
pub fn confirm(viewer: &Viewer<'_>, token: &Token, rotate: bool) -> String {
    let name = escape(token.name.as_str());
    let (title, what, action, button, class) = if rotate {
        (
            "Regenerate a token",
            "A new secret replaces this token's; the old one keeps working only for the server's grace period. The new secret is shown once.",
            "/tokens/rotate",
            "Regenerate",
            "primary",
        )
    } else {
        (
            "Revoke a token",
            "Anything using this token stops working at once. This cannot be undone.",
            "/tokens/revoke",
            "Revoke",
            "danger",
        )
    };
    let body = format!(
        r#"<p>{what}</p><p>Token: <strong>{name}</strong> ({scopes}).</p>
<form method="post" action="{action}">{csrf}<input type="hidden" name="id" value="{id}">
<p><button type="submit" class="{class}">{button} {name}</button> <a href="/tokens">Cancel</a></p></form>"#,
        scopes = scopes_text(token),
        csrf = csrf_field(viewer.csrf),
        id = escape(token.id.as_str()),
    );
    layout(title, Some(viewer), &body)
}

/// The account page: change password, sign out everywhere, and the
/// account's own audit events, newest first.
pub fn account(
    viewer: &Viewer<'_>,
    events: &[AuditEvent],
    errors: &Errors,
    notice: Option<&str>,
) -> String {
    let mut log = String::new();
    if events.is_empty() {
        log.push_str("<p>No events yet.</p>");
    } else {
        log.push_str(r#"<table><thead><tr><th scope="col">When</th><th scope="col">Event</th><th scope="col">Outcome</th><th scope="col">From</th></tr></thead><tbody>"#);
        for event in events {
            let _ = write!(
                log,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                time(event.time),
                escape(event.kind.as_str()),
                escape(event.outcome.as_str()),
                escape(&event.source_address),
            );
        }
        log.push_str("</tbody></table>");
    }
    let body = format!(
        r#"{notice}{summary}<h2>Change password</h2>
<form method="post" action="/account/password">{csrf}
<fieldset><legend>Change your password (ends your other sessions)</legend>
{current}
{new}
{again}
<p><button type="submit" class="primary">Change password</button></p>
</fieldset></form>
<h2>Sessions</h2>
<form method="post" action="/account/sign-out-everywhere">{csrf}
<p>Ends every session of your account, this one included. Access tokens keep working.</p>
<p><button type="submit" class="danger">Sign out everywhere</button></p></form>
<h2>Security log</h2>
<p class="hint">Your account's audit events, newest first.</p>
{log}"#,
        notice = notice.map_or_else(String::new, |n| format!(
            r#"<p class="notice" role="status">{}</p>"#,
            escape(n)
        )),
        summary = errors.summary(&["current_password", "new_password", "new_password_again"]),
        csrf = csrf_field(viewer.csrf),
        current = input(
            errors,
            "current_password",
            "Current password",
            "password",
            "",
            r#" autocomplete="current-password" required"#
        ),
        new = input(
            errors,
            "new_password",
            "New password",
            "password",
            "",
            r#" autocomplete="new-password" required"#
        ),
        again = input(
            errors,
            "new_password_again",
            "New password, again",
            "password",
            "",
            r#" autocomplete="new-password" required"#
        ),
    );
    layout("Account", Some(viewer), &body)
}
