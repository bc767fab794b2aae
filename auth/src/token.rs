//! An optional bearer token for the inference port: `authorization: Bearer <token>` on every
//! request, compared in constant time. Read from a file, so that it stays out of process
//! listings and unit files.

use std::path::Path;

use subtle::ConstantTimeEq;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::Status;

const HEADER: &str = "authorization";

/// A shared secret. Its Debug form hides it.
#[derive(Clone)]
pub struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(…)")
    }
}

impl Token {
    /// The token in `path` (surrounding whitespace trimmed): 16–4096 printable ASCII characters.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        crate::warn_if_exposed(path, "the inference token file");
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("reading the token file {}: {e}", path.display()))?;
        Self::new(text.trim())
    }

    pub fn new(token: &str) -> Result<Self, String> {
        if !(16..=4096).contains(&token.len()) || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("a token is 16–4096 printable ASCII characters without spaces".into());
        }
        Ok(Self(token.to_string()))
    }

    /// Adds the token to a request's metadata.
    pub fn attach(&self, metadata: &mut MetadataMap) {
        if let Ok(value) = MetadataValue::try_from(format!("Bearer {}", self.0)) {
            metadata.insert(HEADER, value);
        }
    }

    /// UNAUTHENTICATED unless `metadata` carries this token.
    pub fn check(&self, metadata: &MetadataMap) -> Result<(), Status> {
        self.check_header(metadata.get(HEADER).and_then(|v| v.to_str().ok()))
    }

    /// The same for the value of an `authorization` header (an HTTP request's), if any.
    pub fn check_header(&self, authorization: Option<&str>) -> Result<(), Status> {
        match authorization.and_then(|v| v.strip_prefix("Bearer ")) {
            Some(t) if bool::from(t.as_bytes().ct_eq(self.0.as_bytes())) => Ok(()),
            Some(_) => Err(Status::unauthenticated("the inference token does not match")),
            None => Err(Status::unauthenticated(
                "this agent takes inference requests with `authorization: Bearer <token>` only",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_token_itself_passes() {
        let token = Token::new("0123456789abcdef").unwrap();
        let mut m = MetadataMap::new();
        assert_eq!(token.check(&m).unwrap_err().code(), tonic::Code::Unauthenticated);
        Token::new("0123456789abcdeX").unwrap().attach(&mut m);
        assert_eq!(token.check(&m).unwrap_err().code(), tonic::Code::Unauthenticated);
        token.attach(&mut m);
        assert!(token.check(&m).is_ok());
        assert!(Token::new("short").is_err());
        assert!(Token::new("with a space in it!").is_err());
        assert_eq!(format!("{token:?}"), "Token(…)");
    }
}
