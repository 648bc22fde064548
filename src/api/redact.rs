//! `Debug` for the generated messages that carry a secret (`build.rs` tells
//! prost not to derive it): the secret prints as `[redacted]`, everything
//! else as usual, so these messages can be logged without leaking.

use std::fmt;

use super::pb;

const REDACTED: &str = "[redacted]";

impl fmt::Debug for pb::CreateAccountRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreateAccountRequest")
            .field("username", &self.username)
            .field("password", &REDACTED)
            .field("email", &self.email)
            .field("kind", &self.kind)
            .field("role", &self.role)
            .finish()
    }
}

impl fmt::Debug for pb::SignInRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignInRequest")
            .field("username", &self.username)
            .field("password", &REDACTED)
            .finish()
    }
}

impl fmt::Debug for pb::SignInResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignInResponse")
            .field("session_token", &REDACTED)
            .field("account", &self.account)
            .field("expire_time", &self.expire_time)
            .field("session_id", &self.session_id)
            .finish()
    }
}

impl fmt::Debug for pb::CreateTokenResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreateTokenResponse")
            .field("token", &self.token)
            .field("secret", &REDACTED)
            .finish()
    }
}

impl fmt::Debug for pb::VerifyTokenRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyTokenRequest")
            .field("token", &REDACTED)
            .field("required_scopes", &self.required_scopes)
            .field("required_resources", &self.required_resources)
            .finish()
    }
}

impl fmt::Debug for pb::ChangePasswordRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChangePasswordRequest")
            .field("current_password", &REDACTED)
            .field("new_password", &REDACTED)
            .finish()
    }
}

impl fmt::Debug for pb::RotateTokenResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RotateTokenResponse")
            .field("token", &self.token)
            .field("secret", &REDACTED)
            .field("previous", &self.previous)
            .finish()
    }
}

impl fmt::Debug for pb::RevokeLeakedTokenRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RevokeLeakedTokenRequest")
            .field(
                "secrets",
                &format_args!("[{} redacted]", self.secrets.len()),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_fields_never_print() {
        let secret = "idpat_supersecretvalue";
        let shown = [
            format!(
                "{:?}",
                pb::CreateAccountRequest {
                    password: secret.into(),
                    ..Default::default()
                }
            ),
            format!(
                "{:?}",
                pb::SignInRequest {
                    password: secret.into(),
                    ..Default::default()
                }
            ),
            format!(
                "{:?}",
                pb::SignInResponse {
                    session_token: secret.into(),
                    ..Default::default()
                }
            ),
            format!(
                "{:?}",
                pb::CreateTokenResponse {
                    secret: secret.into(),
                    ..Default::default()
                }
            ),
            format!(
                "{:?}",
                pb::VerifyTokenRequest {
                    token: secret.into(),
                    ..Default::default()
                }
            ),
        ];
        for text in shown {
            assert!(!text.contains(secret), "{text}");
            assert!(text.contains(REDACTED), "{text}");
        }
    }
}
