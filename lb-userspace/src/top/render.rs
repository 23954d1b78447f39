//! Drawing a [`View`] with ratatui: on the terminal (`live`) or into a text buffer
//! ([`text`], for `--once` and the tests), from the same draw function.

use ratatui::{
    Frame, Terminal,
    backend::TestBackend,
    layout::{Constraint, Layout, Rect},
    style::{Modifier, Style},
    widgets::{Paragraph, Row, Table},
};

use super::View;

/// Spaces between columns.
const GAP: u16 = 2;

/// Cells padded to their column's width (numbers right-aligned), and those widths.
fn aligned(
    header: &[&str],
    rows: Vec<Vec<String>>,
    text_columns: usize,
) -> (Vec<String>, Vec<Vec<String>>, Vec<u16>) {
    let widths: Vec<usize> = (0..header.len())
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .chain([header[c].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let pad = |c: usize, s: &str| {
        if c < text_columns {
            format!("{s:<w$}", w = widths[c])
        } else {
            format!("{s:>w$}", w = widths[c])
        }
    };
    let head = header.iter().enumerate().map(|(c, h)| pad(c, h)).collect();
    let body = rows
        .into_iter()
        .map(|r| r.iter().enumerate().map(|(c, s)| pad(c, s)).collect())
        .collect();
    let widths = widths
        .into_iter()
        .map(|w| u16::try_from(w).unwrap_or(u16::MAX))
        .collect();
    (head, body, widths)
}

/// One table: header, rows; its width.
struct Grid {
    head: Vec<String>,
    body: Vec<Vec<String>>,
    widths: Vec<u16>,
}

impl Grid {
    fn new(header: &[&str], rows: Vec<Vec<String>>, text_columns: usize) -> Grid {
        let (head, body, widths) = aligned(header, rows, text_columns);
        Grid { head, body, widths }
    }

    fn width(&self) -> u16 {
        let n = self.widths.len() as u16;
        self.widths.iter().sum::<u16>() + GAP * n.saturating_sub(1)
    }

    fn height(&self) -> u16 {
        1 + self.body.len() as u16
    }

    fn draw(&self, f: &mut Frame<'_>, area: Rect) {
        let header = Row::new(self.head.clone()).style(Style::new().add_modifier(Modifier::BOLD));
        let rows = self.body.iter().map(|r| Row::new(r.clone()));
        let widths = self.widths.iter().map(|w| Constraint::Length(*w));
        f.render_widget(
            Table::new(rows, widths).header(header).column_spacing(GAP),
            area,
        );
    }
}

fn grids(v: &View) -> (Grid, Grid) {
    (
        Grid::new(
            &View::SERVICE_HEADER,
            v.service_cells(),
            View::SERVICE_TEXT_COLUMNS,
        ),
        Grid::new(
            &View::BACKEND_HEADER,
            v.backend_cells(),
            View::BACKEND_TEXT_COLUMNS,
        ),
    )
}

/// Header line, a blank line, services, a blank line, backends, a blank line, footer.
pub fn draw(f: &mut Frame<'_>, v: &View, footer: &str) {
    let (services, backends) = grids(v);
    let [head, _, svc, _, be, _, foot] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Length(services.height()),
        Constraint::Length(1),
        Constraint::Length(backends.height()),
        Constraint::Length(1),
        Constraint::Min(1),
    ])
    .areas(f.area());
    f.render_widget(Paragraph::new(v.header.as_str()), head);
    services.draw(f, svc);
    backends.draw(f, be);
    f.render_widget(Paragraph::new(footer), foot);
}

/// The frame as text, every line trimmed at its end (no terminal needed).
pub fn text(v: &View) -> String {
    let (services, backends) = grids(v);
    let width = services
        .width()
        .max(backends.width())
        .max(v.header.chars().count() as u16)
        .max(1);
    let height = services.height() + backends.height() + 5;
    let mut term = Terminal::new(TestBackend::new(width, height))
        .expect("a test backend cannot fail to start");
    term.draw(|f| draw(f, v, ""))
        .expect("a test backend cannot fail to draw");
    let buf = term.backend().buffer();
    let mut out = String::new();
    for y in 0..buf.area.height {
        let line: String = (0..buf.area.width).map(|x| buf[(x, y)].symbol()).collect();
        out.push_str(line.trim_end());
        out.push('\n');
    }
    while out.ends_with("\n\n") {
        out.pop();
    }
    out
}
