//! The eframe app: owns the store, the cursor, the worker and the layout; each frame it drains worker events
//! (`logic`), draws the panels (`ui`), then applies the commands the panels queued (`handle.rs`).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use egui::{Key, RichText};

use super::backend::Backend;
use super::command::{Command, CommandQueue};
use super::cursor::{CursorMove, PlayMode, TimeCursor};
use super::download::Download;
use super::export::PanelExport;
use super::panels::ViewCtx;
use super::panels::prompt::PromptPanel;
use super::panels::timeline::TimelinePanel;
use super::panels::top_bar::TopBar;
use super::picker::FilePicker;
use super::settings::Settings;
use super::store::{ModelState, Notice, RunKey, RunStatus, RunStore};
use super::sweep::Sweep;
use super::tiles::{Behavior, Pane, Panels, default_tree, is_complete};

const SETTINGS_KEY: &str = "specula_settings";
const LAYOUT_KEY: &str = "specula_layout";
/// How long one frame may spend applying worker events before it draws what it has (rerun uses a similar
/// budget), so a burst of events never freezes the window.
const EVENT_BUDGET: Duration = Duration::from_millis(8);

/// Where the smoke test's export stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SmokeExport {
    /// Waiting for the selected run to finish.
    Waiting(Pane),
    /// The export command was sent; its outcome is printed when it ends.
    Exporting,
}

/// What the app is built from; tests pass fakes for the picker and the backend.
pub struct AppOptions {
    pub picker: Box<dyn FilePicker>,
    pub backend: Box<dyn Backend>,
    /// The model to load at start, or why there is none (shown on the no-model card).
    pub model: Result<PathBuf, String>,
    /// A prompt to run greedily for 32 tokens as soon as the model is loaded (`SPECULA_AUTORUN`).
    pub autorun: Option<String>,
    /// Example traces for File → Open example.
    pub examples: Vec<PathBuf>,
}

pub struct SpeculaApp {
    pub(super) store: RunStore,
    pub(super) cursor: TimeCursor,
    /// The run the cursor belongs to; selecting another run resets the cursor.
    pub(super) cursor_run: Option<RunKey>,
    pub(super) focus: Option<usize>,
    pub(super) compare: BTreeSet<RunKey>,
    pub(super) settings: Settings,
    pub(super) tree: egui_tiles::Tree<Pane>,
    pub(super) panels: Panels,
    pub(super) top_bar: TopBar,
    pub(super) prompt_panel: PromptPanel,
    pub(super) timeline: TimelinePanel,
    pub(super) backend: Box<dyn Backend>,
    pub(super) picker: Box<dyn FilePicker>,
    pub(super) download: Option<Download>,
    /// A panel export waiting for its screenshot.
    pub(super) export: Option<PanelExport>,
    /// The draft-length sweep in progress.
    pub(super) sweep: Option<Sweep>,
    pub(super) notice: Option<Notice>,
    pub(super) autorun: Option<String>,
    /// The Xvfb smoke test's export (`SPECULA_SMOKE_EXPORT`).
    pub(super) smoke_export: Option<SmokeExport>,
    pub(super) commands: CommandQueue,
    pub(super) egui_ctx: egui::Context,
    title: String,
}

impl SpeculaApp {
    pub fn new(cc: &eframe::CreationContext<'_>, options: AppOptions) -> Self {
        let settings: Settings = cc
            .storage
            .and_then(|s| eframe::get_value(s, SETTINGS_KEY))
            .unwrap_or_default();
        let tree = cc
            .storage
            .and_then(|s| eframe::get_value::<egui_tiles::Tree<Pane>>(s, LAYOUT_KEY))
            .filter(is_complete)
            .unwrap_or_else(default_tree);
        let mut backend = options.backend;
        let model = match options.model {
            Ok(path) => {
                backend.load_model(path.clone());
                ModelState::Loading { path }
            }
            Err(reason) => ModelState::Missing { reason },
        };
        cc.egui_ctx.set_theme(if settings.dark_mode {
            egui::Theme::Dark
        } else {
            egui::Theme::Light
        });
        Self {
            store: RunStore::new(model),
            cursor: TimeCursor::default(),
            cursor_run: None,
            focus: None,
            compare: BTreeSet::new(),
            settings,
            tree,
            panels: Panels::default(),
            top_bar: TopBar {
                examples: options.examples,
            },
            prompt_panel: PromptPanel,
            timeline: TimelinePanel,
            backend,
            picker: options.picker,
            download: None,
            export: None,
            sweep: None,
            notice: None,
            autorun: options.autorun,
            smoke_export: None,
            commands: CommandQueue::default(),
            egui_ctx: cc.egui_ctx.clone(),
            title: String::new(),
        }
    }

