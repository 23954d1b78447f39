//! The live terminal view: one `GET /status` per interval, redrawn; `q`, Esc or Ctrl-C
//! quits and the terminal is restored (also on a panic: ratatui's hook restores it).

use std::time::{Duration, Instant};

use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};

use super::{Sample, View, render, view};
use crate::admin::{api, cli};

const FOOTER: &str = "q: quit";

/// Run until the user quits.
pub fn run(admin: &cli::Endpoint, interval: Duration) -> std::io::Result<()> {
    let mut terminal = ratatui::init();
    let result = run_on(&mut terminal, admin, interval);
    ratatui::restore();
    result
}

fn run_on(
    terminal: &mut ratatui::DefaultTerminal,
    admin: &cli::Endpoint,
    interval: Duration,
) -> std::io::Result<()> {
    let mut prev: Option<(api::Status, Instant)> = None;
    let mut last: Option<View> = None;
    loop {
        let tick = Instant::now();
        let (frame, footer) = match cli::fetch_status(admin) {
            Ok(status) => {
                let sample = Sample {
                    elapsed: prev.as_ref().map(|(_, t)| tick.duration_since(*t)),
                    status,
                };
                let v = view(prev.as_ref().map(|(s, _)| s), &sample);
                prev = Some((sample.status, tick));
                last = Some(v.clone());
                (Some(v), FOOTER.to_string())
            }
            // Keep the last frame and say why it is stale; the daemon may be restarting.
            Err(e) => (last.clone(), format!("{FOOTER}  |  {e}")),
        };
        terminal.draw(|f| paint(f, frame.as_ref(), &footer))?;
        // Wait out the interval, answering keys (and redrawing on resize) meanwhile.
        while let Some(left) = interval.checked_sub(tick.elapsed()) {
            if !event::poll(left)? {
                break;
            }
            match event::read()? {
                Event::Key(k) if k.kind == KeyEventKind::Press => {
                    let ctrl_c =
                        k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
                    if ctrl_c || matches!(k.code, KeyCode::Char('q') | KeyCode::Esc) {
                        return Ok(());
                    }
                }
                Event::Resize(..) => {
                    terminal.draw(|f| paint(f, frame.as_ref(), &footer))?;
                }
                _ => {}
            }
        }
    }
}

/// The frame, or only the footer before the first sample.
fn paint(f: &mut ratatui::Frame<'_>, frame: Option<&View>, footer: &str) {
    match frame {
        Some(v) => render::draw(f, v, footer),
        None => f.render_widget(ratatui::widgets::Paragraph::new(footer), f.area()),
    }
}
