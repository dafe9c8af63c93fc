//! Export a panel as PNG. egui can only screenshot the whole window, and only as the frame is painted, so an
//! export takes a few frames:
//!
//! 1. the user picks a file; the panel's tab is brought to the front;
//! 2. the next frame draws the panel, records its rect and asks the window for a screenshot;
//! 3. when the screenshot arrives (a callback, usually one frame later), [`save_panel_png`] crops it to the
//!    panel's rect, encodes it and writes it atomically.
//!
//! Step 3 is a plain function of the screenshot, so tests can feed it a synthetic image.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use egui::{ColorImage, Rect};
use image::ImageEncoder;
use image::codecs::png::PngEncoder;
use specula_core::trace::write_atomically;

use super::app::{SmokeExport, SpeculaApp};
use super::handle::{file_stem, with_extension_if_missing};
use super::store::Notice;
use super::tiles::Pane;

/// How long to wait for the window's screenshot before saying it did not come.
const SCREENSHOT_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames to wait for the panel to be drawn after its tab was brought to the front.
const FRAMES_TO_SHOW: u32 = 3;

type Slot = Arc<Mutex<Option<Arc<ColorImage>>>>;

/// An export in progress.
pub struct PanelExport {
    pane: Pane,
    path: PathBuf,
    stage: Stage,
}

enum Stage {
    /// The tab was brought to the front; waiting for a frame that draws the panel.
    Showing { frames: u32 },
    /// The screenshot was asked for; the callback fills `slot`.
    Waiting {
        rect: Rect,
        pixels_per_point: f32,
        slot: Slot,
        since: Instant,
    },
}

impl PanelExport {
    pub fn new(pane: Pane, path: PathBuf) -> Self {
        Self {
            pane,
            path,
            stage: Stage::Showing { frames: 0 },
        }
    }

    pub fn pane(&self) -> Pane {
        self.pane
    }

    /// The panel's rect in the window's pixels (x, y, width, height) once the screenshot was asked for, rounded
    /// as [`crop`] rounds it: the size the PNG must have.
    pub fn pixel_rect(&self) -> Option<[usize; 4]> {
        let Stage::Waiting {
            rect,
            pixels_per_point,
            ..
        } = &self.stage
        else {
            return None;
        };
        let px = |v: f32| (v * pixels_per_point).round().max(0.0) as usize;
        let (x0, y0) = (px(rect.min.x), px(rect.min.y));
        Some([
            x0,
            y0,
            px(rect.max.x).saturating_sub(x0),
            px(rect.max.y).saturating_sub(y0),
        ])
    }

    /// Moves the export on after the panes were drawn; `pane_rect` is where this frame drew the panel. Returns
    /// the message for the user once the export is over.
    pub fn poll(&mut self, ctx: &egui::Context, pane_rect: Option<Rect>) -> Option<Notice> {
        let title = self.pane.title();
        match &mut self.stage {
            Stage::Showing { frames } => {
                if let Some(rect) = pane_rect {
                    let slot: Slot = Arc::default();
                    let filled = slot.clone();
                    let waker = ctx.clone();
                    ctx.request_screenshot(move |image| {
                        // A poisoned lock means a panic elsewhere already; the timeout reports the export.
                        if let Ok(mut s) = filled.lock() {
                            *s = Some(image);
                        }
                        waker.request_repaint();
                    });
                    self.stage = Stage::Waiting {
                        rect,
                        pixels_per_point: ctx.pixels_per_point(),
                        slot,
                        since: Instant::now(),
                    };
                    ctx.request_repaint_after(Duration::from_millis(200));
                    return None;
                }
                *frames += 1;
                if *frames > FRAMES_TO_SHOW {
                    return Some(Notice::error(format!(
                        "Could not export {title}: the panel is not on screen. Drag its tab into the workbench \
                         and try again."
                    )));
                }
                ctx.request_repaint();
                None
            }
            Stage::Waiting {
                rect,
                pixels_per_point,
                slot,
                since,
            } => {
                let image = slot.lock().ok().and_then(|mut s| s.take());
                match image {
                    Some(image) => Some(
                        match save_panel_png(&image, *rect, *pixels_per_point, &self.path) {
                            Ok([w, h]) => Notice::info(format!(
                                "Exported {title} ({w}×{h} pixels) to {}.",
                                self.path.display()
                            )),
                            Err(e) => Notice::error(format!("Could not export {title}: {e}")),
                        },
                    ),
                    None if since.elapsed() > SCREENSHOT_TIMEOUT => Some(Notice::error(format!(
                        "Could not export {title}: the window did not deliver a screenshot within {} s.",
                        SCREENSHOT_TIMEOUT.as_secs()
                    ))),
                    None => {
                        ctx.request_repaint_after(Duration::from_millis(200));
                        None
                    }
                }
            }
        }
    }
}

/// The pixels of `screenshot` under `rect` (in points), clamped to the image. `None` when no pixel is left.
pub fn crop(screenshot: &ColorImage, rect: Rect, pixels_per_point: f32) -> Option<ColorImage> {
    let [width, height] = screenshot.size;
    if screenshot.pixels.len() != width * height {
        return None;
    }
    // `max(0.0)` also turns a NaN coordinate into 0.
    let to_pixel =
        |v: f32, limit: usize| ((v * pixels_per_point).round().max(0.0) as usize).min(limit);
    let (x0, x1) = (to_pixel(rect.min.x, width), to_pixel(rect.max.x, width));
    let (y0, y1) = (to_pixel(rect.min.y, height), to_pixel(rect.max.y, height));
    if x1 <= x0 || y1 <= y0 {
        return None;
    }
    Some(screenshot.region_by_pixels([x0, y0], [x1 - x0, y1 - y0]))
}

