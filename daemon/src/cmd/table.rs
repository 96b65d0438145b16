//! Tables as Ceph's TextTable prints them: `rbd ls -l`, `du`, `diff`, `snap ls`, and
//! rbd-nbd's `list-mapped`.

/// A table as Ceph's TextTable prints it: each column as wide as its widest cell, two
/// spaces between columns, headings left-aligned, cells left- or right-aligned (`right`)
/// per column; nothing at all when there are no rows. Widths and padding count bytes,
/// as TextTable's (std::string::length and setw) do, so a row with a multi-byte name
/// lines up as rbd's does, not by characters.
pub(crate) fn text_table(cols: &[(&str, bool)], rows: &[Vec<String>]) -> String {
    if rows.is_empty() {
        return String::new();
    }
    let widths: Vec<usize> = cols
        .iter()
        .enumerate()
        .map(|(i, (h, _))| rows.iter().map(|r| r[i].len()).fold(h.len(), usize::max))
        .collect();
    let mut out = String::new();
    let mut line = |cells: Vec<(&str, bool)>| {
        let l: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|((c, right), &w)| {
                let pad = " ".repeat(w.saturating_sub(c.len()));
                if *right {
                    format!("{pad}{c}")
                } else {
                    format!("{c}{pad}")
                }
            })
            .collect();
        out.push_str(&l.join("  "));
        out.push('\n');
    };
    line(cols.iter().map(|(h, _)| (*h, false)).collect());
    for r in rows {
        line(
            r.iter()
                .zip(cols)
                .map(|(c, (_, right))| (c.as_str(), *right))
                .collect(),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_table_pads_like_ceph() {
        let rows: Vec<Vec<String>> = [
            ["t2@a", "16 MiB", "8 MiB"],
            ["t2@b", "16 MiB", "4 MiB"],
            ["t2", "16 MiB", "0 B"],
            ["<TOTAL>", "16 MiB", "12 MiB"],
        ]
        .iter()
        .map(|r| r.iter().map(|c| c.to_string()).collect())
        .collect();
        // What `rbd du` (16.2.15) printed for the same cells, byte for byte.
        assert_eq!(
            text_table(
                &[("NAME", false), ("PROVISIONED", true), ("USED", true)],
                &rows
            ),
            "NAME     PROVISIONED  USED  \n\
             t2@a          16 MiB   8 MiB\n\
             t2@b          16 MiB   4 MiB\n\
             t2            16 MiB     0 B\n\
             <TOTAL>       16 MiB  12 MiB\n"
        );
        assert_eq!(text_table(&[("Offset", false)], &[]), "");
    }

    /// rbd 16.2.15's `ls -l` with an image named "zz ü名" (8 bytes, 5 characters) beside
    /// "a=b#c%d,e" (9): one space of padding after it, not four.
    #[test]
    fn widths_count_bytes_as_ceph_does() {
        let rows: Vec<Vec<String>> = [["a=b#c%d,e", "4 MiB"], ["zz ü名", "4 MiB"]]
            .iter()
            .map(|r| r.iter().map(|c| c.to_string()).collect())
            .collect();
        assert_eq!(
            text_table(&[("NAME", false), ("SIZE", true)], &rows),
            "NAME       SIZE \n\
             a=b#c%d,e  4 MiB\n\
             zz ü名   4 MiB\n"
        );
    }
}
