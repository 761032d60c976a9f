//! A session id carried without an allocation when it is short, as the real
//! data's are (UUIDs, 36 bytes): recording a scored cart then allocates
//! nothing on the scoring core, and the writer frees nothing that core
//! allocated (a cross-thread free the in-process bench showed at p99).

use std::fmt;
use std::ops::Deref;

/// Bytes held inline; longer ids (validation allows 128) go to the heap.
const INLINE: usize = 62;

#[derive(Clone, PartialEq, Eq)]
pub enum SessionText {
    Inline { len: u8, bytes: [u8; INLINE] },
    Heap(Box<str>),
}

impl SessionText {
    pub fn new(text: &str) -> Self {
        let Ok(len) = u8::try_from(text.len()) else {
            return Self::Heap(text.into());
        };
        if text.len() > INLINE {
            return Self::Heap(text.into());
        }
        let mut bytes = [0; INLINE];
        bytes[..text.len()].copy_from_slice(text.as_bytes());
        Self::Inline { len, bytes }
    }

    pub fn as_str(&self) -> &str {
        match self {
            // Copied from a `str` whole, so always UTF-8; the check is cheap
            // and keeps this free of `unsafe`.
            Self::Inline { len, bytes } => {
                std::str::from_utf8(&bytes[..usize::from(*len)]).unwrap_or_default()
            }
            Self::Heap(text) => text,
        }
    }
}

impl Deref for SessionText {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl From<&str> for SessionText {
    fn from(text: &str) -> Self {
        Self::new(text)
    }
}

impl fmt::Debug for SessionText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_ids_stay_inline_and_every_id_reads_back() {
        let uuid = "8187d148-3c41-46d4-b0c0-9c08cd9dc564";
        assert!(matches!(SessionText::new(uuid), SessionText::Inline { .. }));
        let long = "é".repeat(64);
        assert!(matches!(SessionText::new(&long), SessionText::Heap(_)));
        for text in [
            "",
            "s",
            uuid,
            &"x".repeat(INLINE),
            &"x".repeat(INLINE + 1),
            &long,
        ] {
            assert_eq!(&*SessionText::new(text), text);
        }
    }
}