    pub fn store(&self) -> &RunStore {
        &self.store
    }

    pub fn cursor(&self) -> &TimeCursor {
        &self.cursor
    }

    /// The generated token the user focused (its index among every token the selected run committed).
    pub fn focus(&self) -> Option<usize> {
        self.focus
    }

    pub fn notice(&self) -> Option<&Notice> {
        self.notice.as_ref()
    }

    /// The sweep in progress, if any.
    pub fn sweep(&self) -> Option<&Sweep> {
        self.sweep.as_ref()
    }

    /// Where `pane` was drawn in the last frame (`None` when its tab is hidden).
    pub fn pane_rect(&self, pane: Pane) -> Option<egui::Rect> {
        self.panels.rect_of(pane)
    }

    pub fn settings_mut(&mut self) -> &mut Settings {
        &mut self.settings
    }

    /// Queues a command as if a panel had sent it (tests and start-up use this).
    pub fn send(&self, command: Command) {
        self.commands.send(command);
    }

    /// Shows `pane` in its tab container (used by tests and menu shortcuts).
    pub fn show_pane(&mut self, pane: Pane) {
        self.tree
            .make_active(|_, tile| matches!(tile, egui_tiles::Tile::Pane(p) if *p == pane));
    }

    /// Applies worker events for at most [`EVENT_BUDGET`]; asks for another frame if some are left.
    fn drain_events(&mut self, ctx: &egui::Context) {
        let started = Instant::now();
        while let Some(event) = self.backend.try_event() {
            if let Some(notice) = self.store.apply(event) {
                self.notice = Some(notice);
            }
            if started.elapsed() > EVENT_BUDGET {
                ctx.request_repaint();
                break;
            }
        }
    }

    fn poll_download(&mut self) {
        let Some(outcome) = self.download.as_mut().and_then(Download::poll) else {
            return;
        };
        self.download = None;
        match outcome {
            Ok(path) => {
                self.notice = Some(Notice::info(format!(
                    "Downloaded {}; loading it.",
                    path.display()
                )));
                self.commands.send(Command::LoadModel(Some(path)));
            }
            Err(e) => self.notice = Some(Notice::error(e)),
        }
    }

    /// Exports `pane` as PNG once the selected run finished, through [`Command::ExportPanel`], and prints the
    /// outcome on stdout (the Xvfb smoke test reads it); the picker decides where the file goes.
    pub fn export_when_finished(&mut self, pane: Pane) {
        self.smoke_export = Some(SmokeExport::Waiting(pane));
    }

    fn start_smoke_export(&mut self) {
        let Some(SmokeExport::Waiting(pane)) = self.smoke_export else {
            return;
        };
        if self
            .store
            .selected()
            .is_some_and(|run| matches!(run.status, RunStatus::Finished(_)))
        {
            self.commands.send(Command::ExportPanel(pane));
            self.smoke_export = Some(SmokeExport::Exporting);
        }
    }

    fn start_autorun(&mut self) {
        if self.store.model.info().is_none() {
            return;
        }
        if let Some(prompt) = self.autorun.take() {
            let run = &mut self.settings.run;
            run.prompt = prompt;
            run.method = "greedy".to_owned();
            run.chat = true;
            run.max_tokens = 32;
            self.commands.send(Command::StartRun { paused: false });
        }
    }

    /// Files dropped on the window: models load, anything else opens as a trace.
    fn take_dropped_files(&mut self, ctx: &egui::Context) {
        let dropped: Vec<PathBuf> = ctx.input(|i| {
            i.raw
                .dropped_files
                .iter()
                .map(|f| f.path().to_owned())
                .filter(|p| !p.as_os_str().is_empty())
                .collect()
        });
        for path in dropped {
            let is_model = path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
            self.commands.send(if is_model {
                Command::LoadModel(Some(path))
            } else {
                Command::OpenTrace(Some(path))
            });
        }
    }

    /// ← → Home End and space move the cursor, unless a text field has the keyboard.
    fn keyboard(&mut self, ctx: &egui::Context) {
        if ctx.egui_wants_keyboard_input() {
            return;
        }
        let playing = self.cursor.mode == PlayMode::Playing;
        let moves: Vec<CursorMove> = ctx.input(|i| {
            [
                (Key::ArrowLeft, CursorMove::Back),
                (Key::ArrowRight, CursorMove::Forward),
                (Key::Home, CursorMove::First),
                (Key::End, CursorMove::Follow),
                (
                    Key::Space,
                    if playing {
                        CursorMove::Pause
                    } else {
                        CursorMove::Play
                    },
                ),
            ]
            .into_iter()
            .filter(|(key, _)| i.key_pressed(*key))
            .map(|(_, m)| m)
            .collect()
        });
        for m in moves {
            self.commands.send(Command::MoveCursor(m));
        }
    }

