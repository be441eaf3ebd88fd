//! Printing: aligned tables for people, JSON for scripts. Everything printed passes through
//! [`escape`]: stored text (names, reasons, audit actors, a server's reply) can neither drive the
//! terminal (ESC sequences), forge a line (CR, LF, U+2028) nor reorder what is read (bidi
//! overrides). JSON keeps every value exact, writing those characters as `\uXXXX` escapes.

use std::io::Write;

use serde::Serialize;

use super::CliError;

/// A plain text table with a header row, columns padded to their widest cell.
pub struct Table {
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: Vec<&'static str>) -> Table {
        Table {
            header,
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells.iter().map(|c| escape(c)).collect());
    }

    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                if let Some(w) = widths.get_mut(i) {
                    *w = (*w).max(cell.chars().count());
                }
            }
        }
        let line = |cells: Vec<&str>| {
            let mut out = String::new();
            for (i, cell) in cells.iter().enumerate() {
                if i + 1 == cells.len() {
                    out.push_str(cell);
                } else {
                    let pad = widths[i] - cell.chars().count();
                    out.push_str(cell);
                    out.push_str(&" ".repeat(pad + 2));
                }
            }
            out.trim_end().to_string()
        };
        let mut out = vec![line(self.header.clone())];
        for row in &self.rows {
            out.push(line(row.iter().map(String::as_str).collect()));
        }
        if self.rows.is_empty() {
            out.push("(none)".into());
        }
        out.join("\n")
    }
}

/// Whether a character must not reach a terminal as it is: control characters, line and
/// paragraph separators, invisible formatting characters (the free-text rule's set).
fn unsafe_to_show(c: char) -> bool {
    crate::domain::text::is_control_or_invisible(c)
}

/// One value made safe to print on one line: every character [`unsafe_to_show`] (LF included)
/// is written as `\u{1b}`, visible and inert ([`crate::domain::text::escape`]).
pub fn escape(text: &str) -> String {
    crate::domain::text::escape(text)
}

/// Lines of text made safe to print: like [`escape`], but the line breaks between lines stay.
pub fn escape_lines(text: &str) -> String {
    crate::domain::text::escape_except(text, Some('\n'))
}

/// Writes lines to standard output, escaped ([`escape_lines`]). A closed pipe (`autopay member
/// list | head`) is not an error worth a stack of messages.
pub fn say(text: impl AsRef<str>) {
    raw(&escape_lines(text.as_ref()));
}

fn raw(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
}

/// Pretty JSON, with every character a terminal must not see inside a string written as a
/// `\uXXXX` escape: the same value for a script, inert on a screen.
pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| CliError::internal(format!("cannot print JSON: {e}")))?;
    raw(&json_escape(&text));
    Ok(())
}

/// Rewrites the characters [`unsafe_to_show`] in serialized JSON as `\uXXXX` escapes (a
/// surrogate pair above U+FFFF). Outside strings JSON holds only ASCII punctuation, spaces and
/// line breaks, and inside them serde_json already escapes C0 controls, so only the line breaks
/// of the layout are left alone.
fn json_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c != '\n' && unsafe_to_show(c) {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Key-value lines for `show` commands; each value escaped ([`escape`]) onto its own line.
pub fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    pairs
        .iter()
        .map(|(k, v)| format!("{k:width$}  {}", escape(v)))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_pads_columns_to_their_widest_cell() {
        let mut t = Table::new(vec!["ID", "STATUS"]);
        t.row(vec!["a".into(), "active".into()]);
        t.row(vec!["long-id".into(), "x".into()]);
        assert_eq!(t.render(), "ID       STATUS\na        active\nlong-id  x");
    }

    #[test]
    fn control_and_direction_characters_are_shown_escaped_and_json_keeps_the_value() {
        let hostile = "evil\u{1b}[2J\u{202e}txt\u{2028}x\ny\u{7f}\u{85}\u{e0041}";
        let shown = escape(hostile);
        assert_eq!(
            shown,
            "evil\\u{1b}[2J\\u{202e}txt\\u{2028}x\\u{a}y\\u{7f}\\u{85}\\u{e0041}"
        );
        assert!(!shown.chars().any(unsafe_to_show));
        assert_eq!(escape_lines("a\nb\u{1b}"), "a\nb\\u{1b}");
        assert_eq!(
            escape("Zoë Ångström, می\u{200C}خواهم"),
            "Zoë Ångström, می\u{200C}خواهم"
        );
        let json = json_escape(
            &serde_json::to_string_pretty(&serde_json::json!({ "a": hostile })).unwrap(),
        );
        assert!(
            !json.chars().any(|c| c != '\n' && unsafe_to_show(c)),
            "{json}"
        );
        let back: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(back["a"], hostile);
        let mut t = Table::new(vec!["ACTOR"]);
        t.row(vec!["cli:x\nforged".into()]);
        assert_eq!(t.render(), "ACTOR\ncli:x\\u{a}forged");
        assert_eq!(fields(&[("by", "a\rb".into())]), "by  a\\u{d}b");
    }

    #[test]
    fn an_empty_table_says_none() {
        assert!(Table::new(vec!["ID"]).render().ends_with("(none)"));
    }
}