/// Encodes `image` as an 8-bit RGBA PNG.
pub fn encode_png(image: &ColorImage, out: &mut dyn Write) -> Result<(), image::ImageError> {
    let [width, height] = image.size;
    let bytes: Vec<u8> = image
        .pixels
        .iter()
        .flat_map(|c| c.to_srgba_unmultiplied())
        .collect();
    PngEncoder::new(out).write_image(
        &bytes,
        width as u32,
        height as u32,
        image::ExtendedColorType::Rgba8,
    )
}

/// Crops the window's screenshot to the panel and writes it as a PNG through a temporary file, so a failed
/// write never leaves a broken file where a good one was. Returns the PNG's size in pixels.
pub fn save_panel_png(
    screenshot: &ColorImage,
    rect: Rect,
    pixels_per_point: f32,
    path: &Path,
) -> Result<[usize; 2], String> {
    let panel = crop(screenshot, rect, pixels_per_point).ok_or_else(|| {
        format!(
            "the panel ({:.0}×{:.0} points) lies outside the {}×{} pixel screenshot",
            rect.width(),
            rect.height(),
            screenshot.size[0],
            screenshot.size[1]
        )
    })?;
    write_atomically(path, |w| {
        encode_png(&panel, w).map_err(|e| std::io::Error::other(e.to_string()))
    })
    .map_err(|e| e.to_string())?;
    Ok(panel.size)
}

impl SpeculaApp {
    /// Asks where to save, then brings the panel to the front; the export finishes over the next frames.
    pub(super) fn start_export(&mut self, pane: Pane) {
        if let Some(busy) = &self.export {
            self.notice = Some(Notice::error(format!(
                "Still exporting {}; try again in a moment.",
                busy.pane().title()
            )));
            return;
        }
        let name = format!("{}.png", file_stem(&pane.title().to_lowercase()));
        let Some(path) = self.picker.save(&name) else {
            return;
        };
        let path = with_extension_if_missing(path, "png");
        self.show_pane(pane);
        self.export = Some(PanelExport::new(pane, path));
        self.egui_ctx.request_repaint();
    }

    /// Called once the panes were drawn this frame.
    pub(super) fn poll_export(&mut self, ctx: &egui::Context) {
        let Some(export) = self.export.as_mut() else {
            return;
        };
        let rect = self.panels.rect_of(export.pane());
        if let Some(notice) = export.poll(ctx, rect) {
            if self.smoke_export == Some(SmokeExport::Exporting) {
                let [x, y, width, height] = export.pixel_rect().unwrap_or_default();
                println!(
                    "specula-export: pane={:?} x={x} y={y} width={width} height={height} {}: {}",
                    export.pane().title(),
                    if notice.is_error { "error" } else { "ok" },
                    notice.text
                );
                self.smoke_export = None;
            }
            self.notice = Some(notice);
            self.export = None;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use egui::{Color32, pos2};

    /// A 40×30 pixel "screenshot" whose pixel (x, y) encodes its own coordinates.
    fn numbered() -> ColorImage {
        let pixels = (0..30)
            .flat_map(|y| (0..40).map(move |x| Color32::from_rgb(x as u8, y as u8, 7)))
            .collect();
        ColorImage::new([40, 30], pixels)
    }

    #[test]
    fn crop_takes_the_panel_in_pixels_and_png_round_trips() {
        let shot = numbered();
        // 2 pixels per point: points (3, 4)–(13, 9) are pixels (6, 8)–(26, 18).
        let rect = Rect::from_min_max(pos2(3.0, 4.0), pos2(13.0, 9.0));
        let panel = crop(&shot, rect, 2.0).unwrap();
        assert_eq!(panel.size, [20, 10]);
        assert_eq!(panel.pixels[0], Color32::from_rgb(6, 8, 7));
        assert_eq!(panel.pixels[20 * 10 - 1], Color32::from_rgb(25, 17, 7));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("panel.png");
        assert_eq!(save_panel_png(&shot, rect, 2.0, &path).unwrap(), [20, 10]);
        let bytes = std::fs::read(&path).unwrap();
        let decoded = image::load_from_memory_with_format(&bytes, image::ImageFormat::Png)
            .unwrap()
            .to_rgba8();
        assert_eq!(decoded.dimensions(), (20, 10));
        assert_eq!(decoded.get_pixel(0, 0).0, [6, 8, 7, 255]);
        assert_eq!(decoded.get_pixel(19, 9).0, [25, 17, 7, 255]);
    }

    #[test]
    fn a_panel_partly_off_the_image_is_clamped_and_one_fully_off_is_an_error() {
        let shot = numbered();
        let partly = Rect::from_min_max(pos2(30.0, 20.0), pos2(100.0, 100.0));
        assert_eq!(crop(&shot, partly, 1.0).unwrap().size, [10, 10]);
        let off = Rect::from_min_max(pos2(50.0, 0.0), pos2(60.0, 10.0));
        assert!(crop(&shot, off, 1.0).is_none());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("off.png");
        let err = save_panel_png(&shot, off, 1.0, &path).unwrap_err();
        assert!(err.contains("outside"), "{err}");
        assert!(!path.exists());
    }

    #[test]
    fn a_write_error_is_reported_and_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing-folder").join("panel.png");
        let rect = Rect::from_min_max(pos2(0.0, 0.0), pos2(5.0, 5.0));
        let err = save_panel_png(&numbered(), rect, 1.0, &path).unwrap_err();
        assert!(err.contains("cannot write"), "{err}");
        assert!(!path.exists());
    }
}
