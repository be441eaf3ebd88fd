//! Printing: aligned tables for people, JSON for scripts.

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
        self.rows.push(cells);
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

/// Writes one line to standard output. A closed pipe (`autopay member list | head`) is not an
/// error worth a stack of messages.
pub fn say(text: impl AsRef<str>) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", text.as_ref());
}

pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| CliError::internal(format!("cannot print JSON: {e}")))?;
    say(text);
    Ok(())
}

/// Key-value lines for `show` commands.
pub fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    pairs
        .iter()
        .map(|(k, v)| format!("{k:width$}  {v}"))
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
    fn an_empty_table_says_none() {
        assert!(Table::new(vec!["ID"]).render().ends_with("(none)"));
    }
}
