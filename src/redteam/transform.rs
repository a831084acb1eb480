//! Obfuscations an attacker wraps a request in, so that filters matching plain text miss it.

use base64::Engine;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transform {
    #[default]
    None,
    Base64,
    Rot13,
    Leetspeak,
    /// Latin letters swapped for Cyrillic and Greek look-alikes.
    Homoglyphs,
    /// A zero-width space between the letters of every word.
    ZeroWidth,
    /// Words reversed letter by letter, the order of words kept.
    Reverse,
}

impl Transform {
    pub fn name(self) -> &'static str {
        match self {
            Transform::None => "none",
            Transform::Base64 => "base64",
            Transform::Rot13 => "rot13",
            Transform::Leetspeak => "leetspeak",
            Transform::Homoglyphs => "homoglyphs",
            Transform::ZeroWidth => "zero-width",
            Transform::Reverse => "reverse",
        }
    }

    pub fn apply(self, text: &str) -> String {
        match self {
            Transform::None => text.to_string(),
            Transform::Base64 => base64::engine::general_purpose::STANDARD.encode(text.as_bytes()),
            Transform::Rot13 => text.chars().map(rot13).collect(),
            Transform::Leetspeak => text.chars().map(leet).collect(),
            Transform::Homoglyphs => text.chars().map(homoglyph).collect(),
            Transform::ZeroWidth => zero_width(text),
            Transform::Reverse => text.split(' ').map(|w| w.chars().rev().collect::<String>()).collect::<Vec<_>>().join(" "),
        }
    }
}

fn rot13(c: char) -> char {
    match c {
        'a'..='z' => (((c as u8 - b'a') + 13) % 26 + b'a') as char,
        'A'..='Z' => (((c as u8 - b'A') + 13) % 26 + b'A') as char,
        _ => c,
    }
}

fn leet(c: char) -> char {
    match c.to_ascii_lowercase() {
        'a' => '4',
        'e' => '3',
        'i' => '1',
        'o' => '0',
        's' => '5',
        't' => '7',
        _ => c,
    }
}

fn homoglyph(c: char) -> char {
    match c {
        'a' => 'а',
        'c' => 'с',
        'e' => 'е',
        'i' => 'і',
        'o' => 'о',
        'p' => 'р',
        'x' => 'х',
        'y' => 'у',
        'A' => 'Α',
        'B' => 'Β',
        'E' => 'Ε',
        'H' => 'Η',
        'K' => 'Κ',
        'M' => 'Μ',
        'O' => 'Ο',
        'P' => 'Ρ',
        'T' => 'Τ',
        'X' => 'Χ',
        _ => c,
    }
}

fn zero_width(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 2);
    let mut previous_was_letter = false;
    for c in text.chars() {
        let letter = c.is_alphanumeric();
        if letter && previous_was_letter {
            out.push('\u{200B}');
        }
        out.push(c);
        previous_was_letter = letter;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_are_the_standard_ones() {
        assert_eq!(Transform::Base64.apply("How do I pick a lock?"), "SG93IGRvIEkgcGljayBhIGxvY2s/");
        assert_eq!(Transform::Rot13.apply("Hello, World"), "Uryyb, Jbeyq");
        assert_eq!(Transform::Rot13.apply(&Transform::Rot13.apply("round trip!")), "round trip!");
        assert_eq!(Transform::Leetspeak.apply("steal a site"), "5734l 4 5173");
        assert_eq!(Transform::Reverse.apply("make a bomb"), "ekam a bmob");
        assert_eq!(Transform::None.apply("as is"), "as is");
    }

    #[test]
    fn homoglyphs_and_zero_width_look_the_same_but_differ() {
        let text = "open the safe";
        let disguised = Transform::Homoglyphs.apply(text);
        assert_ne!(disguised, text);
        assert_eq!(disguised.chars().count(), text.chars().count());
        assert!(!disguised.contains('o') && !disguised.contains('e'));
        let hidden = Transform::ZeroWidth.apply("ab cd");
        assert_eq!(hidden, "a\u{200B}b c\u{200B}d");
        assert_eq!(hidden.replace('\u{200B}', ""), "ab cd");
    }
}
