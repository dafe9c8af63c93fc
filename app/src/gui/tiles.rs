//! The workbench layout: panes in an egui_tiles tree (the user can drag, split and resize them; the layout is
//! persisted), and the behaviour that draws each pane.

use serde::{Deserialize, Serialize};

use super::command::Command;
use super::panels::ViewCtx;
use super::panels::acceptance::AcceptancePanel;
use super::panels::attention::AttentionPanel;
use super::panels::beam_tree::BeamTreePanel;
use super::panels::cad::CadPanel;
use super::panels::candidates::CandidatesPanel;
use super::panels::compare::ComparePanel;
use super::panels::contrastive::ContrastivePanel;
use super::panels::draft_tree::DraftTreePanel;
use super::panels::lens::LensPanel;
use super::panels::momentum::MomentumPanel;
use super::panels::opera::OperaPanel;
use super::panels::plots::PlotsPanel;
use super::panels::speedup::SpeedupPanel;
use super::panels::stats::StatsPanel;
use super::panels::sweep::SweepPanel;
use super::panels::token_stream::TokenStreamPanel;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Pane {
    TokenStream,
    Candidates,
    Plots,
    Stats,
    Compare,
    DraftTree,
    Acceptance,
    Speedup,
    Sweep,
    BeamTree,
    OverTrust,
    Contrastive,
    Momentum,
    Cad,
    LogitLens,
    Attention,
}

impl Pane {
    pub const ALL: [Pane; 16] = [
        Pane::TokenStream,
        Pane::Candidates,
        Pane::DraftTree,
        Pane::Plots,
        Pane::Acceptance,
        Pane::Speedup,
        Pane::Sweep,
        Pane::Stats,
        Pane::Compare,
        Pane::BeamTree,
        Pane::OverTrust,
        Pane::Contrastive,
        Pane::Momentum,
        Pane::Cad,
        Pane::LogitLens,
        Pane::Attention,
    ];

    /// The workbench panes (per-step views and speculative figures), tabbed top right.
    const WORKBENCH: [Pane; 6] = [
        Pane::Candidates,
        Pane::DraftTree,
        Pane::Plots,
        Pane::Acceptance,
        Pane::Speedup,
        Pane::Sweep,
    ];
    /// The search and contrast methods' panes and the model's insides, tabbed bottom right.
    const SEARCH: [Pane; 7] = [
        Pane::BeamTree,
        Pane::OverTrust,
        Pane::Contrastive,
        Pane::Momentum,
        Pane::Cad,
        Pane::LogitLens,
        Pane::Attention,
    ];

    /// Panes that are one scrolling list under a short header (the token stream sticks to its newest token, the
    /// comparison scrolls both ways): an enclosing scroll area would only fight theirs.
    fn scrolls_itself(self) -> bool {
        matches!(self, Pane::TokenStream | Pane::Compare)
    }

    /// The pane's name as a region in the accessibility tree.
    pub fn region_name(self) -> String {
        format!("{} pane", self.title())
    }

    pub fn title(self) -> &'static str {
        match self {
            Pane::TokenStream => "Token stream",
            Pane::Candidates => "Candidates",
            Pane::Plots => "Plots",
            Pane::Stats => "Run statistics",
            Pane::Compare => "Compare",
            Pane::DraftTree => "Draft tree",
            Pane::Acceptance => "Acceptance",
            Pane::Speedup => "Speedup",
            Pane::Sweep => "Draft sweep",
            Pane::BeamTree => "Beam tree",
            Pane::OverTrust => "OPERA",
            Pane::Contrastive => "Contrastive",
            Pane::Momentum => "Momentum",
            Pane::Cad => "CAD",
            Pane::LogitLens => "Logit lens",
            Pane::Attention => "Attention",
        }
    }
}

