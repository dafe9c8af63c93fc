//! The model: its state in the top bar, and the first-start card that says how to get one.

use egui::RichText;
use specula_core::model::Kernels;
use specula_core::store::{DEFAULT_HUB_REPO, DEFAULT_MODEL_FILE};

use super::ViewCtx;
use crate::gui::command::Command;
use crate::gui::store::ModelState;

/// One line for the top bar: name, format and size, or what is going on.
pub fn model_status_ui(ui: &mut egui::Ui, ctx: &ViewCtx<'_>) {
    match &ctx.store.model {
        ModelState::Loaded { info, .. } => {
            ui.label(RichText::new(&info.name).strong())
                .on_hover_text(format!(
                    "{}\n{} layers, {} heads, vocabulary {}, context {}",
                    info.file_name,
                    info.n_layers,
                    info.n_heads,
                    info.vocab_size,
                    info.context_length
                ));
            ui.label(format!(
                "{} · {}",
                info.weight_format,
                megabytes(info.file_bytes)
            ));
            if info.matmul.as_deref() == Some(Kernels::BlockSums.name()) {
                ui.label("block sums").on_hover_text(
                    "Matmuls sum each weight block as one integer, as llama.cpp's AMX kernels do (its \
                     arithmetic on CPUs with AMX; --matmul vec-dot gives its arithmetic elsewhere)",
                );
            }
        }
        ModelState::Loading { path } => {
            ui.spinner();
            ui.label(format!("Loading {} …", file_name(path)));
        }
        ModelState::Missing { .. } => {
            ui.label(RichText::new("No model").color(ui.visuals().warn_fg_color));
        }
        ModelState::Failed { path, .. } => {
            ui.label(
                RichText::new(format!("Model failed: {}", file_name(path)))
                    .color(ui.visuals().error_fg_color),
            );
        }
    }
}

/// The card shown where the text would be when there is no model: what happened and three ways out.
pub fn no_model_ui(ui: &mut egui::Ui, ctx: &ViewCtx<'_>) {
    ui.vertical(|ui| {
        ui.set_max_width(ui.available_width().min(640.0));
        ui.add_space(12.0);
        ui.label(RichText::new("No model loaded").heading());
        match &ctx.store.model {
            ModelState::Failed { path, error } => {
                ui.colored_label(
                    ui.visuals().error_fg_color,
                    format!("Could not load {}: {error}", path.display()),
                );
            }
            ModelState::Missing { reason } => {
                ui.label(RichText::new(reason).weak());
            }
            _ => {}
        }
        ui.add_space(8.0);
        ui.label("Specula needs a small GGUF language model to decode. Get one in any of these ways:");
        ui.add_space(4.0);
        ui.label(RichText::new("1. From a terminal in the Specula folder, run:").strong());
        ui.code("models/fetch.sh");
        ui.label("then press “Open a GGUF file…” and pick models/".to_owned() + DEFAULT_MODEL_FILE + ".");
        ui.add_space(4.0);
        ui.label(RichText::new("2. Use a GGUF file you already have (Llama architecture):").strong());
        if ui.button("Open a GGUF file…").clicked() {
            ctx.send(Command::LoadModel(None));
        }
        ui.add_space(4.0);
        ui.label(RichText::new("3. Download the default model from the Hugging Face hub:").strong());
        download_ui(ui, ctx);
        ui.add_space(12.0);
        ui.label(
            "Without a model you can still open and replay recorded traces: File > Open trace…, or File > Open \
             example.",
        );
    });
}

fn download_ui(ui: &mut egui::Ui, ctx: &ViewCtx<'_>) {
    match ctx.download {
        Some(download) => {
            let text = match download.fraction() {
                Some(_) => format!(
                    "{} of {}",
                    megabytes(download.done),
                    megabytes(download.total)
                ),
                None if download.is_cancelling() => "cancelling…".to_owned(),
                None => "connecting…".to_owned(),
            };
            ui.add(
                egui::ProgressBar::new(download.fraction().unwrap_or(0.0))
                    .text(text)
                    .show_percentage(),
            );
            if ui
                .add_enabled(
                    !download.is_cancelling(),
                    egui::Button::new("Cancel download"),
                )
                .clicked()
            {
                ctx.send(Command::CancelDownload);
            }
        }
        None => {
            let label = format!("Download {DEFAULT_MODEL_FILE} (about 100 MB)");
            if ui
                .button(label)
                .on_hover_text(format!(
                    "From {DEFAULT_HUB_REPO} into the Hugging Face cache"
                ))
                .clicked()
            {
                ctx.send(Command::DownloadModel);
            }
        }
    }
}

pub fn megabytes(bytes: u64) -> String {
    format!("{:.0} MB", bytes as f64 / 1_000_000.0)
}

fn file_name(path: &std::path::Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}
