//! The draft tree of the step at the cursor: what the drafter proposed (x = depth, y = sibling order), what the
//! verifier made of it (accepted green, rejected red, never checked grey) and the verifier's own token at the end
//! of the accepted path. Pan and zoom with egui::Scene; click a node to see, beside the tree, why it was kept or
//! rejected and the distribution the verifier drew from.

use std::sync::Arc;

use egui::epaint::CubicBezierShape;
use egui::{Color32, FontId, Galley, Pos2, Rect, RichText, Sense, Stroke, StrokeKind, pos2, vec2};
use specula_core::trace::{DraftStatus, SpeculativeStep, StepRecord};

use super::colouring::{BONUS, CORRECTED, DRAFT_ACCEPTED, REJECTED, UNVERIFIED};
use super::draft_detail::detail_ui;
use super::exit_layers::exit_layers_ui;
use super::{ViewCtx, empty_state};
use crate::gui::spec::{
    Slot, TreeLayout, TreePick, explain, is_speculative, layout, payload, quote, verifier_token,
};
use crate::gui::store::{RunEntry, RunKey, tokens_through_step};

const PICKED: Color32 = Color32::from_rgb(255, 200, 0);

#[derive(Default)]
pub struct DraftTreePanel {
    /// The node the user clicked, for the run and step it belongs to.
    pick: Option<(RunKey, usize, TreePick)>,
    /// The pan and zoom of the scene, for the run and step it was fitted to.
    view: Option<(RunKey, usize, Rect)>,
}

/// One box of the tree, measured and placed in scene coordinates.
struct Item {
    rect: Rect,
    title: Arc<Galley>,
    sub: Arc<Galley>,
    fill: Color32,
    text: Color32,
    pick: Option<TreePick>,
    label: String,
}

impl DraftTreePanel {
    pub fn ui(&mut self, ui: &mut egui::Ui, ctx: &ViewCtx<'_>) {
        let Some((key, run)) = ctx.selected() else {
            empty_state(
                ui,
                "No run selected",
                "Open a speculative trace or start a speculative run to see its draft trees here.",
            );
            return;
        };
        if !is_speculative(&run.trace) {
            empty_state(
                ui,
                "No draft tree",
                &format!(
                    "This run used “{}”: it commits one token per step and drafts nothing. Pick “speculative” \
                     as the method and press Run, or open a speculative trace (File > Open trace…).",
                    run.trace.header.method
                ),
            );
            return;
        }
        let index = ctx.cursor.step;
        let Some(step) = run.trace.steps.get(index) else {
            empty_state(
                ui,
                "No steps yet",
                "The draft trees appear as the run decodes.",
            );
            return;
        };
        let Some(spec) = payload(step) else {
            empty_state(
                ui,
                &format!("Step {} drafted nothing", index + 1),
                "The drafter had no proposal at this step (prompt lookup found no match, for example), so the \
                 target decoded one token alone. Move the cursor to another step.",
            );
            return;
        };
        if self.pick.is_some_and(|(k, s, _)| (k, s) != (key, index)) {
            self.pick = None;
        }
        let pick = self.pick.map(|(_, _, p)| p);
        if header_ui(ui, step, spec, index) {
            self.view = None;
        }
        ui.separator();

        let shape = layout(spec);
        let items = measure(ui, run, index, step, spec, &shape);
        let bounds = items
            .iter()
            .fold(Rect::NOTHING, |b, item| b.union(item.rect))
            .expand(16.0);
        let area = ui.available_rect_before_wrap();
        // Beside the tree or under it, whichever shows the tree larger.
        let detail_w = (area.width() * 0.36).clamp(260.0, 400.0);
        // A short pane (a tab group sharing its column) must not make the lower bound exceed the upper one.
        let stacked_h = (bounds.height() + 24.0).clamp(140.0, (area.height() * 0.6).max(140.0));
        let scale_beside =
            ((area.width() - detail_w) / bounds.width()).min(area.height() / bounds.height());
        let scale_under = (area.width() / bounds.width()).min(stacked_h / bounds.height());
        let side_by_side = area.width() >= 640.0 && scale_beside.min(1.0) > scale_under.min(1.0);
        let (tree_rect, detail_rect) = if side_by_side {
            let split = area.right() - detail_w;
            (
                Rect::from_min_max(area.min, pos2(split - 8.0, area.bottom())),
                Rect::from_min_max(pos2(split, area.top()), area.max),
            )
        } else {
            // Tall enough for the tree at 1:1 when it fits, leaving the rest to the explanation.
            let split = area.top() + stacked_h;
            (
                Rect::from_min_max(area.min, pos2(area.right(), split - 6.0)),
                Rect::from_min_max(pos2(area.left(), split), area.max),
            )
        };
        ui.scope_builder(egui::UiBuilder::new().max_rect(tree_rect), |ui| {
            self.tree_ui(ui, (key, index), step, spec, (&shape, &items, bounds), pick);
        });
        ui.scope_builder(egui::UiBuilder::new().max_rect(detail_rect), |ui| {
            egui::ScrollArea::vertical()
                .id_salt("draft_detail")
                .auto_shrink([false, false])
                .show(ui, |ui| {
                    // The drafter's choice first: it came before the draft the explanation is about.
                    if let Some(exits) = &spec.exit_layers {
                        exit_layers_ui(ui, exits, spec.nodes.len(), index);
                        ui.separator();
                    }
                    detail_ui(ui, step, spec, pick);
                });
        });
        ui.allocate_rect(area, Sense::hover());
    }