/// Three tab groups, so every title shows in a 1280-point window: the text views on the left (token stream first,
/// full height); on the right the workbench panes tabbed above the search methods' and the model's insides' panes.
pub fn default_tree() -> egui_tiles::Tree<Pane> {
    const LEFT: [Pane; 3] = [Pane::TokenStream, Pane::Stats, Pane::Compare];
    let mut tiles = egui_tiles::Tiles::default();
    let mut tabs = |panes: &[Pane]| {
        let ids: Vec<_> = panes.iter().map(|&p| tiles.insert_pane(p)).collect();
        tiles.insert_tab_tile(ids)
    };
    let left = tabs(&LEFT);
    let workbench = tabs(&Pane::WORKBENCH);
    let search = tabs(&Pane::SEARCH);
    let right = tiles.insert_new(egui_tiles::Tile::Container(egui_tiles::Container::Linear(
        egui_tiles::Linear::new_binary(egui_tiles::LinearDir::Vertical, [workbench, search], 0.58),
    )));
    let root = tiles.insert_new(egui_tiles::Tile::Container(egui_tiles::Container::Linear(
        egui_tiles::Linear::new_binary(egui_tiles::LinearDir::Horizontal, [left, right], 0.45),
    )));
    egui_tiles::Tree::new(egui::Id::unique("specula_workbench"), root, tiles)
}

/// A persisted tree is usable only when it still holds every pane once (an older version may lack one, and is
/// then replaced by the default layout).
pub fn is_complete(tree: &egui_tiles::Tree<Pane>) -> bool {
    Pane::ALL.iter().all(|p| {
        tree.tiles
            .iter()
            .filter(|(_, t)| matches!(t, egui_tiles::Tile::Pane(q) if q == p))
            .count()
            == 1
    })
}

/// The panels' own state, kept across frames.
#[derive(Default)]
pub struct Panels {
    pub token_stream: TokenStreamPanel,
    pub candidates: CandidatesPanel,
    pub plots: PlotsPanel,
    pub stats: StatsPanel,
    pub compare: ComparePanel,
    pub draft_tree: DraftTreePanel,
    pub acceptance: AcceptancePanel,
    pub speedup: SpeedupPanel,
    pub sweep: SweepPanel,
    pub beam_tree: BeamTreePanel,
    pub opera: OperaPanel,
    pub contrastive: ContrastivePanel,
    pub momentum: MomentumPanel,
    pub cad: CadPanel,
    pub lens: LensPanel,
    pub attention: AttentionPanel,
    /// Where each pane was drawn this frame (panes in a hidden tab are absent); a panel export crops to it.
    rects: Vec<(Pane, egui::Rect)>,
}

impl Panels {
    /// Forgets last frame's rects; called before the panes are drawn.
    pub fn begin_frame(&mut self) {
        self.rects.clear();
    }

    pub fn rect_of(&self, pane: Pane) -> Option<egui::Rect> {
        self.rects.iter().find(|(p, _)| *p == pane).map(|(_, r)| *r)
    }
}

pub struct Behavior<'a, 'b> {
    pub panels: &'a mut Panels,
    pub ctx: &'a ViewCtx<'b>,
}

impl Behavior<'_, '_> {
    fn pane_contents(&mut self, ui: &mut egui::Ui, pane: Pane) {
        // Panes get a margin so text does not touch the tile edges.
        egui::Frame::new()
            .inner_margin(6.0)
            .show(ui, |ui| match pane {
                Pane::TokenStream => self.panels.token_stream.ui(ui, self.ctx),
                Pane::Candidates => self.panels.candidates.ui(ui, self.ctx),
                Pane::Plots => self.panels.plots.ui(ui, self.ctx),
                Pane::Stats => self.panels.stats.ui(ui, self.ctx),
                Pane::Compare => self.panels.compare.ui(ui, self.ctx),
                Pane::DraftTree => self.panels.draft_tree.ui(ui, self.ctx),
                Pane::Acceptance => self.panels.acceptance.ui(ui, self.ctx),
                Pane::Speedup => self.panels.speedup.ui(ui, self.ctx),
                Pane::Sweep => self.panels.sweep.ui(ui, self.ctx),
                Pane::BeamTree => self.panels.beam_tree.ui(ui, self.ctx),
                Pane::OverTrust => self.panels.opera.ui(ui, self.ctx),
                Pane::Contrastive => self.panels.contrastive.ui(ui, self.ctx),
                Pane::Momentum => self.panels.momentum.ui(ui, self.ctx),
                Pane::Cad => self.panels.cad.ui(ui, self.ctx),
                Pane::LogitLens => self.panels.lens.ui(ui, self.ctx),
                Pane::Attention => self.panels.attention.ui(ui, self.ctx),
            });
    }
}

