//! Writing to stdout without panicking on a closed pipe, and aligned
//! plain-text tables.

use std::io::Write;

/// Writes one line to stdout (line-buffered).
pub(crate) fn line(s: &str) -> Result<(), std::io::Error> {
    let mut out = std::io::stdout().lock();
    out.write_all(s.as_bytes())?;
    out.write_all(b"\n")
}

/// Writes one JSON object as a line.
pub(crate) fn json_line(v: &serde_json::Value) -> Result<(), std::io::Error> {
    line(&v.to_string())
}

/// A table printed with columns padded to their widest cell.
#[derive(Debug, Default)]
pub(crate) struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub(crate) fn new(headers: &[&str]) -> Self {
        Self {
            headers: headers.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub(crate) fn render(&self) -> String {
        let cols = self.headers.len();
        let mut width: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(cols) {
                width[i] = width[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        for r in std::iter::once(&self.headers).chain(&self.rows) {
            let mut l = String::new();
            for (i, w) in width.iter().enumerate() {
                let cell = r.get(i).map(String::as_str).unwrap_or("");
                l.push_str(cell);
                if i + 1 < cols {
                    l.extend(std::iter::repeat_n(' ', w - cell.chars().count() + 2));
                }
            }
            out.push_str(l.trim_end());
            out.push('\n');
        }
        out
    }

    pub(crate) fn print(&self) -> Result<(), std::io::Error> {
        let mut out = std::io::stdout().lock();
        out.write_all(self.render().as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_aligned() {
        let mut t = Table::new(&["NAME", "QUEUES"]);
        t.row(vec!["orders".into(), "8".into()]);
        t.row(vec!["a".into(), "1024".into()]);
        assert_eq!(t.render(), "NAME    QUEUES\norders  8\na       1024\n");
    }
}
