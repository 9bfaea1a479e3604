//! Operators' bearer tokens for the admin commands. A token comes from `RAMPART_ADMIN_TOKEN`
//! (named `admin`) or from the file `[service] admin_tokens` names (one `NAME TOKEN` per line,
//! `#` comments), which is re-read when it changes so that tokens can be rotated without a
//! restart. Only SHA-256 digests of the tokens are kept; a presented token is compared with
//! every one of them in constant time.

use std::path::Path;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::watch::Reread;

/// The name of the token read from `RAMPART_ADMIN_TOKEN`.
pub const ENV_TOKEN_NAME: &str = "admin";
/// Shorter tokens are refused: they could be guessed.
pub const MIN_TOKEN_LEN: usize = 16;

/// What a request's `Authorization` header earns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// A valid token: its name, the operator the audit log records.
    Granted(String),
    /// No token is configured: admin commands are off (403).
    Disabled,
    /// No bearer token in the request (401).
    Missing,
    /// A token that is not valid (401).
    Wrong,
}

impl Access {
    /// The `reason` label of a refusal in metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Granted(_) => "granted",
            Self::Disabled => "disabled",
            Self::Missing => "missing",
            Self::Wrong => "wrong",
        }
    }
}

struct Token {
    name: String,
    digest: [u8; 32],
}

/// The valid tokens, kept up to date with their file.
pub struct Tokens {
    env: Option<Token>,
    /// The file's tokens, re-read when it changes; a file that became unreadable or invalid
    /// keeps the tokens it had (a rotation half written does not lock operators out).
    file: Option<Reread<Vec<Token>>>,
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The tokens of a tokens file's text; every problem with its line.
fn parse(text: &str, path: &Path) -> Result<Vec<Token>, String> {
    let mut tokens: Vec<Token> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = format!("{}:{}", path.display(), n + 1);
        let mut parts = line.split_whitespace();
        let (Some(name), Some(token), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!("{at}: write one `NAME TOKEN` per line"));
        };
        if token.len() < MIN_TOKEN_LEN {
            return Err(format!(
                "{at}: the token of `{name}` is shorter than {MIN_TOKEN_LEN} characters"
            ));
        }
        if tokens.iter().any(|t| t.name == name) {
            return Err(format!("{at}: `{name}` is named twice"));
        }
        tokens.push(Token {
            name: name.into(),
            digest: digest(token),
        });
    }
    Ok(tokens)
}

fn read(path: &Path) -> Result<Vec<Token>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the admin tokens {}: {e}", path.display()))?;
    parse(&text, path)
}

impl Tokens {
    /// The tokens of `env` (`RAMPART_ADMIN_TOKEN`'s value) and of `file`. A file that cannot
    /// be read or has a bad line stops the start.
    pub fn load(env: Option<&str>, file: Option<&Path>) -> Result<Self, String> {
        let env = match env.map(str::trim).filter(|t| !t.is_empty()) {
            Some(token) if token.len() < MIN_TOKEN_LEN => {
                return Err(format!(
                    "RAMPART_ADMIN_TOKEN is shorter than {MIN_TOKEN_LEN} characters"
                ));
            }
            Some(token) => Some(Token {
                name: ENV_TOKEN_NAME.into(),
                digest: digest(token),
            }),
            None => None,
        };
        let file = match file {
            Some(path) => {
                warn_if_others_can_read(path);
                let path = path.to_path_buf();
                Some(Reread::load("admin tokens", vec![path.clone()], move || {
                    read(&path)
                })?)
            }
            None => None,
        };
        Ok(Self { env, file })
    }

    /// Whether any token is configured (else admin commands are off).
    pub fn configured(&self) -> bool {
        self.env.is_some() || self.file.is_some()
    }

    /// What the `Authorization` header's value (if any) earns.
    pub fn check(&self, authorization: Option<&str>) -> Access {
        let from_file = self.file.as_ref().map(Reread::get);
        if !self.configured() {
            return Access::Disabled;
        }
        let Some(presented) = authorization.and_then(bearer) else {
            return Access::Missing;
        };
        let presented = digest(presented);
        // Every token is compared, each in constant time: the time taken says nothing of
        // which one, if any, matched.
        let mut granted = None;
        for token in self.env.iter().chain(from_file.iter().flat_map(|t| t.iter())) {
            if bool::from(token.digest.ct_eq(&presented)) && granted.is_none() {
                granted = Some(token.name.clone());
            }
        }
        granted.map_or(Access::Wrong, Access::Granted)
    }
}