impl egui_tiles::Behavior<Pane> for Behavior<'_, '_> {
    fn pane_ui(
        &mut self,
        ui: &mut egui::Ui,
        _tile_id: egui_tiles::TileId,
        pane: &mut Pane,
    ) -> egui_tiles::UiResponse {
        self.panels.rects.push((*pane, ui.max_rect()));
        let pane = *pane;
        // Each pane is a named region, so a screen reader (and a test) can tell which pane a widget is in; the
        // name is not the bare title, which the tab button already carries.
        let region = egui::UiBuilder::new()
            .accessibility_role(egui::accesskit::Role::Region)
            .accessibility_label(pane.region_name());
        ui.scope_builder(region, |ui| {
            if pane.scrolls_itself() {
                self.pane_contents(ui, pane);
            } else {
                // A pane taller than its tile (a short window, a small tile) scrolls instead of being cut off.
                egui::ScrollArea::vertical()
                    .id_salt(("pane_scroll", pane.title()))
                    .auto_shrink([false, false])
                    .show(ui, |ui| self.pane_contents(ui, pane));
            }
        });
        egui_tiles::UiResponse::None
    }

    fn tab_title_for_pane(&mut self, pane: &Pane) -> egui::WidgetText {
        pane.title().into()
    }

    /// Right-clicking a pane's tab offers to export the pane.
    fn on_tab_button(
        &mut self,
        tiles: &mut egui_tiles::Tiles<Pane>,
        tile_id: egui_tiles::TileId,
        button_response: egui::Response,
    ) -> egui::Response {
        if let Some(egui_tiles::Tile::Pane(pane)) = tiles.get(tile_id) {
            let pane = *pane;
            button_response.context_menu(|ui| {
                if ui.button("Export as PNG…").clicked() {
                    self.ctx.send(Command::ExportPanel(pane));
                }
            });
        }
        button_response
    }

    fn simplification_options(&self) -> egui_tiles::SimplificationOptions {
        // Keep a tab bar over single panes too, so every pane can be dragged by its title.
        egui_tiles::SimplificationOptions {
            all_panes_must_have_tabs: true,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_layout_saved_before_the_speedup_panes_is_replaced_and_the_default_survives_a_round_trip() {
        let mut tiles = egui_tiles::Tiles::default();
        let before = [
            Pane::TokenStream,
            Pane::Candidates,
            Pane::DraftTree,
            Pane::Plots,
            Pane::Acceptance,
            Pane::Stats,
            Pane::Compare,
        ]
        .map(|p| tiles.insert_pane(p));
        let root = tiles.insert_tab_tile(before.to_vec());
        let old = egui_tiles::Tree::new(egui::Id::unique("old"), root, tiles);
        let old: egui_tiles::Tree<Pane> =
            serde_json::from_str(&serde_json::to_string(&old).unwrap()).unwrap();
        assert!(!is_complete(&old));

        let saved = serde_json::to_string(&default_tree()).unwrap();
        let restored: egui_tiles::Tree<Pane> = serde_json::from_str(&saved).unwrap();
        assert!(is_complete(&restored));
    }
}