    fn tree_ui(
        &mut self,
        ui: &mut egui::Ui,
        (key, index): (RunKey, usize),
        step: &StepRecord,
        spec: &SpeculativeStep,
        (shape, items, bounds): (&TreeLayout, &[Item], Rect),
        pick: Option<TreePick>,
    ) {
        let frame = ui.max_rect();
        ui.painter()
            .rect_filled(frame, 4.0, ui.visuals().extreme_bg_color);
        let fitted = match self.view {
            Some((k, s, rect)) if (k, s) == (key, index) => rect,
            _ => {
                // Fit the tree, never magnified beyond 1:1 (text would blur), centred.
                let scale = (frame.size() / bounds.size()).min_elem().min(1.0);
                Rect::from_center_size(bounds.center(), frame.size() / scale)
            }
        };
        let mut scene_rect = fitted;
        let strong = ui.visuals().strong_text_color();
        let edge_stroke = |node: Option<usize>| match node.map(|i| spec.nodes[i].status) {
            Some(DraftStatus::Accepted) => Stroke::new(3.0, DRAFT_ACCEPTED),
            Some(DraftStatus::Rejected) => Stroke::new(1.5, REJECTED),
            Some(DraftStatus::Unverified) => Stroke::new(1.0, UNVERIFIED),
            None => Stroke::new(2.0, strong),
        };
        let mut clicked = None;
        egui::Scene::new()
            .zoom_range(0.1..=2.0)
            .max_inner_size(bounds.size().max(vec2(1000.0, 1000.0)) * 2.0)
            .show(ui, &mut scene_rect, |ui| {
                let painter = ui.painter().clone();
                let n = spec.nodes.len();
                // Edges first, so boxes sit on top. Item 0 is the root, 1..=n the nodes, n + 1 the verifier token.
                let parents = shape
                    .node_parents
                    .iter()
                    .enumerate()
                    .map(|(i, p)| (i + 1, *p, Some(i)))
                    .chain(shape.verifier.map(|_| (n + 1, shape.verifier_parent, None)));
                for (child, parent, node) in parents {
                    let from = items[parent.map_or(0, |p| p + 1)].rect.right_center();
                    let to = items[child].rect.left_center();
                    let dx = vec2((to.x - from.x) * 0.5, 0.0);
                    painter.add(CubicBezierShape::from_points_stroke(
                        [from, from + dx, to - dx, to],
                        false,
                        Color32::TRANSPARENT,
                        edge_stroke(node),
                    ));
                }
                for (i, item) in items.iter().enumerate() {
                    let verifier = item.pick == Some(TreePick::Verifier);
                    let radius = if verifier { 14.0 } else { 5.0 };
                    painter.rect_filled(item.rect, radius, item.fill);
                    if verifier {
                        painter.rect_stroke(
                            item.rect,
                            radius,
                            Stroke::new(2.0, ui.visuals().strong_text_color()),
                            StrokeKind::Outside,
                        );
                    }
                    if item.pick.is_some() && item.pick == pick {
                        painter.rect_stroke(
                            item.rect.expand(3.0),
                            radius + 3.0,
                            Stroke::new(3.0, PICKED),
                            StrokeKind::Outside,
                        );
                    }
                    let top = item.rect.center_top() + vec2(0.0, 5.0);
                    painter.galley(
                        top - vec2(item.title.size().x / 2.0, 0.0),
                        item.title.clone(),
                        item.text,
                    );
                    painter.galley(
                        pos2(
                            item.rect.center().x - item.sub.size().x / 2.0,
                            top.y + item.title.size().y + 1.0,
                        ),
                        item.sub.clone(),
                        item.text,
                    );
                    let Some(item_pick) = item.pick else { continue };
                    let response = ui.interact(
                        item.rect,
                        ui.scope_id().with(("draft_node", i)),
                        Sense::click(),
                    );
                    let label = item.label.clone();
                    response.widget_info(|| {
                        egui::WidgetInfo::labeled(egui::Role::Button, true, label.clone())
                    });
                    let response = response
                        .on_hover_text(explain(step, spec, item_pick))
                        .on_hover_cursor(egui::CursorIcon::PointingHand);
                    if response.clicked() {
                        clicked = Some(item_pick);
                    }
                }
            });
        self.view = Some((key, index, scene_rect));
        if let Some(p) = clicked {
            self.pick = Some((key, index, p));
        }
    }
}

