//! Names of source servers and volumes.
//!
//! Both become path components on the receiver (`staging/<server>/<volume>.img`)
//! and object-store keys, so they are validated wherever they enter: 1 to 64
//! characters from `[A-Za-z0-9._-]`, not starting with `.` or `-`.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest accepted name, in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// A name that is not safe to use as a path component or key.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {kind} name {name:?}: {reason}")]
pub struct NameError {
    /// What the name was for ("server" or "volume").
    pub kind: &'static str,
    /// The rejected name (truncated to 80 characters).
    pub name: String,
    /// Why it was rejected.
    pub reason: &'static str,
}

fn validate(kind: &'static str, name: &str) -> Result<(), NameError> {
    let err = |reason| NameError {
        kind,
        name: name.chars().take(80).collect(),
        reason,
    };
    if name.is_empty() {
        return Err(err("it is empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(err("it is longer than 64 bytes"));
    }
    if name.starts_with('.') || name.starts_with('-') {
        return Err(err("it must not start with '.' or '-'"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(err("only letters, digits, '.', '_' and '-' are allowed"));
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $ty:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $ty(String);

        impl $ty {
            /// Validates and wraps a name.
            pub fn new(name: impl Into<String>) -> Result<Self, NameError> {
                let name = name.into();
                validate($kind, &name)?;
                Ok(Self(name))
            }

            /// The name as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $ty {
            type Error = NameError;
            fn try_from(s: String) -> Result<Self, NameError> {
                Self::new(s)
            }
        }

        impl From<$ty> for String {
            fn from(n: $ty) -> String {
                n.0
            }
        }

        impl std::str::FromStr for $ty {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                Self::new(s)
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

name_type!(
    /// The name of a source server, taken from its client certificate.
    ServerName,
    "server"
);
name_type!(
    /// The name of one volume of a source server.
    VolumeName,
    "volume"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_names() {
        for n in ["web-1", "data", "vm_disk.0", "A", &"x".repeat(64)] {
            assert!(ServerName::new(n).is_ok(), "{n}");
            assert!(VolumeName::new(n).is_ok(), "{n}");
        }
    }

    #[test]
    fn rejects_path_like_names() {
        for n in [
            "",
            ".",
            "..",
            "../etc",
            "a/b",
            "a\\b",
            "-rf",
            ".hidden",
            "a b",
            "é",
            &"x".repeat(65),
            "a\0b",
        ] {
            let e = VolumeName::new(n);
            assert!(e.is_err(), "{n:?} accepted");
        }
        let e = ServerName::new("a/b").unwrap_err();
        assert!(e.to_string().contains("server"));
    }
}
