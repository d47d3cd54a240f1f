//! The loss and accuracy curves of a run as a PNG.
//!
//! Drawn with `plotters` on its bitmap backend. Text uses DejaVu Sans, embedded in the binary
//! (`assets/fonts/`) and handed to plotters' `ab_glyph` renderer, so no system fonts, fontconfig
//! or other C libraries are needed.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

use super::metrics::EpochStats;
use crate::diagnostics::Diag;

/// Width and height of the picture in pixels.
pub const SIZE: (u32, u32) = (800, 500);

/// Steps of the x axis per epoch.
const X: i64 = 100;

/// The family name the embedded font is registered under.
const FONT: &str = "sans-serif";

static DEJAVU_SANS: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/assets/fonts/DejaVuSans.ttf"
));

/// Registers the embedded font with plotters once; false when it could not be parsed.
fn font_ready() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    *READY.get_or_init(|| register_font(FONT, FontStyle::Normal, DEJAVU_SANS).is_ok())
}

fn draw_error(path: &Path, e: impl std::fmt::Display) -> Diag {
    Diag::new("dlc::io", format!("cannot draw `{}`: {e}", path.display()))
        .help("check the --out folder")
}

/// Draws train loss, train accuracy and test accuracy per epoch into `path`.
///
/// The picture is rendered to a temporary file next to `path` and renamed over it.
pub fn curves(path: &Path, title: &str, history: &[EpochStats]) -> Result<(), Diag> {
    if !font_ready() {
        return Err(
            draw_error(path, "the embedded font could not be loaded").help("this is a bug in dlc")
        );
    }
    let tmp = temp_path(path);
    // The backend picks the encoder from the extension, so the temporary file ends in `.png`.
    if let Err(e) = render(&tmp, title, history) {
        let _ = std::fs::remove_file(&tmp);
        return Err(draw_error(path, e));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Diag::new("dlc::io", format!("cannot write `{}`: {e}", path.display()))
            .help("check the --out folder")
    })
}

/// `dir/.curves.png.<pid>.tmp.png` for `dir/curves.png`.
fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "curves.png".into());
    path.with_file_name(format!(".{name}.{}.tmp.png", std::process::id()))
}

/// One line of the plot: its legend text, colour and (epoch, value) points.
struct Series {
    label: &'static str,
    color: RGBColor,
    points: Vec<(i64, f64)>,
}