/// The step in one line, the drafter's note, and the colour key with a Fit button; true when Fit was clicked.
fn header_ui(ui: &mut egui::Ui, step: &StepRecord, spec: &SpeculativeStep, index: usize) -> bool {
    ui.label(
        RichText::new(format!(
            "Step {}: the {} drafter proposed {} token{} (draft length {}); {} verification.",
            index + 1,
            spec.drafter,
            spec.nodes.len(),
            if spec.nodes.len() == 1 { "" } else { "s" },
            spec.draft_len,
            spec.verifier
        ))
        .strong(),
    );
    if !spec.note.is_empty() {
        ui.label(RichText::new(format!("Drafter note: {}", spec.note)).italics());
    }
    let committed: Vec<String> = step.tokens.iter().map(|t| quote(&t.token)).collect();
    ui.label(format!(
        "{} of {} drafts accepted; the step committed {} token{}: {}",
        step.draft_n_accepted,
        step.draft_n.max(spec.nodes.len()),
        step.tokens.len(),
        if step.tokens.len() == 1 { "" } else { "s" },
        committed.join(" ")
    ));
    ui.horizontal_wrapped(|ui| {
        for (color, name) in [
            (DRAFT_ACCEPTED, "accepted"),
            (REJECTED, "rejected"),
            (UNVERIFIED, "never checked"),
            (CORRECTED, "corrected by the verifier"),
            (BONUS, "bonus"),
        ] {
            ui.label(RichText::new("■").monospace().color(color));
            ui.label(name);
        }
        ui.add_space(8.0);
        ui.small_button("Fit")
            .on_hover_text("Fit the whole tree in view (drag to pan, ctrl + scroll to zoom)")
            .clicked()
    })
    .inner
}