    /// A cursor and focus belong to one run: when another run is selected they start over (keeping the play
    /// rate). Called when a command selects a run, so that a focus queued right after the selection (a click
    /// on another run's token) applies to the new run and survives the next frame.
    pub(super) fn follow_selection(&mut self) {
        let selected = self.store.selected_key();
        if selected != self.cursor_run {
            self.cursor_run = selected;
            let rate = self.cursor.steps_per_second;
            self.cursor = TimeCursor::default();
            self.cursor.apply(CursorMove::SetRate(rate), 0);
            self.focus = None;
        }
    }

    /// Resets the cursor when another run is selected; follows the newest step; advances a playing cursor.
    fn update_cursor(&mut self, ctx: &egui::Context) {
        self.follow_selection();
        let (len, live) = self
            .store
            .selected()
            .map_or((0, false), |r| (r.trace.steps.len(), r.status.is_live()));
        let dt = ctx.input(|i| i.stable_dt).min(0.1);
        if self.cursor.advance(dt, len, live) {
            ctx.request_repaint();
        }
        self.cursor.sync(len);
    }

    fn update_title(&mut self, ctx: &egui::Context) {
        let title = match self.store.selected() {
            Some(run) => format!("Specula — {}: {}", run.label(), run.status.describe()),
            None => "Specula".to_owned(),
        };
        if title != self.title {
            ctx.send_viewport_cmd(egui::ViewportCommand::Title(title.clone()));
            self.title = title;
        }
    }
}

impl eframe::App for SpeculaApp {
    fn logic(&mut self, ctx: &egui::Context, _frame: &mut eframe::Frame) {
        self.drain_events(ctx);
        self.advance_sweep();
        self.poll_download();
        self.start_autorun();
        self.start_smoke_export();
        self.take_dropped_files(ctx);
        self.keyboard(ctx);
        self.update_cursor(ctx);
        self.update_title(ctx);
    }

    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        let Self {
            store,
            cursor,
            focus,
            compare,
            settings,
            tree,
            panels,
            top_bar,
            prompt_panel,
            timeline,
            download,
            sweep,
            notice,
            commands,
            ..
        } = self;
        let view = ViewCtx {
            store,
            cursor,
            focus: *focus,
            compare,
            download: download.as_ref(),
            sweep: sweep.as_ref(),
            commands,
        };
        egui::Panel::top("top_bar").show(ui, |ui| {
            top_bar.menu_ui(ui, &view, settings.dark_mode);
            top_bar.controls_ui(ui, &view, &mut settings.run);
            ui.add_space(2.0);
        });
        egui::Panel::bottom("status_line").show(ui, |ui| status_line(ui, notice.as_ref(), &view));
        egui::Panel::bottom("timeline").show(ui, |ui| {
            ui.add_space(4.0);
            timeline.ui(ui, &view);
            ui.add_space(2.0);
        });
        egui::Panel::left("prompt_panel")
            .resizable(true)
            .default_size(300.0)
            .min_size(220.0)
            .show(ui, |ui| prompt_panel.ui(ui, &view, &mut settings.run));
        panels.begin_frame();
        egui::CentralPanel::default().show(ui, |ui| {
            tree.ui(&mut Behavior { panels, ctx: &view }, ui);
        });
        self.poll_export(ui.ctx());
        let commands = self.commands.take();
        if !commands.is_empty() {
            // The frame just drawn predates these changes: draw another.
            ui.ctx().request_repaint();
        }
        for command in commands {
            self.handle(command);
        }
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        eframe::set_value(storage, SETTINGS_KEY, &self.settings);
        eframe::set_value(storage, LAYOUT_KEY, &self.tree);
    }
}

/// The last message (with a Dismiss button), or a hint.
fn status_line(ui: &mut egui::Ui, notice: Option<&Notice>, view: &ViewCtx<'_>) {
    ui.horizontal(|ui| match notice {
        Some(n) => {
            let color = if n.is_error { ui.visuals().error_fg_color } else { ui.visuals().text_color() };
            if ui.small_button("Dismiss").clicked() {
                view.send(Command::DismissNotice);
            }
            ui.add(egui::Label::new(RichText::new(&n.text).color(color)).wrap());
        }
        None => {
            ui.label(
                RichText::new("Tip: drop a .jsonl trace or a .gguf model on the window. Left/Right arrows, Home, End and Space move the cursor.")
                    .weak(),
            );
        }
    });
}

/// A waker for background threads: asks egui for a frame soon (coalescing bursts of events).
pub fn repaint_waker(ctx: &egui::Context) -> Arc<dyn Fn() + Send + Sync> {
    let ctx = ctx.clone();
    Arc::new(move || ctx.request_repaint_after(Duration::from_millis(10)))
}