/// The token of a `Bearer` authorization (the scheme is case-insensitive).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(unix)]
fn warn_if_others_can_read(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            file = %path.display(),
            "the admin tokens file can be read by other users: `chmod 600` it"
        );
    }
}

#[cfg(not(unix))]
fn warn_if_others_can_read(_path: &Path) {}

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE: &str = "alice-0123456789abcdef";
    const BOB: &str = "bob-0123456789abcdef00";

    #[test]
    fn a_token_is_granted_under_its_name_and_anything_else_is_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("tokens");
        std::fs::write(&file, format!("# operators\nalice {ALICE}\n\nbob {BOB}\n")).expect("write");
        let tokens = Tokens::load(Some("env-0123456789abcdef"), Some(&file)).expect("loads");
        assert_eq!(
            tokens.check(Some(&format!("Bearer {ALICE}"))),
            Access::Granted("alice".into())
        );
        assert_eq!(
            tokens.check(Some(&format!("bearer {BOB}"))),
            Access::Granted("bob".into())
        );
        assert_eq!(
            tokens.check(Some("Bearer env-0123456789abcdef")),
            Access::Granted("admin".into())
        );
        assert_eq!(tokens.check(None), Access::Missing);
        assert_eq!(tokens.check(Some(&format!("Basic {ALICE}"))), Access::Missing);
        assert_eq!(tokens.check(Some("Bearer ")), Access::Missing);
        assert_eq!(tokens.check(Some(&format!("Bearer {ALICE}x"))), Access::Wrong);
        assert_eq!(tokens.check(Some("Bearer alice")), Access::Wrong);
    }

    #[test]
    fn with_no_token_admin_commands_are_off_and_bad_files_are_refused_with_their_line() {
        let none = Tokens::load(None, None).expect("loads");
        assert_eq!(none.check(Some(&format!("Bearer {ALICE}"))), Access::Disabled);
        assert!(Tokens::load(Some("short"), None).is_err());
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("tokens");
        for (text, why) in [
            (
                format!("alice {ALICE}\nbob short\n"),
                ":2: the token of `bob` is shorter",
            ),
            (
                format!("alice {ALICE}\nalice {BOB}\n"),
                ":2: `alice` is named twice",
            ),
            (
                format!("alice {ALICE} extra\n"),
                ":1: write one `NAME TOKEN` per line",
            ),
        ] {
            std::fs::write(&file, text).expect("write");
            let err = Tokens::load(None, Some(&file)).err().expect("refused");
            assert!(err.contains(why), "{err}");
        }
        let missing = Tokens::load(None, Some(&dir.path().join("nope")))
            .err()
            .expect("refused");
        assert!(missing.contains("cannot read the admin tokens"), "{missing}");
    }

    #[test]
    fn a_changed_file_is_re_read_and_a_broken_one_keeps_the_previous_tokens() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("tokens");
        std::fs::write(&file, format!("alice {ALICE}\n")).expect("write");
        let tokens = Tokens::load(None, Some(&file)).expect("loads");
        assert_eq!(
            tokens.check(Some(&format!("Bearer {ALICE}"))),
            Access::Granted("alice".into())
        );
        // Rotation: bob replaces alice (a longer file: its length changes with the content).
        std::fs::write(&file, format!("bob {BOB}\n# rotated\n")).expect("write");
        assert_eq!(tokens.check(Some(&format!("Bearer {ALICE}"))), Access::Wrong);
        assert_eq!(
            tokens.check(Some(&format!("Bearer {BOB}"))),
            Access::Granted("bob".into())
        );
        std::fs::write(&file, "bob\n").expect("write");
        assert_eq!(
            tokens.check(Some(&format!("Bearer {BOB}"))),
            Access::Granted("bob".into()),
            "a broken file keeps the previous tokens"
        );
    }
}