/// Measures every box and places it: columns as wide as the widest box, rows as tall as the tallest.
fn measure(
    ui: &egui::Ui,
    run: &RunEntry,
    index: usize,
    step: &StepRecord,
    spec: &SpeculativeStep,
    shape: &TreeLayout,
) -> Vec<Item> {
    let painter = ui.painter();
    let title_font = FontId::monospace(14.0);
    let sub_font = FontId::proportional(11.5);
    let lay = |title: String, sub: String, color: Color32| {
        (
            painter.layout_no_wrap(title, title_font.clone(), color),
            painter.layout_no_wrap(sub, sub_font.clone(), color),
        )
    };
    let visuals = ui.visuals();
    // The root is the last committed token before this step.
    let root_token = if index == 0 {
        run.trace.header.prompt.tokens.last().cloned()
    } else {
        let before = tokens_through_step(&run.trace, index - 1);
        crate::gui::store::output_at(&run.trace, index - 1)
            .get(before.saturating_sub(1))
            .map(|t| t.token.token.clone())
    };
    let item = |title: String, sub: String, fill: Color32, text: Color32| {
        let (title, sub) = lay(title, sub, text);
        Item {
            rect: Rect::NOTHING,
            title,
            sub,
            fill,
            text,
            pick: None,
            label: String::new(),
        }
    };
    let mut raw: Vec<(Slot, Item)> = vec![(
        shape.root,
        item(
            root_token.as_deref().map_or_else(|| "…".to_owned(), quote),
            "committed text".to_owned(),
            visuals.widgets.inactive.bg_fill,
            visuals.text_color(),
        ),
    )];
    for (i, node) in spec.nodes.iter().enumerate() {
        let (fill, word) = match node.status {
            DraftStatus::Accepted => (DRAFT_ACCEPTED, "accepted"),
            DraftStatus::Rejected => (REJECTED, "rejected"),
            DraftStatus::Unverified => (UNVERIFIED, "never checked"),
        };
        let p = node.p.map_or("–".to_owned(), short_prob);
        let mut it = item(
            quote(&node.token),
            format!("q {:.2} · p {p}", node.q),
            fill,
            Color32::WHITE,
        );
        it.pick = Some(TreePick::Node(i));
        it.label = format!("{} at depth {}: {word}", quote(&node.token), node.depth);
        raw.push((shape.nodes[i], it));
    }
    if let (Some(slot), Some(r)) = (shape.verifier, spec.rejection.as_ref()) {
        let token = verifier_token(step, spec).unwrap_or_else(|| format!("#{}", r.token_id));
        let (fill, word) = if r.bonus {
            (BONUS, "bonus")
        } else {
            (CORRECTED, "corrected")
        };
        let p = r
            .distribution
            .iter()
            .find(|c| c.id == r.token_id)
            .map(|c| {
                format!(
                    " · p {:.2}",
                    c.warped_prob.unwrap_or_else(|| c.logprob.exp())
                )
            })
            .unwrap_or_default();
        let mut it = item(quote(&token), format!("{word}{p}"), fill, Color32::WHITE);
        it.pick = Some(TreePick::Verifier);
        it.label = format!("{} at depth {}: {word}", quote(&token), r.depth);
        raw.push((slot, it));
    }
    let size_of = |t: &Galley, s: &Galley| {
        vec2(
            t.size().x.max(s.size().x) + 18.0,
            t.size().y + s.size().y + 12.0,
        )
    };
    // Each column as wide as its widest box, so one long token does not widen the whole tree.
    let mut col_w = vec![0.0f32; shape.columns.max(1)];
    let mut row_h: f32 = 30.0;
    for (slot, it) in &raw {
        let size = size_of(&it.title, &it.sub);
        if let Some(w) = col_w.get_mut(slot.column) {
            *w = w.max(size.x);
        }
        row_h = row_h.max(size.y);
    }
    let col_x: Vec<f32> = col_w
        .iter()
        .scan(0.0, |x, w| {
            let left = *x;
            *x += w + 40.0;
            Some(left + w / 2.0)
        })
        .collect();
    raw.into_iter()
        .map(|(slot, mut it)| {
            let center = Pos2::new(
                col_x.get(slot.column).copied().unwrap_or_default(),
                slot.row * (row_h + 14.0) + row_h / 2.0,
            );
            it.rect = Rect::from_center_size(center, size_of(&it.title, &it.sub));
            it
        })
        .collect()
}

/// A probability in two decimals, but never a misleading "0.00" for a small positive one.
fn short_prob(p: f32) -> String {
    if p > 0.0 && p < 0.005 {
        "<0.01".to_owned()
    } else {
        format!("{p:.2}")
    }
}
