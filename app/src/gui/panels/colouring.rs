//! What a token chip's colour means: the probability the model gave it, the entropy of the distribution it was
//! chosen from, or where it came from (a plain target step, an accepted draft, the verifier's correction or
//! bonus). Each scale sets its own text colour so it reads the same in dark and light themes.

use egui::{Color32, RichText};
use specula_core::trace::{TokenRecord, TokenSource};

use super::tokens::{PROB_BINS, display_text, prob_colors};

/// Accepted drafts: green.
pub const DRAFT_ACCEPTED: Color32 = Color32::from_rgb(26, 152, 80);
/// The verifier's replacement after a rejection: orange-red.
pub const CORRECTED: Color32 = Color32::from_rgb(230, 85, 13);
/// The verifier's free token after every draft was accepted: blue.
pub const BONUS: Color32 = Color32::from_rgb(49, 130, 189);
/// A token the target chose alone (greedy or sampled, no draft).
pub const PLAIN: Color32 = Color32::from_rgb(189, 189, 189);
pub const FORCED: Color32 = Color32::from_rgb(117, 107, 177);
/// A draft the verifier rejected (in the draft tree).
pub const REJECTED: Color32 = Color32::from_rgb(200, 30, 30);
/// A draft never checked (in the draft tree).
pub const UNVERIFIED: Color32 = Color32::from_rgb(115, 115, 115);

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ColourBy {
    #[default]
    Probability,
    Entropy,
    Source,
}

impl ColourBy {
    pub const ALL: [ColourBy; 3] = [ColourBy::Probability, ColourBy::Entropy, ColourBy::Source];

    pub fn name(self) -> &'static str {
        match self {
            ColourBy::Probability => "probability",
            ColourBy::Entropy => "entropy",
            ColourBy::Source => "source",
        }
    }
}

/// Entropy bins, calmest first: (upper bound in nats, legend text, background, text colour); ColorBrewer YlOrRd.
pub const ENTROPY_BINS: &[(f32, &str, Color32, Color32)] = &[
    (
        0.5,
        "< 0.5",
        Color32::from_rgb(255, 255, 178),
        Color32::BLACK,
    ),
    (
        1.5,
        "0.5–1.5",
        Color32::from_rgb(254, 204, 92),
        Color32::BLACK,
    ),
    (
        3.0,
        "1.5–3",
        Color32::from_rgb(253, 141, 60),
        Color32::BLACK,
    ),
    (
        f32::INFINITY,
        "≥ 3",
        Color32::from_rgb(227, 26, 28),
        Color32::WHITE,
    ),
];

/// The source legend: (source, legend text, background, text colour).
pub const SOURCE_KEYS: &[(TokenSource, &str, Color32, Color32)] = &[
    (
        TokenSource::DraftAccepted,
        "accepted draft",
        DRAFT_ACCEPTED,
        Color32::WHITE,
    ),
    (
        TokenSource::Corrected,
        "corrected (after a rejection)",
        CORRECTED,
        Color32::WHITE,
    ),
    (
        TokenSource::Bonus,
        "bonus (all drafts accepted)",
        BONUS,
        Color32::WHITE,
    ),
    (
        TokenSource::Greedy,
        "target alone (no draft)",
        PLAIN,
        Color32::BLACK,
    ),
    (TokenSource::Forced, "forced (fork)", FORCED, Color32::WHITE),
];

pub fn entropy_colors(entropy: f32) -> (Color32, Color32) {
    ENTROPY_BINS
        .iter()
        .find(|(upper, ..)| entropy < *upper)
        .or(ENTROPY_BINS.last())
        .map_or((Color32::GRAY, Color32::BLACK), |(_, _, bg, fg)| (*bg, *fg))
}

pub fn source_colors(source: TokenSource) -> (Color32, Color32) {
    let key = match source {
        TokenSource::Sampled | TokenSource::Search => TokenSource::Greedy,
        other => other,
    };
    SOURCE_KEYS
        .iter()
        .find(|(s, ..)| *s == key)
        .map_or((PLAIN, Color32::BLACK), |(_, _, bg, fg)| (*bg, *fg))
}

