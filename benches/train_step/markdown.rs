//! `--markdown`: the benchmark table as it goes into the README's "Speed" section, with a
//! header line naming the machine, the date, the versions and the exact command.

use dlc::diagnostics::thousands;

use super::{COLUMNS, Opts, Row, median};

/// Prints the README table of `rows`.
pub fn print(rows: &[Row], o: &Opts, torch_version: Option<&str>, end_load: &str) {
    let candle = lock_version("candle-core").unwrap_or_else(|| "?".into());
    let torch = torch_version.unwrap_or("PyTorch not run");
    println!(
        "Measured {} on {}, load average {end_load} at the end; candle {candle}, {torch}; \
         `{}`.",
        today(),
        machine(),
        command_line()
    );
    println!();
    println!(
        "ms: median over {} per column after {} warm-up step{}, the columns taking turns in rounds; \
         a training step is forward, cross-entropy, backward and an SGD update on a fixed batch, \
         an inference step a forward pass in evaluation mode without gradients. MiB: the \
         process's peak resident memory while the column ran; dlc and candle-nn share one \
         process, which holds both columns' models and the pages either freed (for a column's \
         own peak run one row and one Rust column per process){}.",
        steps_phrase(rows),
        o.warmup,
        if o.warmup == 1 { "" } else { "s" },
        torch_baseline(rows)
    );
    println!();
    println!(
        "| step | params | dlc ms | candle-nn ms | PyTorch ms | dlc / PyTorch | dlc MiB | \
         candle-nn MiB | PyTorch MiB |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in rows {
        let ms: Vec<String> = COLUMNS
            .iter()
            .map(|(k, _)| match row.cols.get(k) {
                Some(t) => fmt_ms(median(&t.step)),
                None if row.not_built.contains_key(k) && *k == "dlc" => "not built".into(),
                None => "–".into(),
            })
            .collect();
        let mib: Vec<String> = COLUMNS
            .iter()
            .map(|(k, _)| match row.cols.get(k).and_then(|t| t.peak_mib) {
                Some(m) => thousands(m.round() as u64),
                None => "–".into(),
            })
            .collect();
        let ratio = match (row.cols.get("dlc"), row.cols.get("torch")) {
            (Some(d), Some(t)) => format!("{:.2}×", median(&d.step) / median(&t.step)),
            _ => "–".into(),
        };
        println!(
            "| {} | {} | {} | {ratio} | {} |",
            row.net.label(),
            thousands(row.params as u64),
            ms.join(" | "),
            mib.join(" | ")
        );
    }
}

/// Milliseconds with one decimal and thousands separators: `3,018.7`.
fn fmt_ms(ms: f64) -> String {
    let s = format!("{ms:.1}");
    let (int, frac) = s.split_once('.').unwrap_or((&s, "0"));
    match int.parse::<u64>() {
        Ok(n) => format!("{}.{frac}", thousands(n)),
        Err(_) => s.clone(),
    }
}

/// "20 timed steps (LeNet, LSTM) and 5 (ResNet-18)": the rows grouped by their step count.
fn steps_phrase(rows: &[Row]) -> String {
    let mut groups: Vec<(usize, Vec<String>)> = Vec::new();
    for row in rows {
        let name = row.net.label().split(" (").next().unwrap_or("").to_string();
        let name = if row.net.trains() {
            name.trim_end_matches(" train step").to_string()
        } else {
            format!("{name} at batch {}", row.net.batch())
        };
        match groups.iter_mut().find(|g| g.0 == row.steps) {
            Some(g) => g.1.push(name),
            None => groups.push((row.steps, vec![name])),
        }
    }
    let parts: Vec<String> = groups
        .iter()
        .enumerate()
        .map(|(i, (n, names))| {
            let unit = match (i, *n) {
                (0, 1) => " timed step",
                (0, _) => " timed steps",
                _ => "",
            };
            if groups.len() == 1 {
                format!("{n}{unit}")
            } else {
                format!("{n}{unit} ({})", names.join(", "))
            }
        })
        .collect();
    match parts.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
        _ => parts.join(""),
    }
}

/// ", PyTorch's … MiB before its first step" from the rows that ran PyTorch.
fn torch_baseline(rows: &[Row]) -> String {
    let r: Vec<f64> = rows.iter().filter_map(|r| r.torch_resident_mib).collect();
    if r.is_empty() {
        return String::new();
    }
    let (lo, hi) = (
        r.iter().copied().fold(f64::INFINITY, f64::min),
        r.iter().copied().fold(0.0, f64::max),
    );
    let range = if hi - lo < 1.0 {
        format!("{lo:.0}")
    } else {
        format!("{lo:.0}–{hi:.0}")
    };
    format!(
        "; PyTorch's process is already {range} MiB resident before its first step (interpreter, \
         torch's libraries, model)"
    )
}

/// "2 cores, Intel(R) Xeon(R) Processor" from the thread count and /proc/cpuinfo.
fn machine() -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cores} cores, {model}")
}

/// Today's date (UTC), `YYYY-MM-DD`.
fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's `civil_from_days`).
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// The version of `krate` that Cargo.lock pins.
fn lock_version(krate: &str) -> Option<String> {
    let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.lock")).ok()?;
    let mut lines = lock.lines();
    lines.find(|l| *l == format!("name = \"{krate}\""))?;
    let v = lines.next()?.strip_prefix("version = \"")?;
    Some(v.trim_end_matches('"').to_string())
}

/// The command that reproduces this run: the bench's own arguments, and the `DLC_BENCH_*`,
/// `DLC_TORCH_PYTHON` and `RAYON_NUM_THREADS` variables that were set.
fn command_line() -> String {
    let mut env: Vec<String> = std::env::vars()
        .filter(|(k, _)| {
            k.starts_with("DLC_BENCH_") || k == "DLC_TORCH_PYTHON" || k == "RAYON_NUM_THREADS"
        })
        .map(|(k, v)| format!("{k}={}", quote(&v)))
        .collect();
    env.sort();
    // `cargo bench` passes `--bench` to every bench binary.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .map(|a| quote(&a))
        .collect();
    let mut cmd = env;
    cmd.push("cargo bench --bench train_step".into());
    if !args.is_empty() {
        cmd.push(format!("-- {}", args.join(" ")));
    }
    cmd.join(" ")
}

/// `s` quoted for a shell when it needs it.
fn quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_=.,/:+".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}
