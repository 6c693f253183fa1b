//! Text tables of `status`, `explain` and `apps`: one place that measures
//! columns, so they line up the same way everywhere.

use std::fmt::Write as _;

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Align {
    Left,
    Right,
}

/// `head` and `rows` as lines, each prefixed by `indent`, columns two
/// spaces apart and as wide as their widest cell (in characters); the last
/// column is not padded, so no line ends in spaces.
pub(super) fn render(indent: &str, head: &[&str], align: &[Align], rows: &[Vec<String>]) -> String {
    let n = head.len();
    let mut width: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate().take(n) {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let mut s = String::new();
    let head: Vec<String> = head.iter().map(|h| h.to_string()).collect();
    for r in std::iter::once(&head).chain(rows) {
        s.push_str(indent);
        for (i, c) in r.iter().enumerate().take(n) {
            let w = width[i];
            let last = i + 1 == n;
            match (align.get(i).copied().unwrap_or(Align::Left), last) {
                (Align::Left, true) => s.push_str(c),
                (Align::Left, false) => {
                    let _ = write!(s, "{c:<w$}  ");
                }
                (Align::Right, true) => {
                    let _ = write!(s, "{c:>w$}");
                }
                (Align::Right, false) => {
                    let _ = write!(s, "{c:>w$}  ");
                }
            }
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up() {
        let rows = vec![
            vec!["goto proxy".to_string(), "3".into(), "/a".into()],
            vec!["drop".to_string(), "12345".into(), "/ü".into()],
        ];
        assert_eq!(
            render(
                "",
                &["VERDICT", "N", "CGROUP"],
                &[Align::Left, Align::Right],
                &rows
            ),
            "VERDICT         N  CGROUP\ngoto proxy      3  /a\ndrop        12345  /ü\n"
        );
        assert_eq!(render("  ", &["A"], &[], &[]), "  A\n");
    }
}
