//! How a token looks: its colour by probability, its text with whitespace made visible, and the tooltip table
//! of candidates. Shared by the token stream, the compare view and the candidates panel.

use egui::{Color32, RichText};
use specula_core::trace::{TokenRecord, TokenSource};

/// Probability bins, most likely first: (lower bound, legend text, background, text colour). A diverging
/// blue-to-red scale (ColorBrewer RdYlBu) reads the same in dark and light themes because each bin sets its
/// own text colour.
pub const PROB_BINS: &[(f32, &str, Color32, Color32)] = &[
    (
        0.9,
        "≥ 90%",
        Color32::from_rgb(69, 117, 180),
        Color32::WHITE,
    ),
    (
        0.5,
        "50–90%",
        Color32::from_rgb(145, 191, 219),
        Color32::BLACK,
    ),
    (
        0.2,
        "20–50%",
        Color32::from_rgb(254, 224, 144),
        Color32::BLACK,
    ),
    (
        0.05,
        "5–20%",
        Color32::from_rgb(252, 141, 89),
        Color32::BLACK,
    ),
    (0.0, "< 5%", Color32::from_rgb(215, 48, 39), Color32::WHITE),
];

/// Background and text colour for a token of probability `p`.
pub fn prob_colors(p: f32) -> (Color32, Color32) {
    PROB_BINS
        .iter()
        .find(|(lower, ..)| p >= *lower)
        .or(PROB_BINS.last())
        .map_or((Color32::GRAY, Color32::BLACK), |(_, _, bg, fg)| (*bg, *fg))
}

/// The token's text for display: newlines and tabs become visible marks; a token of only spaces shows one
/// middle dot per space, so it does not vanish.
pub fn display_text(token: &str) -> String {
    if !token.is_empty() && token.chars().all(|c| c == ' ') {
        return "·".repeat(token.len());
    }
    // U+FFFD (a token holding part of a UTF-8 character) has no glyph in egui's fonts; ¤ marks it instead.
    token
        .replace('\u{FFFD}', "¤")
        .replace('\n', "↵")
        .replace('\t', "⇥")
        .replace('\r', "")
}

/// A token quoted as Rust's `{:?}` does, with U+FFFD (no glyph in egui's fonts) shown as ¤.
pub fn quoted(token: &str) -> String {
    format!("{token:?}").replace('\u{FFFD}', "¤")
}

/// How many line breaks the token ends with, so the stream can start new rows.
pub fn newlines(token: &str) -> usize {
    token.chars().filter(|&c| c == '\n').count()
}

/// Shows a token as a coloured chip.
pub fn token_chip(token: &TokenRecord) -> RichText {
    let (bg, fg) = prob_colors(token.prob());
    let text = RichText::new(display_text(&token.token))
        .monospace()
        .background_color(bg)
        .color(fg);
    if token.source == TokenSource::Forced {
        text.underline()
    } else {
        text
    }
}

pub fn source_name(source: TokenSource) -> &'static str {
    match source {
        TokenSource::Greedy => "greedy (argmax)",
        TokenSource::Sampled => "sampled",
        TokenSource::Forced => "forced (fork)",
        TokenSource::DraftAccepted => "draft accepted",
        TokenSource::Corrected => "corrected",
        TokenSource::Bonus => "bonus",
        TokenSource::Search => "search",
    }
}

pub fn percent(p: f32) -> String {
    if p >= 0.001 {
        format!("{:.1}%", p * 100.0)
    } else {
        format!("{:.3}%", p * 100.0)
    }
}

/// A warped probability: "cut" when a warper removed the token.
pub fn warped_percent(p: f32) -> String {
    if p > 0.0 {
        percent(p)
    } else {
        "cut".to_owned()
    }
}

/// A token's summary line and its candidates (the hover tooltip).
pub fn candidates_table(
    ui: &mut egui::Ui,
    token: &TokenRecord,
    id_salt: impl std::hash::Hash + std::fmt::Debug,
) {
    ui.label(format!(
        "{}: p = {}, rank {}, entropy {:.2} nats, {}",
        quoted(&token.token),
        percent(token.prob()),
        token.rank,
        token.entropy,
        source_name(token.source)
    ));
    if let Some(kept) = token.warped_kept {
        ui.label(format!(
            "Warping kept {kept} tokens; the rest had warped probability 0."
        ));
    }
    candidates_grid(ui, token, id_salt);
}

/// The candidates of a position: rank, token, probability, and warped probability when the run warped.
pub fn candidates_grid(
    ui: &mut egui::Ui,
    token: &TokenRecord,
    id_salt: impl std::hash::Hash + std::fmt::Debug,
) {
    let warped = token.top_logprobs.iter().any(|c| c.warped_prob.is_some());
    egui::Grid::new(("candidates", id_salt))
        .striped(true)
        .num_columns(4)
        .spacing([12.0, 4.0])
        .show(ui, |ui| {
            ui.strong("#");
            ui.strong("token");
            ui.strong("p");
            ui.strong(if warped { "warped p" } else { "" });
            ui.end_row();
            for (rank, c) in token.top_logprobs.iter().enumerate() {
                let chosen = c.id == token.id;
                let mark = |s: String| {
                    if chosen {
                        RichText::new(s).strong().underline()
                    } else {
                        RichText::new(s)
                    }
                };
                ui.label(mark(format!("{rank}")));
                ui.label(mark(quoted(&c.token)).monospace());
                ui.label(mark(percent(c.logprob.exp())));
                ui.label(mark(c.warped_prob.map(warped_percent).unwrap_or_default()));
                ui.end_row();
            }
        });
}