fn render(
    tmp: &Path,
    title: &str,
    history: &[EpochStats],
) -> Result<(), Box<dyn std::error::Error>> {
    let series = [
        Series {
            label: "train loss",
            color: RGBColor(31, 119, 180),
            points: points(history, |s| s.train_loss),
        },
        Series {
            label: "train acc",
            color: RGBColor(214, 39, 40),
            points: points(history, |s| s.train_acc),
        },
        Series {
            label: "test acc",
            color: RGBColor(44, 160, 44),
            points: points(history, |s| s.test_acc),
        },
    ];

    // Epochs on x, padded so that markers at either end stay whole; one epoch sits in the middle.
    // The axis counts hundredths of an epoch (integer coordinates take custom ticks and labels).
    let first = history.iter().map(|s| s.epoch).min().unwrap_or(1);
    let last = history.iter().map(|s| s.epoch).max().unwrap_or(first);
    let span = (last - first) as i64 * X;
    let pad = if last == first {
        X
    } else {
        (span / 40).max(X / 10)
    };
    let x = (first as i64 * X - pad)..(last as i64 * X + pad);
    let step = tick_step(last - first);
    let ticks: Vec<i64> = (first..=last)
        .filter(|e| e % step == 0)
        .map(|e| e as i64 * X)
        .collect();
    // Loss and accuracy share y from 0 to max(1, largest value), like d2l.
    let top = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(1.0f64, f64::max)
        * 1.03;

    let root = BitMapBackend::new(tmp, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 26))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(60)
        .build_cartesian_2d(x.with_key_points(ticks), 0.0..top)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc("loss / accuracy")
        .y_labels(8)
        .x_label_formatter(&|e| (e / X).to_string())
        .y_label_formatter(&|v| format!("{v:.1}"))
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 17))
        .light_line_style(WHITE.mix(0.0))
        .bold_line_style(BLACK.mix(0.08))
        .draw()?;

    // Markers only while they do not clutter the lines; a single epoch is just markers.
    let marks = history.len() <= 30;
    for s in &series {
        let color = s.color;
        let style = color.stroke_width(2);
        chart
            .draw_series(LineSeries::new(s.points.iter().copied(), style))?
            .label(s.label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(2))
            });
        if marks {
            chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::MiddleRight)
        .label_font((FONT, 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .margin(12)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Epochs between x ticks: 1, 2, 5, 10, 20, 50, ... so that at most about 10 are labelled.
fn tick_step(span: usize) -> usize {
    let mut base = 1usize;
    loop {
        for m in [1, 2, 5] {
            let step = base.saturating_mul(m);
            if span / step <= 10 {
                return step;
            }
        }
        base = base.saturating_mul(10);
    }
}

/// The finite values of one statistic by epoch (a diverged epoch is left out, not drawn at infinity).
fn points(history: &[EpochStats], f: impl Fn(&EpochStats) -> f64) -> Vec<(i64, f64)> {
    history
        .iter()
        .map(|s| (s.epoch as i64 * X, f(s)))
        .filter(|p| p.1.is_finite())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(epoch: usize, loss: f64, train_acc: f64, test_acc: f64) -> EpochStats {
        EpochStats {
            epoch,
            lr: 0.1,
            train_loss: loss,
            train_acc,
            test_loss: loss * 1.1,
            test_acc,
            seconds: 1.0,
            examples_per_sec: 1000.0,
        }
    }

    /// Checks the PNG signature and reads width and height from the IHDR chunk.
    fn png_size(bytes: &[u8]) -> (u32, u32) {
        assert!(bytes.len() > 33, "too short for a PNG");
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "no PNG signature");
        assert_eq!(&bytes[8..12], &13u32.to_be_bytes(), "IHDR length");
        assert_eq!(&bytes[12..16], b"IHDR", "first chunk is not IHDR");
        let w = u32::from_be_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]);
        let h = u32::from_be_bytes([bytes[20], bytes[21], bytes[22], bytes[23]]);
        (w, h)
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("dlc-plot-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn renders_a_png_of_the_expected_size() {
        let dir = temp_dir("curves");
        let history: Vec<EpochStats> = (1..=10)
            .map(|e| {
                let t = e as f64;
                stats(e, 2.3 / t.sqrt(), 0.9 - 0.6 / t, 0.88 - 0.6 / t)
            })
            .collect();
        let path = dir.join("curves.png");
        curves(&path, "lenet", &history).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(png_size(&bytes), SIZE);
        // No temporary file is left behind.
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("curves.png")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn renders_a_single_epoch_and_odd_values() {
        let dir = temp_dir("one");
        let path = dir.join("curves.png");
        curves(&path, "mlp", &[stats(1, 0.7, 0.75, 0.7)]).unwrap();
        assert_eq!(png_size(&std::fs::read(&path).unwrap()), SIZE);
        // A diverged run and an empty history still draw; overwriting replaces the file.
        curves(
            &path,
            "mlp",
            &[
                stats(1, f64::NAN, 0.1, 0.1),
                stats(2, f64::INFINITY, 0.1, 0.1),
            ],
        )
        .unwrap();
        curves(&path, "mlp", &[]).unwrap();
        assert_eq!(png_size(&std::fs::read(&path).unwrap()), SIZE);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn labels_at_most_about_ten_epochs() {
        assert_eq!(
            [0, 10, 11, 20, 22, 50, 55, 100, 110, 1000].map(tick_step),
            [1, 1, 2, 2, 5, 5, 10, 10, 20, 100]
        );
        assert!(usize::MAX / tick_step(usize::MAX) <= 10);
    }

    #[test]
    fn reports_an_unwritable_folder() {
        let path = std::env::temp_dir()
            .join(format!("dlc-plot-missing-{}", std::process::id()))
            .join("curves.png");
        let err = curves(&path, "mlp", &[stats(1, 0.5, 0.8, 0.8)]).unwrap_err();
        assert!(err.to_string().contains("curves.png"), "{err}");
    }
}
