//! The panels. Each is a small struct with one `ui` method that reads the store at the cursor through a
//! [`ViewCtx`] and queues [`Command`]s; none of them changes the store.

use std::collections::BTreeSet;

use super::command::{Command, CommandQueue};
use super::cursor::TimeCursor;
use super::download::Download;
use super::store::{RunEntry, RunKey, RunStore, TokenAt, tokens_through_step, tokens_with_steps};
use super::sweep::Sweep;

pub mod acceptance;
pub mod attention;
pub mod beam_tree;
pub mod cad;
pub mod candidates;
pub mod colouring;
pub mod compare;
pub mod contrastive;
pub mod draft_detail;
pub mod draft_tree;
pub mod exit_layers;
pub mod lens;
pub mod model_panel;
pub mod momentum;
pub mod opera;
pub mod plots;
pub mod prompt;
pub mod spec_stats;
pub mod speedup;
pub mod stats;
pub mod sweep;
pub mod timeline;
pub mod token_stream;
pub mod tokens;
pub mod top_bar;

/// What every panel may read this frame, and where it sends commands.
pub struct ViewCtx<'a> {
    pub store: &'a RunStore,
    pub cursor: &'a TimeCursor,
    /// The generated token the user clicked, if it lies in the cursor's step.
    pub focus: Option<usize>,
    /// Runs picked for the Compare panel (empty: every run).
    pub compare: &'a BTreeSet<RunKey>,
    pub download: Option<&'a Download>,
    /// The draft-length sweep in progress.
    pub sweep: Option<&'a Sweep>,
    pub commands: &'a CommandQueue,
}

impl ViewCtx<'_> {
    pub fn send(&self, command: Command) {
        self.commands.send(command);
    }

    pub fn selected(&self) -> Option<(RunKey, &RunEntry)> {
        let key = self.store.selected_key()?;
        Some((key, self.store.run(key)?))
    }

    /// Generated tokens of the selected run up to and including the cursor's step.
    pub fn tokens_shown(&self) -> usize {
        self.selected().map_or(0, |(_, run)| {
            tokens_through_step(&run.trace, self.cursor.step)
        })
    }

    /// The token the candidate views explain: the clicked one when it is in the cursor's step, else the last
    /// token of that step.
    pub fn focused_token(&self) -> Option<TokenAt<'_>> {
        let (_, run) = self.selected()?;
        let in_step: Vec<TokenAt<'_>> = tokens_with_steps(&run.trace)
            .filter(|t| t.step == self.cursor.step)
            .collect();
        self.focus
            .and_then(|f| in_step.iter().find(|t| t.index == f).copied())
            .or_else(|| in_step.last().copied())
    }

    /// The runs the Compare panel shows, in store order.
    pub fn compared_runs(&self) -> Vec<(RunKey, &RunEntry)> {
        self.store
            .runs()
            .filter(|(k, _)| self.compare.is_empty() || self.compare.contains(k))
            .collect()
    }
}

/// Axes with tick labels closer together than egui_plot's defaults, which leave a small plot with a single
/// label per axis.
pub fn readable_axes<'a>(
    plot: egui_plot::Plot<'a>,
    x_label: &str,
    y_label: &str,
) -> egui_plot::Plot<'a> {
    use egui_plot::AxisHints;
    plot.custom_x_axes(vec![
        AxisHints::new_x().label(x_label).label_spacing(28.0..=40.0),
    ])
    .custom_y_axes(vec![
        AxisHints::new_y().label(y_label).label_spacing(12.0..=18.0),
    ])
}

/// A centred, wrapped hint for an empty panel: says what is missing and what to do.
pub fn empty_state(ui: &mut egui::Ui, title: &str, hint: &str) {
    ui.vertical_centered(|ui| {
        ui.add_space(24.0);
        ui.label(egui::RichText::new(title).heading());
        ui.add_space(6.0);
        ui.label(hint);
    });
}