/// A token chip coloured by `by`; a forced token is underlined whatever the scale.
pub fn chip(token: &TokenRecord, by: ColourBy) -> RichText {
    let (bg, fg) = match by {
        ColourBy::Probability => prob_colors(token.prob()),
        ColourBy::Entropy => entropy_colors(token.entropy),
        ColourBy::Source => source_colors(token.source),
    };
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

/// The legend of the scale in use.
pub fn legend(ui: &mut egui::Ui, by: ColourBy) {
    let keys: Vec<(&str, Color32, Color32)> = match by {
        ColourBy::Probability => PROB_BINS
            .iter()
            .map(|(_, n, bg, fg)| (*n, *bg, *fg))
            .collect(),
        ColourBy::Entropy => ENTROPY_BINS
            .iter()
            .map(|(_, n, bg, fg)| (*n, *bg, *fg))
            .collect(),
        ColourBy::Source => SOURCE_KEYS
            .iter()
            .map(|(_, n, bg, fg)| (*n, *bg, *fg))
            .collect(),
    };
    ui.horizontal_wrapped(|ui| {
        ui.label(match by {
            ColourBy::Probability => "Colour = probability the model gave the token:",
            ColourBy::Entropy => "Colour = entropy of the model's distribution (nats):",
            ColourBy::Source => "Colour = where the token came from:",
        });
        for (name, bg, fg) in keys {
            let chip = RichText::new(format!(" {name} "))
                .monospace()
                .background_color(bg)
                .color(fg);
            ui.add(egui::Label::new(chip).wrap_mode(egui::TextWrapMode::Extend));
        }
        ui.label(RichText::new("↵").monospace());
        ui.label("= newline; underlined = forced by a fork.");
    });
}

/// A sequential scale for heat maps (viridis: dark violet = 0, yellow = 1), perceptually even and readable by
/// colour-blind users; returns the cell colour and a text colour that reads on it.
pub fn heat(v: f32) -> (Color32, Color32) {
    const STOPS: [(u8, u8, u8); 5] = [
        (68, 1, 84),
        (59, 82, 139),
        (33, 145, 140),
        (94, 201, 98),
        (253, 231, 37),
    ];
    let v = if v.is_finite() {
        v.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let x = v * (STOPS.len() - 1) as f32;
    let i = (x.floor() as usize).min(STOPS.len() - 2);
    let t = x - i as f32;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    let mix = |p: u8, q: u8| (f32::from(p) + (f32::from(q) - f32::from(p)) * t).round() as u8;
    let bg = Color32::from_rgb(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2));
    let fg = if v > 0.55 {
        Color32::BLACK
    } else {
        Color32::WHITE
    };
    (bg, fg)
}

/// Colours of diverse beam search's groups (Tableau 10), in group order.
pub const GROUPS: [Color32; 8] = [
    Color32::from_rgb(31, 119, 180),
    Color32::from_rgb(255, 127, 14),
    Color32::from_rgb(44, 160, 44),
    Color32::from_rgb(214, 39, 40),
    Color32::from_rgb(148, 103, 189),
    Color32::from_rgb(140, 86, 75),
    Color32::from_rgb(227, 119, 194),
    Color32::from_rgb(127, 127, 127),
];

pub fn group_colour(group: usize) -> Color32 {
    GROUPS[group % GROUPS.len()]
}

/// A legend strip for [`heat`]: "low ▮▮▮▮▮ high".
pub fn heat_legend(ui: &mut egui::Ui, low: &str, high: &str) {
    ui.horizontal(|ui| {
        ui.spacing_mut().item_spacing.x = 0.0;
        ui.label(format!("{low} "));
        for i in 0..=8 {
            let (bg, _) = heat(i as f32 / 8.0);
            ui.label(RichText::new("  ").monospace().background_color(bg));
        }
        ui.label(format!(" {high}"));
    });
}
